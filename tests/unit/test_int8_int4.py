"""INT8 / INT4 weight-only linear layers: error bounds vs the float layer, exactness vs dequantize-then-matmul,
state_dict round trips through safetensors, and whole-model swaps / quantized checkpoints on a tiny GLM-4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from autoglm.layers.attention import AttentionContext
from autoglm.layers.linear.int4 import Int4Linear, quantize_int4, unpack_nibbles
from autoglm.layers.linear.int8 import PACKED_MAX_ROWS, Int8Linear, quantize_int8
from autoglm.quant.apply import (
    QuantSpec,
    apply_quantization,
    finalize_quantization,
    quantization_from_config,
    quantized_bytes,
)
from autoglm.tools.quantize import quantize_hf_checkpoint

BF16_EPS = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)


def _dense(in_f: int, out_f: int, bias: bool, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin


def _x(rows: int, in_f: int, seed: int = 0) -> Tensor:
    return torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed))


def _compute_slack(x: Tensor, w: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """Bound on what half-precision activations + output rounding add: ~eps * (|x| @ |w|.T) per output."""
    if compute_dtype == torch.float32:
        return 1e-5 * (1 + x.abs() @ w.abs().T)
    return 3 * BF16_EPS * (x.abs() @ w.abs().T) + 1e-6


# --- INT8 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 5, PACKED_MAX_ROWS + 40])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_int8_within_quantization_bound(rows: int, compute_dtype: torch.dtype) -> None:
    lin = _dense(128, 48, True, seed=1)
    q = Int8Linear.from_linear(lin, compute_dtype=compute_dtype)
    x = _x(rows, 128)
    y, ref = q(x), lin(x)
    # |w - w_hat| <= scale/2 per element  =>  |y - ref| <= |x|_1 * scale_n / 2 (+ compute rounding)
    bound = x.abs().sum(-1, keepdim=True) * q.scales[None, :] / 2 + _compute_slack(x, lin.weight, compute_dtype)
    assert torch.all((y - ref).abs() <= bound)
    assert (q.dequantize() - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-7


@pytest.mark.parametrize("rows", [1, 7, PACKED_MAX_ROWS + 40])
def test_int8_matches_dequantize_then_matmul(rows: int) -> None:
    lin = _dense(96, 64, False, seed=2)
    x = _x(rows, 96, seed=3)
    exact = Int8Linear.from_linear(lin, compute_dtype=torch.float32)
    w = exact.dequantize()
    torch.testing.assert_close(exact(x), F.linear(x, w), rtol=1e-5, atol=1e-6)
    fast = Int8Linear.from_linear(lin)  # bfloat16 kernels: compare with the bf16-rounded input in float32
    ref = F.linear(x.bfloat16().float(), w)
    assert torch.all((fast(x) - ref).abs() <= 2 * BF16_EPS * (x.abs() @ w.abs().T) + 1e-6)


def test_int8_quantizer_edge_cases() -> None:
    w = torch.zeros(4, 8)
    w[1, 3] = -2.0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and torch.all(q[0] == 0) and s[0] == 1.0
    assert q[1, 3] == -127 and torch.isclose(s[1], torch.tensor(2.0 / 127))


# --- INT4 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16 -> dequantize fallback path
def test_int4_within_quantization_bound(group_size: int, out_features: int) -> None:
    lin = _dense(256, out_features, True, seed=4)
    q = Int4Linear.from_linear(lin, group_size=group_size)
    assert q.kernel_ok == (out_features % 16 == 0)
    w_hat = q.dequantize()
    sz = q.scales_and_zeros.float()  # [K/G, N, 2]
    scale = sz[..., 0].T.repeat_interleave(group_size, dim=1)  # [N, K]
    zero = sz[..., 1].T.repeat_interleave(group_size, dim=1)
    # scale/2 from rounding, plus the bfloat16 rounding of zero and of the range end (8 * scale)
    per_elem = scale / 2 + BF16_EPS * (zero.abs() + 8 * scale)
    assert torch.all((w_hat - lin.weight).abs() <= per_elem + 1e-7)
    for rows in (1, 9, 200):
        x = _x(rows, 256, seed=rows)
        bound = x.abs() @ per_elem.T + _compute_slack(x, lin.weight, torch.bfloat16)
        assert torch.all((q(x) - lin(x)).abs() <= bound)


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_matches_dequantize_then_matmul(group_size: int) -> None:
    lin = _dense(256, 64, False, seed=5)
    q = Int4Linear.from_linear(lin, group_size=group_size)
    w = q.dequantize()
    for rows in (1, 3, 150):
        x = _x(rows, 256, seed=10 + rows)
        ref = F.linear(x.bfloat16().float(), w)
        assert torch.all((q(x) - ref).abs() <= 2 * BF16_EPS * (x.abs() @ w.abs().T) + 1e-6)
    exact = Int4Linear.from_linear(lin, group_size=group_size, compute_dtype=torch.float32)
    x = _x(4, 256)
    torch.testing.assert_close(exact(x), F.linear(x, w), rtol=1e-5, atol=1e-6)


def test_int4_packed_form_reads_back_exactly() -> None:
    lin = _dense(128, 80, False, seed=6)  # 80 rows: torch's kernel layout has a tail block
    q = Int4Linear.from_linear(lin, group_size=32)
    portable = q.qweight.detach().clone()
    ints = unpack_nibbles(portable)
    q.prepare()
    assert q.qweight is None and q.weight_packed is not None
    assert torch.equal(q.int_weight(), ints)
    assert torch.equal(q.state_dict()["qweight"], portable)
    assert "weight_packed" not in q.state_dict()
    # held bytes: one 4-bit copy + scales, not both forms
    assert q.nbytes == q.weight_packed.numel() + q.scales_and_zeros.numel() * 2


def test_int4_quantizer_nibble_order() -> None:
    w = torch.arange(64, dtype=torch.float32).reshape(1, 64).repeat(16, 1)
    qweight, _ = quantize_int4(w, 32)
    ints = unpack_nibbles(qweight)
    assert ints.shape == (16, 64) and ints[0, 0] == 0 and ints[0, 31] == 15 and ints[0, 32] == 0
    assert torch.equal(qweight[:, 0], (ints[:, 0] | (ints[:, 1] << 4)).to(torch.uint8))


# --- state dict round trips -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_state_dict_roundtrip_through_safetensors(kind: str, tmp_path: Path) -> None:
    lin = _dense(128, 32, True, seed=7)
    if kind == "int8":
        q: nn.Module = Int8Linear.from_linear(lin)
        fresh: nn.Module = Int8Linear(128, 32, bias=True)
    else:
        q = Int4Linear.from_linear(lin, group_size=64)
        fresh = Int4Linear(128, 32, bias=True, group_size=64)
    x = _x(3, 128)
    y = q(x)  # int4: after this the layer holds the packed form; its state_dict is still portable
    save_file(q.state_dict(), str(tmp_path / "q.safetensors"))
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    if kind == "int4":  # loading again into an already-packed layer also works
        fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


# --- whole models ---------------------------------------------------------------------------------------------------
def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    t = ids.numel()
    positions = torch.arange(t)
    if getattr(model, "uses_mrope", False):
        positions = positions.expand(3, t)
    with torch.inference_mode():
        hidden = model(ids, positions, AttentionContext.no_cache([t]))
        return model.compute_logits(hidden)


def _ids(vocab: int, n: int = 24) -> Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_apply_quantization_on_tiny_glm4(tiny_glm4_dir: Path, mode: str) -> None:
    from autoglm.layers.linear import Linear
    from autoglm.loader.hf import load_hf

    ref_model = load_hf(tiny_glm4_dir, dtype="float32").decoder
    model = load_hf(tiny_glm4_dir, dtype="float32").decoder
    ids = _ids(ref_model.vocab_size)
    ref = _logits(ref_model, ids)
    apply_quantization(model, mode)
    finalize_quantization(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear" not in kinds and not any(isinstance(m, (Linear, nn.Linear)) for m in model.modules())
    if mode == "int4":
        assert isinstance(model.lm_head, Int8Linear)  # logits layer kept at 8 bits
    out = _logits(model, ids)
    rel = (out - ref).norm() / ref.norm()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    # yardstick: the same model run in bfloat16 (8-bit mantissa, like int8's 8-bit levels)
    bf16 = _logits(load_hf(tiny_glm4_dir, dtype="bfloat16").decoder, ids)
    rel_bf16 = (bf16 - ref).norm() / ref.norm()
    print(f"{mode}: relative logits error {rel:.4f} (bf16 model {rel_bf16:.4f}), top-1 agreement {agree:.3f}")
    # a wrong swap (layout, scales, transposition) gives errors of order 1
    assert rel < (2.0 * rel_bf16 if mode == "int8" else 0.5)
    assert agree >= (0.8 if mode == "int8" else 0.5)
    sizes = quantized_bytes(model)
    assert sizes[mode] > 0


def test_quantized_checkpoint_loads_by_metadata(tiny_glm4_dir: Path, tmp_path: Path) -> None:
    """`quantize_hf_checkpoint` output + the loader-side recipe (meta build, apply the recorded spec, fill by name)
    gives exactly the model quantized in memory."""
    from autoglm.loader.hf import iter_safetensors, load_hf, safetensors_files
    from autoglm.loader.weights import fill_parameters
    from autoglm.models.registry import hf_spec

    out = tmp_path / "q4"
    written = quantize_hf_checkpoint(tiny_glm4_dir, out, "int4", group_size=32, shard_bytes=20_000)
    assert written["int4"] > 0 and written["int8"] > 0  # lm_head int8
    config = json.loads((out / "config.json").read_text())
    spec = quantization_from_config(config)
    assert spec is not None and spec.mode == "int4" and spec.module_formats == {"lm_head": "int8"}
    assert (out / "model.safetensors.index.json").is_file()  # small shard size forced several shards
    assert (out / "tokenizer.json").is_file() == (tiny_glm4_dir / "tokenizer.json").is_file()

    model_spec = hf_spec(config)
    with torch.device("meta"):
        model = model_spec.build(config, False)
    apply_quantization(model, spec)
    fill_parameters(model, iter_safetensors(safetensors_files(out)), source=str(out), dtype=torch.float32)
    finalize_quantization(model)

    mem = load_hf(tiny_glm4_dir, dtype="float32").decoder
    apply_quantization(mem, "int4", group_size=32)
    ids = _ids(mem.vocab_size)
    torch.testing.assert_close(_logits(model, ids), _logits(mem, ids), rtol=0, atol=0)


def test_quant_spec_validation() -> None:
    from autoglm.errors import ConfigError, UnsupportedQuantType

    with pytest.raises(UnsupportedQuantType, match="int3"):
        QuantSpec(mode="int3")
    with pytest.raises(UnsupportedQuantType, match="group size"):
        QuantSpec(mode="int4", group_size=48)
    with pytest.raises(ConfigError, match="quant_method"):
        quantization_from_config({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    spec = QuantSpec(mode="int8", skip_modules=("visual.",), module_formats={"model.layers.0": "none"})
    assert spec.format_for("visual.blocks.0.attn.qkv") == "none"
    assert spec.format_for("model.layers.0.mlp.down_proj") == "none"
    assert spec.format_for("model.layers.1.mlp.down_proj") == "int8"
    assert QuantSpec.from_config(spec.to_config()) == spec


def test_int8_misaligned_weight_is_realigned() -> None:
    """torch's int8 kernel over-reads from weights not 64-byte aligned (mmap'd files); the layer copies them once."""
    lin = _dense(64, 400, False, seed=8)
    q = Int8Linear.from_linear(lin)
    buf = torch.empty(q.weight.numel() + 8, dtype=torch.int8)
    start = (64 - buf.data_ptr() % 64) % 64 + 8  # 8 bytes past a 64-byte boundary, like a safetensors offset
    buf = torch.empty(q.weight.numel() + start, dtype=torch.int8)
    start = (64 - buf.data_ptr() % 64) % 64 + 8
    view = buf[start : start + q.weight.numel()].view_as(q.weight)
    view.copy_(q.weight)
    x = _x(24, 64)
    y = q(x)
    q.weight = nn.Parameter(view, requires_grad=False)
    assert q.weight.data_ptr() % 64 == 8
    torch.testing.assert_close(q(x), y, rtol=0, atol=0)
    assert q.weight.data_ptr() % 64 == 0
