"""GGUF fast kernels (`CpuKernels`): bit-exact dequantization, decode kernel within the int8-activation error bound,
prefill path equal to the float GEMM, dispatch through GGUFLinear / GGUFEmbedding built with them (beside reference
modules in the same process), selection falling back to the reference when disabled.

Tolerance of the int8-activation decode kernel (derived, not tuned): activations are quantized per block of 32 as
x_q = d * round(x / d) with d = max|x_block| / 127, so |x - x_q| <= d / 2 elementwise and
|y - F.linear(x, W)| <= |W| @ (d / 2) (plus float32 summation slack); against F.linear(x_q, W) only float32
summation order differs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor

from autoglm.gguf.quants import dequantize, quantize
from autoglm.kernels import REFERENCE, select_kernels
from autoglm.kernels.cpu import cpu_kernels
from autoglm.kernels.cpu.ops import CpuKernels
from autoglm.layers.linear.gguf import GGUFBlockFormat, GGUFEmbedding, GGUFLinear

Q = GGMLQuantizationType
K_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
SIMPLE_TYPES = [Q.Q4_0, Q.Q5_0, Q.Q8_0]
SHAPES = {False: [(1, 32), (37, 96), (300, 640)], True: [(1, 256), (37, 512), (129, 768)]}  # (rows, cols)
TOKENS = [1, 3, 16, 17, 40]  # both sides of GEMV_MAX_ROWS


@pytest.fixture(scope="module")
def gk() -> CpuKernels:
    k = cpu_kernels()
    assert k is not None, "the C++ kernels must build on the test machine (g++ and ninja are installed)"
    return k


def _weights(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :16] = 0.0  # an all-zero run: zero scales must not produce NaN
    raw = torch.from_numpy(quantize(w, qtype))
    return raw, dequantize(raw, qtype, (rows, cols))


def _x(m: int, cols: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, cols, generator=g)
    x[0, :32] = 0.0  # an all-zero activation block
    return x


def _cases() -> list[tuple[GGMLQuantizationType, int, int]]:
    return [(q, r, c) for q in SIMPLE_TYPES + K_TYPES for r, c in SHAPES[q in K_TYPES]]


def _id(case: tuple[GGMLQuantizationType, int, int]) -> str:
    return f"{case[0].name}-{case[1]}x{case[2]}"


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_dequantize_is_bit_exact(gk: CpuKernels, case: tuple[GGMLQuantizationType, int, int]) -> None:
    qtype, rows, cols = case
    raw, w = _weights(qtype, rows, cols, seed=rows)
    got = gk.ext.dequantize(raw, int(qtype), cols, False)  # type: ignore[attr-defined]
    assert torch.equal(got, w)
    assert torch.equal(gk.ext.dequantize(raw, int(qtype), cols, True), w.bfloat16())  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_decode_kernel_within_activation_quantization_bound(
    gk: CpuKernels, case: tuple[GGMLQuantizationType, int, int]
) -> None:
    qtype, rows, cols = case
    raw, w = _weights(qtype, rows, cols, seed=cols)
    fmt = GGUFBlockFormat(qtype, rows, cols)
    for m in (1, 3, 16):
        x = _x(m, cols, seed=m)
        y = gk.gemv(x, raw, fmt)
        xq = gk.quantize_activations(x)
        # the kernel computes exactly W @ x_q (float32 summation order aside)
        scale = F.linear(xq.abs(), w.abs()) + 1e-6
        assert ((y - F.linear(xq, w)).abs() <= 2e-6 * scale).all()
        # x_q is within d/2 of x per element, d = max|block| / 127
        d = x.view(m, -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(m, cols) / 127
        assert ((x - xq).abs() <= d * (0.5 + 1e-5)).all()
        bound = F.linear(d * (0.5 + 1e-5), w.abs()) + 2e-6 * (F.linear(x.abs(), w.abs()) + 1e-6)
        err = (y - F.linear(x, w)).abs()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
        # float-activation variant (the non-VNNI fallback): no activation error
        torch.testing.assert_close(gk.gemv(x, raw, fmt, exact_activations=True), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_prefill_path_equals_float_gemm(gk: CpuKernels, case: tuple[GGMLQuantizationType, int, int]) -> None:
    qtype, rows, cols = case
    raw, w = _weights(qtype, rows, cols, seed=7)
    fmt = GGUFBlockFormat(qtype, rows, cols)
    x = _x(40, cols, seed=1)
    torch.testing.assert_close(gk.gemm(x, raw, fmt), F.linear(x, w), rtol=1e-5, atol=1e-5)
    # bfloat16 activations: a bfloat16 GEMM on the (rounded) weight
    xb = x.bfloat16()
    torch.testing.assert_close(gk.gemm(xb, raw, fmt), F.linear(xb, w.bfloat16()), rtol=2e-2, atol=2e-2)


def test_prefill_slabs_do_not_change_the_result(gk: CpuKernels) -> None:
    raw, w = _weights(Q.Q4_K, 37, 512, seed=3)
    fmt = GGUFBlockFormat(Q.Q4_K, 37, 512)
    x = _x(33, 512, seed=2)
    whole = gk.gemm(x, raw, fmt)
    small = CpuKernels(gk.ext, slab_elements=512 * 5)  # 5 rows per slab, the last one partial
    sliced = small.gemm(x, raw, fmt)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)  # GEMM blocking differs per slab
    torch.testing.assert_close(sliced, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", SIMPLE_TYPES + K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("exact", [False, True], ids=["int8_act", "float_act"])
def test_decode_kernel_rows_are_batch_independent(gk: CpuKernels, qtype: GGMLQuantizationType, exact: bool) -> None:
    # the multi-row kernel shares each weight block across a tile of rows; every row must still compute exactly
    # what it computes alone (same per-row arithmetic order), for every tile size and across tile boundaries
    rows, cols = (37, 512) if qtype in K_TYPES else (37, 96)
    raw, _ = _weights(qtype, rows, cols, seed=21)
    fmt = GGUFBlockFormat(qtype, rows, cols)
    x = _x(19, cols, seed=22)  # tiles of 8 + 8 + 3
    alone = torch.cat([gk.gemv(x[i : i + 1], raw, fmt, exact_activations=exact) for i in range(x.shape[0])])
    for m in (2, 3, 5, 8, 9, 16, 19):
        together = gk.gemv(x[:m], raw, fmt, exact_activations=exact)
        assert torch.equal(together, alone[:m]), f"{qtype.name} M={m}: rows differ from their M=1 results"


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_gguf_linear_dispatches_to_the_kernels(gk: CpuKernels, qtype: GGMLQuantizationType) -> None:
    rows, cols = 37, 512
    raw, w = _weights(qtype, rows, cols, seed=11)
    bias = torch.randn(rows)
    lin = GGUFLinear.from_raw(raw.numpy(), qtype, (rows, cols), bias=bias, name="blk.0.ffn_down.weight", impl=gk)
    ref = GGUFLinear.from_raw(raw.numpy(), qtype, (rows, cols), bias=bias)  # same blocks, reference kernels
    before = (lin.weight.data_ptr(), lin.nbytes, sorted(n for n, _ in lin.named_buffers()))
    g = torch.Generator().manual_seed(5)  # seeded: the 2e-2 bound below is loose but not every draw meets it
    for m in TOKENS:
        x = torch.randn(2, m, cols, generator=g)
        y = lin(x)
        assert y.shape == (2, m, rows) and y.dtype == torch.float32
        want = gk.matmul(x, lin.weight, lin.weight_format) + bias
        torch.testing.assert_close(y, want, rtol=0, atol=0)  # its kernels ran
        torch.testing.assert_close(y, F.linear(x, w, bias), rtol=2e-2, atol=2e-2)
        # the other module in this process keeps the exact reference path
        torch.testing.assert_close(ref(x), F.linear(x, w, bias), rtol=0, atol=0)
    # memory-honest: the layer still holds only the file's blocks, nothing repacked or cached
    assert (lin.weight.data_ptr(), lin.nbytes, sorted(n for n, _ in lin.named_buffers())) == before
    assert lin.weight.dtype == torch.uint8 and not lin.__dict__.get("_scales_cache")
    assert ref.impl is REFERENCE and lin.impl is gk


def test_tied_embedding_logits_use_the_kernel(gk: CpuKernels) -> None:
    vocab, dim = 301, 256
    raw, w = _weights(Q.Q8_0, vocab, dim, seed=5)
    emb = GGUFEmbedding.from_raw(raw, Q.Q8_0, (vocab, dim), impl=gk)
    h = torch.randn(1, 1, dim)
    logits = emb.as_logits(h)
    torch.testing.assert_close(logits, gk.gemv(h.view(1, dim), raw, emb.weight_format).view(1, 1, vocab))
    assert logits.argmax() == F.linear(gk.quantize_activations(h.view(1, dim)), w).argmax()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q2_K])
def test_embedding_rows_equal_the_reference_lookup(gk: CpuKernels, qtype: GGMLQuantizationType) -> None:
    # the C++ dequantizer behind take_rows (file order, and packed tables where the type packs) gives the reference's
    # rows bit for bit, in every dtype; Q2_K (no kernel) keeps the reference path
    vocab, dim = 70, 512
    raw, w = _weights(qtype, vocab, dim, seed=11)
    ids = torch.tensor([[3, 0, 69], [3, 41, 7]])
    fmt = GGUFBlockFormat(qtype, vocab, dim)
    tables = [(raw, fmt)]
    if gk.can_pack(fmt):
        tables.append((gk.pack(raw, fmt), replace(fmt, packed=True)))
    for table, f in tables:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = gk.take_rows(table, f, ids, dtype)
            assert got.dtype == dtype and torch.equal(got, w[ids.reshape(-1)].to(dtype)), (f.packed, dtype)
        assert torch.equal(gk.take_rows(table, f, None, torch.float32), w)
    emb = GGUFEmbedding.from_raw(raw, qtype, (vocab, dim), impl=gk)
    assert torch.equal(emb(ids), w[ids])


def test_bfloat16_activations_keep_their_dtype(gk: CpuKernels) -> None:
    raw, w = _weights(Q.Q6_K, 64, 256, seed=9)
    fmt = GGUFBlockFormat(Q.Q6_K, 64, 256)
    for m in (1, 40):
        x = torch.randn(m, 256).bfloat16()
        y = gk.matmul(x, raw, fmt)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), F.linear(x.float(), w), rtol=3e-2, atol=3e-2)


def test_unsupported_type_keeps_reference_path(gk: CpuKernels) -> None:
    # Q2_K has no fast kernel: a module built with the CPU kernels computes it on the reference path
    raw, w = _weights(Q.Q2_K, 8, 256, seed=1)
    lin = GGUFLinear.from_raw(raw, Q.Q2_K, (8, 256), impl=gk)
    x = torch.randn(1, 256)
    torch.testing.assert_close(lin(x), F.linear(x, w), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        gk.ext.gemv(torch.randn(1, 256), raw, int(Q.Q2_K), False)  # type: ignore[attr-defined]


def test_selection_prefers_cpu_kernels_unless_disabled_or_off_cpu(
    gk: CpuKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(select_kernels("cpu"), CpuKernels)
    assert select_kernels("cuda") is REFERENCE and select_kernels("meta") is REFERENCE
    monkeypatch.setenv("AUTOGLM_GGUF_KERNELS", "0")  # read at each selection: no process-wide state to reset
    assert select_kernels("cpu") is REFERENCE
    raw = quantize(np.ones((4, 32), dtype=np.float32), Q.Q8_0)
    lin = GGUFLinear.from_raw(raw, Q.Q8_0, (4, 32), impl=select_kernels("cpu"))
    x = torch.randn(1, 32)
    torch.testing.assert_close(lin(x), F.linear(x, dequantize(raw, Q.Q8_0, (4, 32))), rtol=0, atol=0)
