"""The q8_K decode kernel (`csrc/core/kquant_q8k.h`) built by a plain g++ with its driver, once per x86 ISA:
scalar == AVX2 == AVX-512 bitwise on random Q4_K/Q5_K/Q6_K blocks from gguf's quantizer, the result within the
q8_K activation bound of F.linear(dequantized W, x), and each output row independent of how many activation rows
(M) share the call."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from autoglm.gguf.quants import dequantize, quantize
from autoglm.kernels.cpu import CORE, variants

Q = GGMLQuantizationType
TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
FLAGS = {
    "scalar": ["-march=x86-64"],
    "avx2": ["-march=x86-64-v3", "-DAUTOGLM_ISA_AVX2"],
    "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-DAUTOGLM_ISA_AVX512"],
}


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gxx = shutil.which("g++")
    assert gxx, "g++ is needed for the kernels (it builds the extension too)"
    out = tmp_path_factory.mktemp("kq")
    built = {}
    for name, flags in FLAGS.items():
        if name != "scalar" and name not in variants.available():
            continue
        exe = out / f"kq_{name}"
        subprocess.run([gxx, "-std=c++17", "-O2", "-ffp-contract=off", *flags, str(CORE / "kquant_q8k_driver.cpp"),
                        "-o", str(exe)], check=True, timeout=300)
        built[name] = exe
    assert set(built) == set(FLAGS), f"this CPU runs {variants.available()}"  # both x86 variants run here
    return built


def _gemv(exe: Path, tmp: Path, qtype: Q, raw: np.ndarray, x: np.ndarray, tag: str) -> np.ndarray:
    rows, m = raw.shape[0], x.shape[0]
    inp, out = tmp / f"in_{tag}.bin", tmp / f"out_{tag}.bin"
    inp.write_bytes(raw.tobytes() + x.astype(np.float32).tobytes())
    subprocess.run([str(exe), str(int(qtype)), str(rows), str(x.shape[1]), str(m), str(inp), str(out)],
                   check=True, timeout=60)
    return np.fromfile(out, dtype=np.float32).reshape(m, rows)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_variants_bitwise_equal_and_within_q8k_bound(drivers: dict[str, Path], tmp_path: Path, qtype: Q) -> None:
    rows, cols, m = 37, 1024, 8
    g = torch.Generator().manual_seed(100 + int(qtype))
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3] *= 40.0  # a row with large scales (saturates no int16 pair: u <= 63, |q| <= 127)
    raw = quantize(w, qtype)
    x = torch.randn(m, cols, generator=g)
    x[1, :256] *= 1e-3  # one small block next to normal ones
    x[2, 256:512] = 0.0  # an all-zero block (d = 0)
    outs = {name: _gemv(exe, tmp_path, qtype, raw, x.numpy(), name) for name, exe in drivers.items()}
    for name, got in outs.items():
        assert np.array_equal(got.view(np.int32), outs["scalar"].view(np.int32)), (name, qtype.name)

    wd = dequantize(torch.from_numpy(raw), qtype, (rows, cols)).to(torch.float64)
    ref = F.linear(x.to(torch.float64), wd)
    # q8_K: per 256, d = amax / 127 and |x - d q| <= d / 2 (plus float rounding of 127 / amax)
    d = x.abs().reshape(m, cols // 256, 256).amax(-1) / 127.0
    half_step = (d / 2 * 1.0001).repeat_interleave(256, dim=1).to(torch.float64)
    bound = half_step @ wd.abs().T + 1e-5 * (x.abs().to(torch.float64) @ wd.abs().T) + 1e-6
    err = (torch.from_numpy(outs["scalar"]).to(torch.float64) - ref).abs()
    assert bool((err <= bound).all()), f"{qtype.name}: max err/bound {float((err / bound).max()):.3f}"
    assert float(err.max()) > 0.0  # the activations really were quantized (not a float path)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_rows_independent_of_m(drivers: dict[str, Path], tmp_path: Path, qtype: Q) -> None:
    rows, cols = 9, 512
    g = torch.Generator().manual_seed(200 + int(qtype))
    raw = quantize(torch.randn(rows, cols, generator=g) * 0.05, qtype)
    x = torch.randn(8, cols, generator=g).numpy()
    for name, exe in drivers.items():
        together = _gemv(exe, tmp_path, qtype, raw, x, f"{name}_8")
        for i in (0, 5, 7):
            alone = _gemv(exe, tmp_path, qtype, raw, x[i:i + 1], f"{name}_1")
            assert np.array_equal(alone[0].view(np.int32), together[i].view(np.int32)), (name, qtype.name, i)
