"""The torch-free core (`csrc/core/`) built by a plain g++ with its driver, once per x86 ISA: every variant's
output is bitwise equal to scalar's on the same files (the same check the ARM64 build runs under emulation), and
the driver's dequantization equals gguf's. The build takes a few seconds per variant (no torch headers)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from autoglm.gguf.quants import dequantize, quantize
from autoglm.kernels.cpu import CORE, variants

Q = GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
FLAGS = {
    "scalar": ["-march=x86-64"],
    "avx2": ["-march=x86-64-v3", "-DAUTOGLM_ISA_AVX2"],
    "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-DAUTOGLM_ISA_AVX512"],
}


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gxx = shutil.which("g++")
    assert gxx, "g++ is needed for the kernels (it builds the extension too)"
    out = tmp_path_factory.mktemp("core")
    built = {}
    for name, flags in FLAGS.items():
        if name != "scalar" and name not in variants.available():
            continue
        exe = out / f"driver_{name}"
        srcs = [str(CORE / f) for f in ("driver.cpp", "gemv_core.cpp", "quant.cpp")]
        subprocess.run([gxx, "-std=c++17", "-O2", "-ffp-contract=off", *flags, *srcs, "-o", str(exe)],
                       check=True, timeout=300)
        built[name] = exe
    assert set(built) == set(FLAGS), f"this CPU runs {variants.available()}"  # both x86 variants run here
    return built


def _run(exe: Path, args: list[str]) -> None:
    subprocess.run([str(exe), *args], check=True, timeout=60)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_core_variants_bitwise_equal_and_dequant_exact(drivers: dict[str, Path], tmp_path: Path, qtype) -> None:
    rows, cols, m = 19, 768, 9  # 768: K-quants 3 super-blocks, block-32 types 24 blocks (3 full groups)
    g = torch.Generator().manual_seed(int(qtype))
    w = torch.randn(rows, cols, generator=g) * 0.05
    raw = quantize(w, qtype)
    x = torch.randn(m, cols, generator=g).numpy().astype(np.float32)
    inp = tmp_path / "in.bin"
    inp.write_bytes(raw.tobytes() + x.tobytes())
    outs = {}
    for name, exe in drivers.items():
        _run(exe, ["gemv", str(int(qtype)), str(rows), str(cols), str(m), str(inp), str(tmp_path / name)])
        outs[name] = np.fromfile(tmp_path / name, dtype=np.int32)
    for name, got in outs.items():
        assert np.array_equal(got, outs["scalar"]), (name, qtype.name)
    (tmp_path / "w.bin").write_bytes(raw.tobytes())
    _run(drivers["scalar"], ["deq", str(int(qtype)), str(rows), str(cols), str(tmp_path / "w.bin"),
                             str(tmp_path / "deq")])
    want = dequantize(torch.from_numpy(raw), qtype, (rows, cols)).numpy()
    assert np.array_equal(np.fromfile(tmp_path / "deq", dtype=np.float32).reshape(rows, cols), want)
