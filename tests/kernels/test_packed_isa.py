"""The packed layout on the x86 variants (issue 17): the avx2 tiles (`csrc/packed_tiles_avx2.h`; also as the
avxvnni build, vpdpbusd ymm, on CPUs with AVX-VNNI) read the bytes `csrc/pack.cpp` writes and are bitwise equal to
the avx512 tiles for every packed type, tile size and remainder (exact integer dots, the same float ops per output
in the same order), within float32 rounding of F.linear(x_q, W), and an avx2 model packs its weights at start-up.
Q4_K / Q6_K run llama.cpp's q8_K activations (per 256) with an exact integer super-block reduction: bitwise the
row-major q8_K kernel's result.

Tolerance vs `F.linear(x_q, W)` (x_q: the int8 activations, `quantize_activations`): the integer dots are exact, so
only float32 rounding differs: |y - ref| <= K * 2^-23 * (|x_q| @ |W|.T) (gamma_K, as in test_isa_variants.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor

from autoglm.kernels.cpu import cpu_kernels, variants
from autoglm.kernels.cpu.ops import CpuKernels
from autoglm.kernels.cpu.pack import PACKED_TYPES
from autoglm.layers.linear.gguf import GGUFBlockFormat
from tests.kernels.inputs import activations, quantize_rows

Q = GGMLQuantizationType
K_TYPES = {Q.Q4_K, Q.Q6_K}
# block-32 types: K not a multiple of 256 (96 = 3 blocks, 544 = 17); K-quants: 1 and 3 super-blocks
COLS = {False: (32, 96, 544), True: (256, 768)}
ROWS = 48  # 3 groups of 16
TOKENS = (*range(1, 10), 40)  # every tile size up to 8, a remainder, and several full tiles + one


def _kernels(isa: str) -> CpuKernels:
    assert isa in variants.available(), f"this CPU must run {isa} (the issue's premise for the test machine)"
    k = cpu_kernels(isa)
    assert k is not None, f"the {isa} variant must build on the test machine"
    return k


@pytest.fixture(scope="module", params=["avx2", "avxvnni"])
def avx2(request: pytest.FixtureRequest) -> CpuKernels:
    """The x86-64-v3 tiles: plain AVX2 (vpmaddubsw) and, on CPUs with AVX-VNNI, the avxvnni build (vpdpbusd ymm)."""
    if request.param not in variants.available():
        lack = variants.missing(variants.variant(request.param))
        pytest.skip(f"this CPU lacks {', '.join(lack)}: the {request.param} variant cannot run here")
    return _kernels(request.param)


@pytest.fixture(scope="module")
def avx512() -> CpuKernels:
    return _kernels("avx512")


def _weights(qtype: GGMLQuantizationType, cols: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, cols, generator=g) * 0.05
    w[0, :16] = 0.0  # zero scales
    w[5] *= 40.0  # large scales (Q8_0: values at -128/127 test the signed dot's int16 range)
    w[9, :32] = torch.where(torch.arange(32) % 2 == 0, 1.0, -1.0)  # a block of extremes of both signs
    return quantize_rows(w, qtype)


def _x(m: int, cols: int, seed: int) -> Tensor:
    x = activations(m, cols, seed)
    if m > 1:
        x[1, :32] = torch.where(torch.arange(32) % 3 == 0, -1.0, 1.0)  # int8 at +-127 throughout the block
    return x


def _cases() -> list[tuple[GGMLQuantizationType, int]]:
    return [(q, c) for q in PACKED_TYPES for c in COLS[q in K_TYPES]]


def _id(case: tuple[GGMLQuantizationType, int]) -> str:
    return f"{case[0].name}-{case[1]}"


def test_both_x86_variants_run_the_packed_kernel(avx2: CpuKernels, avx512: CpuKernels) -> None:
    assert avx2.has_packed and not avx2.has_vnni  # the AVX2 tiles, not AVX-512 VNNI
    assert avx512.has_packed and avx512.has_vnni
    assert cpu_kernels("scalar").has_packed is False  # type: ignore[union-attr]


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_avx2_packed_is_bitwise_equal_to_avx512(avx2: CpuKernels, avx512: CpuKernels, case) -> None:
    qtype, cols = case
    raw, _ = _weights(qtype, cols, seed=cols)
    packed = avx2.ext.pack(raw, int(qtype), cols)  # one packer: the same bytes for both
    assert torch.equal(packed, avx512.ext.pack(raw, int(qtype), cols))
    for m in TOKENS:
        x = _x(m, cols, seed=m + cols)
        want = avx512.ext.gemv_packed(x, packed, int(qtype))
        got = avx2.ext.gemv_packed(x, packed, int(qtype))
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (qtype.name, cols, m)


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_avx2_packed_within_float_rounding_of_the_reference(avx2: CpuKernels, case) -> None:
    qtype, cols = case
    raw, w = _weights(qtype, cols, seed=cols + 1)
    packed = avx2.ext.pack(raw, int(qtype), cols)
    fmt = GGUFBlockFormat(qtype, ROWS, cols, packed=True)
    for m in (1, 11):
        x = _x(m, cols, seed=m)
        xq = avx2.quantize_activations(x, fmt)  # K-quants: q8_K per 256, else per 32
        ref = F.linear(xq.double(), w.double())
        bound = cols * 2.0**-23 * F.linear(xq.abs().double(), w.abs().double()) + 1e-30
        got = avx2.ext.gemv_packed(x, packed, int(qtype)).double()
        assert ((got - ref).abs() <= bound).all(), (qtype.name, cols, m, (got - ref).abs().max().item())


@pytest.mark.parametrize("cols", COLS[True])
@pytest.mark.parametrize("qtype", sorted(K_TYPES), ids=lambda q: q.name)
def test_k_quant_tiles_are_bitwise_the_file_order_q8k_kernel(
    avx2: CpuKernels, avx512: CpuKernels, qtype: GGMLQuantizationType, cols: int
) -> None:
    """Packed Q4_K / Q6_K run llama.cpp's q8_K activations and integer super-block reduction: on both ISAs the
    outputs are bitwise those of the row-major q8_K kernel (csrc/core/kquant_q8k.h) on the file's blocks."""
    raw, _ = _weights(qtype, cols, seed=cols + 7)
    packed = avx2.ext.pack(raw, int(qtype), cols)
    for m in (1, 4, 9):
        x = _x(m, cols, seed=3 * m)
        want = avx512.ext.gemv_q8k(x, raw, int(qtype))
        for k in (avx2, avx512):
            got = k.ext.gemv_packed(x, packed, int(qtype))
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (k.isa, qtype.name, cols, m)


