"""CPU kernel ISA variants (issue 17): every variant this CPU runs is bitwise equal to `scalar` (the contract in
`autoglm/kernels/cpu/csrc/core/README.md`) on random inputs for every type and tile size, and each equals the
gguf/torch reference within the documented error.

Compile time: one extension per variant, built once per machine into the shared kernel cache (the first session
on a fresh CI runner compiles scalar, avx2 and avx512 once each; later sessions import them).

Tolerance vs `F.linear(x_q, W)` (x_q: the int8 activations the kernel multiplies by, `quantize_activations`):
the integer dots are exact, so only float32 rounding differs: |y - ref| <= K * 2^-23 * (|x_q| @ |W|.T) (the
standard gamma_K bound, derived, not tuned).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor

from autoglm.kernels.cpu import cpu_kernels, variants
from autoglm.kernels.cpu.ops import CpuKernels
from tests.kernels.inputs import activations, quantized_weights

Q = GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
K_TYPES = {Q.Q4_K, Q.Q5_K, Q.Q6_K}
# columns: block-32 types with a partial last group of 8 blocks (96 = 3, 640 = 20) and exact ones (512 = 16)
COLS = {False: (32, 96, 640), True: (256, 768)}
ROWS = 37
TOKENS = (1, 3, 8, 11, 16)  # tiles of 8 and remainders
X86 = [n for n in ("avx512", "avxvnni", "avx2") if n in variants.available()]  # avxvnni: CPUs with AVX-VNNI


@pytest.fixture(scope="module")
def scalar() -> CpuKernels:
    k = cpu_kernels("scalar")
    assert k is not None, "the scalar variant must build on the test machine (g++ and ninja are installed)"
    return k


@pytest.fixture(scope="module", params=X86)
def fast(request: pytest.FixtureRequest) -> CpuKernels:
    k = cpu_kernels(request.param)
    assert k is not None, f"the {request.param} variant must build on the test machine"
    return k


def test_this_cpu_runs_the_x86_variants_the_tests_need() -> None:
    # the premise for this machine: both x86-64-v3 and v4 code run here, so neither test is vacuous
    assert {"avx512", "avx2"} <= set(X86), variants.available()


def _weights(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> tuple[Tensor, Tensor]:
    return quantized_weights(qtype, rows, cols, seed)


_x = activations


def _cases() -> list[tuple[GGMLQuantizationType, int]]:
    return [(q, c) for q in TYPES for c in COLS[q in K_TYPES]]


def _id(case: tuple[GGMLQuantizationType, int]) -> str:
    return f"{case[0].name}-{case[1]}"


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_variant_gemv_is_bitwise_equal_to_scalar(scalar: CpuKernels, fast: CpuKernels, case) -> None:
    qtype, cols = case
    raw, _ = _weights(qtype, ROWS, cols, seed=cols)
    for m in TOKENS:
        x = _x(m, cols, seed=m + cols)
        want = scalar.ext.gemv(x, raw, int(qtype), False)
        got = fast.ext.gemv(x, raw, int(qtype), False)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (fast.isa, qtype.name, cols, m)


@pytest.mark.parametrize("isa", ["scalar", *X86])
@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_variant_gemv_within_float_rounding_of_the_reference(isa: str, case) -> None:
    k = cpu_kernels(isa)
    assert k is not None
    qtype, cols = case
    raw, w = _weights(qtype, ROWS, cols, seed=cols + 1)
    for m in (1, 11):
        x = _x(m, cols, seed=m)
        xq = k.quantize_activations(x)
        ref = F.linear(xq.double(), w.double())
        bound = cols * 2.0**-23 * F.linear(xq.abs().double(), w.abs().double()) + 1e-30
        got = k.ext.gemv(x, raw, int(qtype), False).double()
        assert ((got - ref).abs() <= bound).all(), (isa, qtype.name, cols, m, (got - ref).abs().max().item())


@pytest.mark.parametrize("isa", ["scalar", *X86])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_variant_dequantize_is_bit_exact_with_gguf(isa: str, qtype: GGMLQuantizationType) -> None:
    k = cpu_kernels(isa)
    assert k is not None
    cols = 512
    raw, w = _weights(qtype, ROWS, cols, seed=3)
    assert torch.equal(k.ext.dequantize(raw, int(qtype), cols, False), w)


@pytest.mark.parametrize("isa", ["scalar", *X86])
def test_variant_activation_quantization_is_identical(scalar: CpuKernels, isa: str) -> None:
    k = cpu_kernels(isa)
    assert k is not None
    x = _x(5, 768, seed=9)
    assert torch.equal(k.quantize_activations(x), scalar.quantize_activations(x))


@pytest.mark.parametrize("isa", ["scalar", *X86])
def test_variant_norms_and_attention_match_the_reference(isa: str) -> None:
    # the torch-side ops (AVX-512 fast paths or float fallbacks) in every variant, within float32 slack
    from autoglm.kernels.reference import REFERENCE

    k = cpu_kernels(isa)
    assert k is not None
    g = torch.Generator().manual_seed(0)
    x, wt = torch.randn(3, 640, generator=g), torch.randn(640, generator=g)
    torch.testing.assert_close(k.rms_norm(x, wt, 1e-6, 1.0), REFERENCE.rms_norm(x, wt, 1e-6, 1.0))
    q = torch.randn(4, 64, generator=g)  # [H, D]; K/V [n, KV, D] with 2 KV heads
    kk, v = torch.randn(37, 2, 64, generator=g), torch.randn(37, 2, 64, generator=g)
    torch.testing.assert_close(k.attend_decode(q, kk, v, 0.125), REFERENCE.attend_decode(q, kk, v, 0.125))
    # 4 query heads per KV head (the 4-head score loop), head_dim 128, and the float16 / bfloat16 caches the fused
    # loops convert in registers (exactly: the reference sees the same values upcast)
    q = torch.randn(8, 128, generator=g)
    kk, v = torch.randn(70, 2, 128, generator=g), torch.randn(70, 2, 128, generator=g)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        kc, vc = kk.to(dt), v.to(dt)
        want = REFERENCE.attend_decode(q, kc.float(), vc.float(), 0.09)
        torch.testing.assert_close(k.attend_decode(q, kc, vc, 0.09), want, rtol=1e-5, atol=1e-5)
