"""Device placement (loader/device.py): `--device cuda` without CUDA fails clearly at every entry point, the "auto"
dtype on CUDA, and GGUF weights dequantized at load (the CUDA placement) computing what the quantized path does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoglm.commands.serve import run as serve_run
from autoglm.errors import ConfigError
from autoglm.layers.attention import AttentionContext
from autoglm.layers.linear.gguf import GGUFEmbedding, GGUFLinear
from autoglm.llm import LLM
from autoglm.loader.device import accelerator_dtype, check_device, dense_gguf
from autoglm.loader.gguf import load_gguf
from autoglm.server.config import ServerConfig


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_check_device_without_cuda_names_the_build(no_cuda: None) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available") as e:
        check_device("cuda")
    assert torch.__version__ in e.value.message and "--device cpu" in e.value.message
    assert check_device("cpu") == torch.device("cpu")


def test_check_device_index_and_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"only 2 CUDA device\(s\)"):
        check_device("cuda:2")
    with pytest.raises(ConfigError, match="not a device"):
        check_device("gpu0")


def test_entry_points_refuse_cuda_without_it(no_cuda: None, tiny_gemma3_gguf: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        LLM(tiny_gemma3_gguf, device="cuda")
    with pytest.raises(ConfigError, match=r"device\['vision'\]"):
        LLM(tiny_gemma3_gguf, device={"decoder": "cpu", "vision": "cuda"})
    with pytest.raises(ConfigError, match="CUDA is not available"):
        ServerConfig(model=str(tiny_gemma3_gguf), device="cuda:0")
    import argparse

    rc = serve_run(argparse.Namespace(model=str(tiny_gemma3_gguf), model_pos=None, device="cuda"))
    assert rc != 0
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_auto_dtype_and_dense_policy() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert accelerator_dtype(cuda) is torch.bfloat16
    assert accelerator_dtype(cuda, torch.float16) is torch.float16
    assert accelerator_dtype(cuda, torch.float32) is torch.bfloat16
    assert accelerator_dtype(cpu, torch.float16) is None
    assert dense_gguf(cuda) and not dense_gguf(cpu)
    assert dense_gguf(cpu, True) and not dense_gguf(cuda, False)


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    pos = model.prompt_positions(len(ids), ()).span(0, len(ids))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), pos, AttentionContext.no_cache([len(ids)])))


def test_dequantized_gguf_equals_the_quantized_path(tiny_gemma3_gguf_q8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_GGUF_KERNELS", "0")  # the torch reference: exact dequantization per matmul (the
    # CPU kernels quantize activations to int8, a documented, larger tolerance)
    quant = load_gguf(tiny_gemma3_gguf_q8).decoder
    dense = load_gguf(tiny_gemma3_gguf_q8, dequantize=True).decoder
    assert any(isinstance(m, GGUFLinear) for m in quant.modules())
    assert not any(isinstance(m, GGUFLinear | GGUFEmbedding) for m in dense.modules())
    assert all(p.is_floating_point() for p in dense.parameters())
    ids = [2, 17, 5, 40, 9, 3, 11]
    ref = _logits(quant, ids)
    torch.testing.assert_close(_logits(dense, ids), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_dense_bf16_gguf_is_all_bf16_and_close(tiny_glm4_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `--device cuda` loads (dense, bfloat16) on a LLaMA-style norm (weight * x in x's dtype): a float32 norm
    weight there would promote the hidden states and break the next bf16 matmul."""
    monkeypatch.setenv("AUTOGLM_GGUF_KERNELS", "0")
    ref_model = load_gguf(tiny_glm4_gguf).decoder
    loaded = load_gguf(tiny_glm4_gguf, dtype="bfloat16", dequantize=True)
    assert {p.dtype for p in loaded.decoder.parameters()} == {torch.bfloat16}
    ids = [3, 8, 1, 30, 12, 7]
    ref = _logits(ref_model, ids)
    err = float((_logits(loaded.decoder, ids).float() - ref).abs().max() / ref.abs().max())
    assert err < 3e-2, err  # bf16 rounding of weights and activations
    llm = LLM(loaded, attention_backend="cuda_sdpa", block_size=4)
    try:
        out = llm.generate(ids, max_tokens=6, temperature=0.0, ignore_eos=True)
    finally:
        llm.close()
    assert len(out.token_ids) == 6
