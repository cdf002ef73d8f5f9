"""ARM64 NEON kernels under emulation (issue 17): the torch-free core (autoglm/kernels/cpu/csrc/core) and its driver
are cross-compiled with aarch64-linux-gnu-g++ and run with qemu-aarch64; every ARM build (scalar, plain NEON, NEON
with sdot) must give bit-identical outputs to the native x86 scalar build on the same inputs, and so must the x86
AVX2 / AVX-512 builds. The scalar output itself is checked against gguf.quants (dequant bit-exact, GEMV close), so a
core that is wrong everywhere alike still fails. Marked `emulated` (not `slow`): the default and CI runs include it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from autoglm.kernels.cpu import CORE, kernels_spec, variants

pytestmark = pytest.mark.emulated

SOURCES = ("driver.cpp", "gemv_core.cpp", "quant.cpp")
CXX_FLAGS = ("-std=c++17", "-O2", "-ffp-contract=off")  # the core's numeric contract: no implicit fma
ARM_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
ARM_SYSROOT = "/usr/aarch64-linux-gnu"
TIMEOUT_S = 300  # one compile or one emulated run on a loaded 2-core machine

TYPES = (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
N_ROWS = 7
M_MAX = 9  # 1..8 and one past the core's tile of 8 activation rows


@dataclass(frozen=True)
class Variant:
    name: str
    compiler: str
    flags: tuple[str, ...]
    qemu_cpu: str | None  # None: runs natively
    isa: str  # what the binary reports (core isa_name())
    sdot: bool | None = None  # ARM only: whether the binary must (True) / must not (False) contain sdot


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _variants() -> list[Variant]:
    v = [
        Variant("x86-scalar", "g++", (), None, "scalar"),
        Variant("x86-avx2", "g++", ("-DAUTOGLM_ISA_AVX2", "-march=x86-64-v3"), None, "avx2"),
    ]
    flags = _cpu_flags()
    if {"avx2", "fma", "f16c"} - flags:
        v.pop()  # this x86 CPU cannot run the v3 build; the ARM builds are what this file is about
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        v.append(Variant("x86-avx512", "g++", ("-DAUTOGLM_ISA_AVX512", "-march=x86-64-v4", "-mavx512vnni"), None,
                         "avx512"))
    # cortex-a53 lacks dotprod (a stray sdot would SIGILL); neoverse-n1 has dotprod but no i8mm; max has both
    v += [
        Variant("arm-scalar", ARM_CXX, ("-march=armv8-a",), "cortex-a53", "scalar", sdot=False),
        Variant("arm-neon", ARM_CXX, ("-DAUTOGLM_ISA_NEON", "-march=armv8-a"), "cortex-a53", "neon", sdot=False),
        # the production `neon` variant's flags (autoglm/kernels/cpu/variants.py)
        Variant("arm-neon-dotprod", ARM_CXX, ("-DAUTOGLM_ISA_NEON", *variants.variant("neon").cflags),
                "neoverse-n1", "neon", sdot=True),
        Variant("arm-neon-dotprod-max", ARM_CXX, ("-DAUTOGLM_ISA_NEON", "-march=armv8.2-a+dotprod+i8mm"), "max",
                "neon", sdot=True),
    ]
    return v


def _need_tools() -> None:
    if shutil.which("g++") is None:
        pytest.fail("g++ is not installed (the native core build needs it)")
    missing = [t for t in (ARM_CXX, QEMU) if shutil.which(t) is None]
    if missing:  # run_tests.sh installs both (g++-aarch64-linux-gnu, qemu-user), so CI never takes this branch
        pytest.skip(f"cross toolchain not installed: {', '.join(missing)} "
                    "(apt-get install g++-aarch64-linux-gnu qemu-user)")


def _run(cmd: list[str], v: Variant) -> subprocess.CompletedProcess[bytes]:
    if v.qemu_cpu is not None:
        cmd = [QEMU, "-cpu", v.qemu_cpu, "-L", ARM_SYSROOT, *cmd]
    return subprocess.run(cmd, capture_output=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[Variant, Path]:
    _need_tools()
    missing = [s for s in SOURCES if not (CORE / s).is_file()]
    assert not missing, f"core sources missing in {CORE}: {missing}"
    out = tmp_path_factory.mktemp("arm64")
    built: dict[Variant, Path] = {}
    for v in _variants():
        exe = out / v.name
        cmd = [v.compiler, *CXX_FLAGS, *v.flags, *(str(CORE / s) for s in SOURCES), "-o", str(exe)]
        r = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT_S)
        assert r.returncode == 0, f"{v.name}: {' '.join(cmd)}\n{r.stderr.decode(errors='replace')}"
        built[v] = exe
    return built


def _weights(qt: T, rng: np.random.Generator) -> tuple[bytes, int]:
    """N_ROWS rows of raw GGUF blocks and K. Q4_0/Q5_0/Q8_0 by gguf.quants (11 blocks: a partial group of 8);
    K-quants as random bytes with finite fp16 scales (gguf.quants cannot quantize them; every other byte is valid)."""
    if qt in (T.Q4_0, T.Q5_0, T.Q8_0):
        k = 32 * 11
        w = rng.standard_normal((N_ROWS, k)).astype(np.float32)
        return quants.quantize(w, qt).tobytes(), k
    k = 512
    block, type_size = quants.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (N_ROWS, k // block, type_size), dtype=np.uint8)
    scales = (rng.uniform(1e-3, 2e-2, (N_ROWS, k // block, 2)) * rng.choice([-1, 1], (N_ROWS, k // block, 2)))
    halves = scales.astype(np.float16).view(np.uint8).reshape(N_ROWS, k // block, 4)
    if qt == T.Q6_K:  # d at the end (after ql, qh, scales)
        raw[..., 208:210] = halves[..., :2]
    else:  # d, dmin first
        raw[..., 0:4] = halves
    return raw.tobytes(), k


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[T, tuple[Path, Path, int, np.ndarray]]:
    """per type: (weights file for deq, weights + M_MAX activation rows file for gemv, K, activations)"""
    rng = np.random.default_rng(17)
    out = tmp_path_factory.mktemp("arm64-in")
    res = {}
    for qt in TYPES:
        w, k = _weights(qt, rng)
        x = rng.standard_normal((M_MAX, k)).astype(np.float32)
        x[1, :64] = 0.0  # all-zero activation blocks: scale 0
        x[2] *= 100.0
        deq = out / f"{qt.name}.w"
        deq.write_bytes(w)
        res[qt] = (deq, out / f"{qt.name}.wx", k, x)
        for m in range(1, M_MAX + 1):
            (out / f"{qt.name}.wx{m}").write_bytes(w + x[:m].tobytes())
    return res


def _deq(v: Variant, exe: Path, qt: T, w: Path, k: int, out: Path) -> np.ndarray:
    r = _run([str(exe), "deq", str(int(qt)), str(N_ROWS), str(k), str(w), str(out)], v)
    assert r.returncode == 0, f"{v.name} deq {qt.name}: rc {r.returncode}\n{r.stderr.decode(errors='replace')}"
    return np.fromfile(out, dtype=np.float32).reshape(N_ROWS, k)


def _gemv(v: Variant, exe: Path, qt: T, wx: Path, k: int, m: int, out: Path) -> np.ndarray:
    cmd = [str(exe), "gemv", str(int(qt)), str(N_ROWS), str(k), str(m), f"{wx}{m}", str(out)]
    r = _run(cmd, v)
    assert r.returncode == 0, f"{v.name} gemv {qt.name} M={m}: rc {r.returncode}\n{r.stderr.decode(errors='replace')}"
    return np.fromfile(out, dtype=np.float32).reshape(m, N_ROWS)


def test_binaries_are_the_isa_they_claim(binaries: dict[Variant, Path]) -> None:
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump is not None, "aarch64-linux-gnu-objdump missing (binutils-aarch64-linux-gnu comes with the g++)"
    for v, exe in binaries.items():
        r = _run([str(exe)], v)  # no arguments: usage naming the compiled ISA
        assert f"(isa {v.isa})" in r.stderr.decode(), f"{v.name}: {r.stderr!r}"
        if v.sdot is not None:
            dis = subprocess.run([objdump, "-d", str(exe)], capture_output=True, text=True, timeout=TIMEOUT_S).stdout
            assert ("\tsdot\t" in dis) == v.sdot, f"{v.name}: sdot expected {v.sdot}"


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequant_bitexact(qt: T, binaries: dict[Variant, Path], inputs, tmp_path: Path) -> None:
    w, _, k, _ = inputs[qt]
    raw = np.frombuffer(w.read_bytes(), dtype=np.uint8).reshape(N_ROWS, -1)
    want = quants.dequantize(raw, qt).astype(np.float32)
    for v, exe in binaries.items():
        got = _deq(v, exe, qt, w, k, tmp_path / f"{v.name}.out")
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{v.name} deq {qt.name}")


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_gemv_bitexact_vs_x86_scalar(qt: T, binaries: dict[Variant, Path], inputs, tmp_path: Path) -> None:
    w, wx, k, x = inputs[qt]
    raw = np.frombuffer(w.read_bytes(), dtype=np.uint8).reshape(N_ROWS, -1)
    dense = quants.dequantize(raw, qt).astype(np.float64)
    ref_v = next(v for v in binaries if v.name == "x86-scalar")
    for m in range(1, M_MAX + 1):
        ref = _gemv(ref_v, binaries[ref_v], qt, wx, k, m, tmp_path / "ref.out")
        # int8 activations per 32: error ~ |w| |x| / 127 per element; 4 sigma over K terms
        exact = x[:m].astype(np.float64) @ dense.T
        bound = 4 * np.sqrt(k) * np.abs(dense).max() * np.abs(x[:m]).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(ref - exact) <= bound), f"x86 scalar gemv {qt.name} M={m} far from gguf.quants"
        for v, exe in binaries.items():
            got = _gemv(v, exe, qt, wx, k, m, tmp_path / f"{v.name}.out")
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                          err_msg=f"{v.name} gemv {qt.name} M={m} differs from x86 scalar")


@pytest.mark.timeout(1500)  # 9 sources against the torch headers: ~5 min at load 16 on 2 cores
def test_extension_sources_compile_for_aarch64() -> None:
    """Every source of the torch extension's `neon` variant (production spec and flags) compiles for aarch64:
    syntax only, against this venv's torch headers (no aarch64 torch here, the headers are portable C++)."""
    _need_tools()
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    spec = kernels_spec("neon")
    incs = [f"-I{p}" for p in (*include_paths(), sysconfig.get_paths()["include"])]
    for src in spec.sources:
        cmd = [ARM_CXX, "-std=c++17", "-fsyntax-only", *spec.cflags, *incs, "-DTORCH_EXTENSION_NAME=neon_check",
               str(src)]
        r = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT_S)
        err = r.stderr.decode(errors="replace")[:4000]
        assert r.returncode == 0, f"{src.name} does not compile for aarch64:\n{err}"