def _llama_q8k(x: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize_row_q8_K_ref (ggml-quants.c), vectorized: per 256 values the one of largest |x| (the
    first if tied) maps to -127; q = min(127, round-half-even(x * (-127 / max))); d = 1 / iscale."""
    b = x.astype(np.float32).reshape(-1, 256)
    first = np.abs(b).argmax(axis=1)
    mx = b[np.arange(b.shape[0]), first]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx == 0, np.float32(0), np.float32(-127.0) / mx).astype(np.float32)
    q = np.minimum(127, np.rint(b * iscale[:, None])).astype(np.float32)
    with np.errstate(divide="ignore"):
        d = np.where(iscale == 0, np.float32(0), np.float32(1.0) / iscale).astype(np.float32)
    return (q * d[:, None]).reshape(x.shape)


def test_k_quant_activations_are_llama_cpp_q8k(avx2: CpuKernels, avx512: CpuKernels) -> None:
    x = _x(6, 768, seed=11)
    x[2, 256:512] = 0.0  # an all-zero super-block
    x[3, 7] = -x[3, :256].abs().max() * 2  # the extreme is negative: d > 0 for that block
    peak = x[4].abs().max() * 3
    x[4, 10], x[4, 200] = peak, -peak  # a tie of |x|: the first decides the sign (strict scan)
    x[4, 300], x[4, 301] = -peak, peak
    x[5, 512:768] *= 1e-30  # tiny values: the grid is relative
    x[5, 0] = -127.0  # iscale exactly 1: halves round to even (2.5 -> 2, 3.5 -> 4, -0.5 -> 0)
    x[5, 1:4] = torch.tensor([2.5, 3.5, -0.5])
    fmt = GGUFBlockFormat(Q.Q4_K, 16, 768, packed=True)
    want = torch.from_numpy(_llama_q8k(x.numpy()))
    got = avx2.quantize_activations(x, fmt)
    assert torch.equal(got, want)
    assert torch.equal(avx512.quantize_activations(x, fmt), want)
    assert not torch.equal(got, avx2.quantize_activations(x))  # per 32 is another grid
    assert torch.equal(avx2.quantize_activations(x, GGUFBlockFormat(Q.Q4_K, 16, 768)), avx2.quantize_activations(x))


def test_q8k_activations_of_extremes_are_the_same_integers_on_every_isa(avx2: CpuKernels, avx512: CpuKernels) -> None:
    """The q8_K quantizer has AVX-512, AVX2 and plain bodies (csrc/core/common.h): every one yields the same
    activations bit for bit, also where x holds NaN, infinities, denormals, exact halves and all-NaN blocks; the
    finite rows are llama.cpp's."""
    scalar = _kernels("scalar")
    x = _x(4, 1536, seed=5)
    x[0, 3], x[0, 300], x[0, 600] = float("nan"), float("inf"), -float("inf")
    x[0, 800:1024] = float("nan")  # most of a block NaN, the rest finite
    x[1, 256:512] = float("nan")  # a whole block NaN
    x[1, 512:768] = -float("inf")
    x[1, 768:1024] = torch.arange(256) % 3 * 1e-38  # denormal-sized values
    x[2, 0] = -127.0  # iscale exactly 1: halves round to even
    x[2, 1:256] = (torch.arange(255) % 7) * 0.5 - 1.5
    x[2, 256:512] = 0.0
    got = {k.isa: k.ext.quantize_activations(x, True).view(torch.int32) for k in (scalar, avx2, avx512)}
    assert torch.equal(got["scalar"], got[avx2.isa]) and torch.equal(got["scalar"], got["avx512"])
    want = torch.from_numpy(_llama_q8k(x[2:].numpy()))
    assert torch.equal(got["avx512"][2:].view(torch.float32), want)


def test_an_avx2_model_packs_its_weights(avx2: CpuKernels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoglm.layers.linear.gguf import GGUFEmbedding, GGUFLinear, prepare_weights
    from autoglm.loader.gguf import load_gguf
    from tests.fixtures.gguf import gemma3_to_gguf, tiny_gemma3_hf

    monkeypatch.delenv(variants.ENV, raising=False)
    # what --cpu-isa avx2 hands the loader (load_model -> load_gguf -> select_kernels)
    loaded = load_gguf(gemma3_to_gguf(tiny_gemma3_hf(0), tmp_path / "tiny.gguf", Q.Q8_0), cpu_isa=avx2.isa)
    mods = [m for m in loaded.decoder.modules() if isinstance(m, GGUFLinear | GGUFEmbedding)]
    packable = [m for m in mods if m.weight_format.rows % 16 == 0]
    assert packable and all(isinstance(m.impl, CpuKernels) and m.impl.isa == avx2.isa for m in mods)
    lin = next(m for m in packable if isinstance(m, GGUFLinear))
    x = torch.randn(3, lin.weight_format.cols, generator=torch.Generator().manual_seed(0))
    before = lin(x)  # the file-order kernel
    assert prepare_weights(loaded.decoder) == len(packable)
    assert all(m.weight_format.packed for m in packable)
    xq = lin.impl.quantize_activations(x)
    w = lin.dequantized_weight()
    scale = F.linear(xq.abs(), w.abs()) + 1e-6
    assert ((lin(x) - before).abs() <= 4e-6 * scale).all()  # the same product up to float32 summation order
