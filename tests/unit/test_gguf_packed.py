"""Packed GGUF weights (`csrc/pack.cpp`, `csrc/gemv_packed.cpp`): the 16-row interleaved layout round-trips to the
file's bytes exactly, the packed kernel computes F.linear(x_q, W) (x_q: the int8 activations, per 32, or llama.cpp's
q8_K per 256 for Q4_K / Q6_K; only float32 summation order differs, bound derived in test_gguf_kernels.py) for every
M, each row independent of the batch, and modules packed by the explicit `prepare_weights` step keep their memory,
share a tied tensor, and read back through every path; modules built with the reference kernels are never packed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor, nn

from autoglm.gguf.quants import dequantize, quantize
from autoglm.kernels.base import Kernels
from autoglm.kernels.cpu import cpu_kernels
from autoglm.kernels.cpu.ops import CpuKernels
from autoglm.kernels.cpu.pack import PACKED_TYPES
from autoglm.kernels.reference import REFERENCE
from autoglm.layers.linear.gguf import GGUFBlockFormat, GGUFEmbedding, GGUFLinear, prepare_weights

Q = GGMLQuantizationType
PACKED = list(PACKED_TYPES)


@pytest.fixture(scope="module")
def gk() -> CpuKernels:
    k = cpu_kernels()
    assert k is not None, "the C++ kernels must build on the test machine (g++ and ninja are installed)"
    return k


def _weights(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :16] = 0.0  # zero scales must not produce NaN
    w[5] *= 40.0  # one row with a much larger scale
    raw = torch.from_numpy(quantize(w, qtype))
    return raw, dequantize(raw, qtype, (rows, cols))


def _cols(qtype: GGMLQuantizationType) -> int:
    return 512 if qtype in (Q.Q4_K, Q.Q6_K) else 96


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_pack_round_trips_to_the_file_bytes(gk: CpuKernels, qtype: GGMLQuantizationType) -> None:
    rows, cols = 48, _cols(qtype)
    raw, _ = _weights(qtype, rows, cols, seed=1)
    packed = gk.ext.pack(raw, int(qtype), cols)  # type: ignore[attr-defined]
    assert packed.shape == raw.shape and packed.dtype == torch.uint8
    assert not torch.equal(packed, raw)  # it did rearrange
    ids = torch.randperm(rows, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gk.ext.unpack_rows(packed, int(qtype), cols, ids), raw[ids])  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="out of range"):
        gk.ext.unpack_rows(packed, int(qtype), cols, torch.tensor([rows]))  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="multiple of 16"):
        gk.ext.pack(raw[:40], int(qtype), cols)  # type: ignore[attr-defined]


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packed_kernel_computes_the_quantized_product(gk: CpuKernels, qtype: GGMLQuantizationType) -> None:
    rows, cols = 64, _cols(qtype)
    raw, w = _weights(qtype, rows, cols, seed=3)
    fmt = GGUFBlockFormat(qtype, rows, cols, packed=True)
    packed = gk.ext.pack(raw, int(qtype), cols)  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(4)
    for m in (1, 3, 8, 11, 16) if gk.has_packed else ():  # tiles of 8 and a remainder
        x = torch.randn(m, cols, generator=g)
        x[0, :32] = 0.0
        y = gk.matmul(x, packed, fmt)
        xq = gk.quantize_activations(x, fmt)  # Q4_K / Q6_K: q8_K per 256, else per 32
        scale = F.linear(xq.abs(), w.abs()) + 1e-6
        assert ((y - F.linear(xq, w)).abs() <= 2e-6 * scale).all(), f"{qtype.name} M={m}"
        if qtype in (Q.Q4_K, Q.Q6_K):  # bitwise the row-major q8_K kernel
            assert torch.equal(y, gk.ext.gemv_q8k(x, raw, int(qtype)))  # type: ignore[attr-defined]
        else:  # the same as the row-major decode kernel up to summation order
            assert ((y - gk.gemv(x, raw, GGUFBlockFormat(qtype, rows, cols))).abs() <= 4e-6 * scale).all()
    # prefill (M > GEMV_MAX_ROWS): float activations on the weight dequantized from the packed layout (bit-exact)
    x = torch.randn(40, cols, generator=g)
    torch.testing.assert_close(gk.gemm(x, packed, fmt), F.linear(x, w), rtol=1e-5, atol=1e-5)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(rows - 16, cols, dtype=dtype)
        gk.ext.dequantize_packed_out(packed, int(qtype), cols, 16, out)  # type: ignore[attr-defined]
        assert torch.equal(out, w[16:].to(dtype))


@pytest.mark.parametrize("qtype", PACKED, ids=lambda t: t.name)
def test_packed_rows_are_batch_independent(gk: CpuKernels, qtype: GGMLQuantizationType) -> None:
    rows, cols = 32, _cols(qtype)
    raw, _ = _weights(qtype, rows, cols, seed=5)
    packed = gk.ext.pack(raw, int(qtype), cols)  # type: ignore[attr-defined]
    x = torch.randn(19, cols, generator=torch.Generator().manual_seed(6))
    if not gk.has_packed:  # packing is then never used (can_pack is False); the kernel says why it cannot run
        with pytest.raises(RuntimeError, match="AVX512-VNNI"):
            gk.ext.gemv_packed(x, packed, int(qtype))  # type: ignore[attr-defined]
        return
    alone = torch.cat([gk.ext.gemv_packed(x[i : i + 1], packed, int(qtype)) for i in range(19)])  # type: ignore[attr-defined]
    for m in (2, 8, 9, 19):
        assert torch.equal(gk.ext.gemv_packed(x[:m], packed, int(qtype)), alone[:m])  # type: ignore[attr-defined]


class _Tied(nn.Module):
    def __init__(self, raw: Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int], impl: Kernels) -> None:
        super().__init__()
        self.embed_tokens = GGUFEmbedding.from_raw(raw, qtype, shape, impl=impl)
        self.lm_head = GGUFLinear.from_raw(raw, qtype, shape, impl=impl)
        self.odd = GGUFLinear.from_raw(raw[:8], qtype, (8, shape[1]), impl=impl)  # rows % 16 != 0: file order


def test_prepare_packs_and_shares_tied_weights(gk: CpuKernels) -> None:
    vocab, dim, qtype = 64, 256, Q.Q8_0
    raw, w = _weights(qtype, vocab, dim, seed=7)
    model = _Tied(raw, qtype, (vocab, dim), gk)
    reference = _Tied(raw, qtype, (vocab, dim), REFERENCE)  # same blocks, another model in the same process
    ids = torch.tensor([[3, 17, 63, 0]])
    x = torch.randn(2, dim)
    want_rows = model.embed_tokens(ids)  # before packing: the file-order path
    want_logits = gk.gemv(x, raw, GGUFBlockFormat(qtype, vocab, dim))
    assert prepare_weights(reference) == 0  # the reference kernels have no packed layout
    if not gk.has_packed:
        assert prepare_weights(model) == 0  # no packed kernel (scalar, neon): nothing is packed
        return
    assert model.embed_tokens.weight.data_ptr() == raw.data_ptr()  # nothing packed before the explicit step
    assert prepare_weights(model) == 2  # embedding + head; the 8-row layer is not packable
    assert prepare_weights(model) == 0  # idempotent
    assert model.embed_tokens.weight_format.packed and model.embed_tokens.weight.data_ptr() != raw.data_ptr()
    torch.testing.assert_close(model.embed_tokens(ids), want_rows, rtol=0, atol=0)  # unpacked rows, exact
    logits = model.lm_head(x)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()  # one packed copy
    assert model.lm_head.nbytes == raw.numel() and model.lm_head.weight.shape == raw.shape
    scale = F.linear(gk.quantize_activations(x).abs(), w.abs()) + 1e-6
    assert ((logits - want_logits).abs() <= 4e-6 * scale).all()
    torch.testing.assert_close(model.embed_tokens.as_logits(x), logits, rtol=0, atol=0)
    assert not model.odd.weight_format.packed
    torch.testing.assert_close(model.lm_head.dequantized_weight(), w, rtol=0, atol=0)
    # the reference model still reads the file's blocks: exactly F.linear
    assert not reference.lm_head.weight_format.packed and reference.lm_head.weight.data_ptr() == raw.data_ptr()
    torch.testing.assert_close(reference.lm_head(x), F.linear(x, w), rtol=0, atol=0)


def test_loading_packs_nothing_and_the_runner_prepares_once(gk: CpuKernels, tmp_path: Path) -> None:
    from autoglm.config import EngineConfig
    from autoglm.engine.engine import Engine
    from autoglm.layers.attention import CpuFusedBackend
    from autoglm.loader.gguf import load_gguf
    from tests.fixtures.gguf import gemma3_to_gguf, tiny_gemma3_hf

    loaded = load_gguf(gemma3_to_gguf(tiny_gemma3_hf(0), tmp_path / "tiny.gguf", Q.Q8_0))
    mods = [m for m in loaded.decoder.modules() if isinstance(m, GGUFLinear | GGUFEmbedding)]
    packable = [m for m in mods if m.weight_format.rows % 16 == 0]
    assert packable and all(m.impl is mods[0].impl and isinstance(m.impl, CpuKernels) for m in mods)
    assert not any(m.weight_format.packed for m in mods)  # loading is not packing
    engine = Engine(loaded, EngineConfig(max_model_len=64, max_num_seqs=2, block_size=4, num_kv_blocks=32))
    try:
        assert isinstance(engine.runner.backend, CpuFusedBackend)  # chosen from the kernels the loader bound
        assert all(m.weight_format.packed == gk.has_packed for m in packable)  # the explicit step ran at start-up
        assert prepare_weights(loaded.decoder) == 0
    finally:
        engine.close()


def test_a_weight_of_several_huge_pages_packs_into_its_own_mapping(gk: CpuKernels) -> None:
    """Packed weights of >= 2 MiB live in their own mapping (2 MiB pages asked for, csrc/pack.cpp packed_buffer):
    the bytes round-trip, the product is the file-order q8_K kernel's, and dropping the tensor unmaps it (no leak
    over 20 packs)."""
    import os

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rows, cols = 16384, 256  # Q4_K: 144 bytes a row -> 2.25 MiB
    raw, _ = _weights(Q.Q4_K, rows, cols, seed=3)
    fmt = GGUFBlockFormat(Q.Q4_K, rows, cols)
    packed = gk.pack(raw, fmt)
    assert packed.shape == raw.shape and packed.is_contiguous()
    back = gk.unpack_rows(packed, GGUFBlockFormat(Q.Q4_K, rows, cols, packed=True), torch.arange(rows))
    assert torch.equal(back, raw)
    x = torch.randn(2, cols)
    want = gk.ext.gemv_q8k(x, raw, int(Q.Q4_K))  # type: ignore[attr-defined]  # the packed tiles: bitwise this
    assert torch.equal(gk.gemv(x, packed, GGUFBlockFormat(Q.Q4_K, rows, cols, packed=True)), want)
    del packed
    before = rss()
    for _ in range(20):
        gk.pack(raw, fmt)
    assert rss() - before < 20 << 20  # 20 copies kept would be 45 MiB
