"""GGUFLinear / GGUFEmbedding: same results as the float layers on the dequantized weight, raw bytes in memory."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import autoglm.layers.linear.gguf as gl
from autoglm.errors import UnsupportedQuantType, WeightMismatch
from autoglm.gguf.quants import dequantize, quantize
from autoglm.layers.linear.gguf import GGUFEmbedding, GGUFLinear

Q = GGMLQuantizationType
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
OUT, IN = 24, 512


# Modules built without `impl=` compute with the reference kernels: these tests pin that exact dequantize-then-matmul
# path whatever was loaded before; the CPU kernels are tested against their own tolerance in test_gguf_kernels.py.


@pytest.fixture(scope="module")
def float_weight() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((OUT, IN)) * 0.05).astype(np.float32)


def _module_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_linear_equals_float_linear_on_dequantized_weight(
    float_weight: np.ndarray, qtype: GGMLQuantizationType
) -> None:
    raw = quantize(float_weight, qtype)
    bias = torch.randn(OUT)
    lin = GGUFLinear.from_raw(raw, qtype, (OUT, IN), bias=bias, name="blk.0.ffn_up.weight")
    w = dequantize(raw, qtype, (OUT, IN))
    x = torch.randn(2, 5, IN)
    torch.testing.assert_close(lin(x), F.linear(x, w, bias), rtol=0, atol=0)
    # the weight the layer computes with is gguf's own dequantization of the bytes
    oracle = raw.view(np.float32) if qtype == Q.F32 else raw.view(np.float16) if qtype == Q.F16 else raw
    assert np.array_equal(lin.dequantized_weight().numpy(), gguf.quants.dequantize(oracle, qtype))
    # memory-honest: the module holds the file's bytes (+ bias), no float copy of the weight
    assert lin.weight.dtype == torch.uint8 and lin.weight.numel() == raw.nbytes
    assert lin.nbytes == raw.nbytes + OUT * 4 == _module_bytes(lin)
    assert lin.in_features == IN and lin.out_features == OUT and "qtype=" in repr(lin)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
def test_linear_chunked_matmul(
    float_weight: np.ndarray, qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # big weights are decoded a slab of rows at a time; the result must not change
    raw = quantize(float_weight, qtype)
    bias = torch.randn(OUT)
    lin = GGUFLinear.from_raw(raw, qtype, (OUT, IN), bias=bias)
    x = torch.randn(3, IN)
    want = F.linear(x, dequantize(raw, qtype, (OUT, IN)), bias)
    monkeypatch.setattr(gl, "_MATMUL_CHUNK_ELEMENTS", IN * 5)  # 5 rows per slab, last slab partial
    torch.testing.assert_close(lin(x), want, rtol=1e-6, atol=1e-6)
    assert lin(torch.randn(0, IN)).shape == (0, OUT)


def test_linear_bf16_activations(float_weight: np.ndarray) -> None:
    raw = quantize(float_weight, Q.Q6_K)
    lin = GGUFLinear.from_raw(raw, Q.Q6_K, (OUT, IN))
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, dequantize(raw, Q.Q6_K, (OUT, IN)).bfloat16()))


def test_linear_fills_from_meta_like_the_loader(float_weight: np.ndarray) -> None:
    # built on meta, filled by name with assign=True: the generic loader path
    raw = quantize(float_weight, Q.Q5_K)
    lin = GGUFLinear(IN, OUT, Q.Q5_K, bias=True, device="meta")
    assert lin.weight.shape == raw.shape and lin.weight.dtype == torch.uint8
    bias = torch.randn(OUT)
    lin.load_state_dict({"weight": torch.from_numpy(raw), "bias": bias}, assign=True)
    x = torch.randn(3, IN)
    torch.testing.assert_close(lin(x), F.linear(x, dequantize(raw, Q.Q5_K, (OUT, IN)), bias), rtol=0, atol=0)


def test_linear_wraps_memmap_without_copy(float_weight: np.ndarray, tmp_path) -> None:
    raw = quantize(float_weight, Q.Q4_0)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    lin = GGUFLinear.from_raw(mm, Q.Q4_0, (OUT, IN))
    assert lin.weight.data_ptr() == mm.ctypes.data  # a view of the mapping, not a copy
    torch.testing.assert_close(lin(torch.ones(1, IN)), F.linear(torch.ones(1, IN), dequantize(raw, Q.Q4_0, (OUT, IN))))


def test_linear_errors_name_tensor_and_type(float_weight: np.ndarray) -> None:
    with pytest.raises(UnsupportedQuantType) as e:
        GGUFLinear(256, 4, Q.IQ2_XXS, name="blk.7.attn_q.weight")
    assert "IQ2_XXS" in str(e.value) and "blk.7.attn_q.weight" in str(e.value)
    raw = quantize(float_weight, Q.Q8_0)
    with pytest.raises(WeightMismatch, match="blk.1.ffn_down.weight"):
        GGUFLinear.from_raw(raw[:-1], Q.Q8_0, (OUT, IN), name="blk.1.ffn_down.weight")
    with pytest.raises(UnsupportedQuantType, match="block size"):
        GGUFLinear(100, 4, Q.Q4_K, name="odd")


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_0], ids=lambda t: t.name)
def test_embedding_rows_equal_dequantized_rows(
    float_weight: np.ndarray, qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = quantize(float_weight, qtype)
    emb = GGUFEmbedding.from_raw(raw, qtype, (OUT, IN), name="token_embd.weight")
    table = dequantize(raw, qtype, (OUT, IN))
    ids = torch.tensor([[3, 0, 23], [3, 7, 1]])
    decoded: list[int] = []
    real = gl.dequantize_blocks

    def spy(blocks: torch.Tensor, qt: GGMLQuantizationType) -> torch.Tensor:
        decoded.append(blocks.shape[0])
        return real(blocks, qt)

    monkeypatch.setattr(gl, "dequantize_blocks", spy)
    out = emb(ids)
    assert out.shape == (2, 3, IN) and out.dtype == torch.float32
    assert torch.equal(out, table[ids])
    # only the looked-up rows were decoded
    assert sum(decoded) == ids.numel() * IN // GGML_QUANT_SIZES[qtype][0]
    # tied output head: hidden @ table.T
    h = torch.randn(4, IN)
    torch.testing.assert_close(emb.as_logits(h), h @ table.T)
    assert emb.nbytes == raw.nbytes == _module_bytes(emb)


def test_embedding_fills_from_meta_and_dtype(float_weight: np.ndarray) -> None:
    raw = quantize(float_weight, Q.Q8_0)
    emb = GGUFEmbedding(OUT, IN, Q.Q8_0, device="meta", dtype=torch.bfloat16)
    emb.load_state_dict({"weight": torch.from_numpy(raw)}, assign=True)
    out = emb(torch.tensor([5]))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), dequantize(raw, Q.Q8_0, (OUT, IN))[5:6].bfloat16().float())
