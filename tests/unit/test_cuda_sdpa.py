"""The CUDA SDPA attention backend, run on the CPU (same code, SDPA's CPU kernels) against the torch reference:
directly on paged caches (GQA, sliding windows, scattered blocks, cached prefixes) and through the real engine on
tiny checkpoints (chunked-prefill logits and batched greedy tokens). Where torch sees a GPU the same tests also
run on CUDA (benchmarks/gpu_check.sh runs them there); elsewhere that parameter does not exist (no skip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoglm.config import EngineConfig
from autoglm.errors import InvalidRequest
from autoglm.layers.attention import (
    Attention,
    AttentionContext,
    CudaSdpaBackend,
    TorchRefBackend,
    make_backend,
)
from autoglm.llm import LLM
from autoglm.loader.hf import load_hf
from tests.models.harness import assert_close, engine_greedy, prompts, tiny_checkpoint

BLOCK = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {"cpu": 1e-5, "cuda": 1e-4}  # float32; CUDA kernels reduce in other orders


def _pair(layer: Attention, device: str = "cpu", num_blocks: int = 16) -> tuple[CudaSdpaBackend, TorchRefBackend]:
    kw = dict(num_blocks=num_blocks, block_size=BLOCK, dtype=torch.float32, device=device)
    return CudaSdpaBackend([layer], **kw), TorchRefBackend([layer], **kw)


def _ctx(backend: object, qlens: list[int], clens: list[int], tables: list[list[int]],
         device: str = "cpu") -> AttentionContext:
    slots = []
    for ql, cl, t in zip(qlens, clens, tables, strict=True):
        slots += [t[p // BLOCK] * BLOCK + p % BLOCK for p in range(cl - ql, cl)]
    width = max(len(t) for t in tables)
    return AttentionContext(
        query_lens=qlens,
        context_lens=clens,
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], device=device),
        backend=backend,  # type: ignore[arg-type]
    )


def _step(backends: tuple, layer: Attention, qlens: list[int], clens: list[int], tables: list[list[int]],
          g: torch.Generator, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    t = sum(qlens)
    q = torch.randn(t, layer.num_heads, layer.head_dim, generator=g).to(device)
    k = torch.randn(t, layer.num_kv_heads, layer.head_dim, generator=g).to(device)
    v = torch.randn(t, layer.num_kv_heads, layer.head_dim, generator=g).to(device)
    outs = []
    for b in backends:
        ctx = _ctx(b, qlens, clens, tables, device)
        b.prepare(ctx)
        outs.append(b.forward(q, k, v, layer, ctx))
    return outs[0], outs[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv,window", [(4, 2, None), (4, 4, None), (6, 2, 5), (2, 1, 3)])
def test_prefill_then_decode_matches_reference(heads: int, kv: int, window: int | None, device: str) -> None:
    layer = Attention(heads, kv, 8, 8**-0.5, sliding_window=window)
    backends = _pair(layer, device)
    g = torch.Generator().manual_seed(0)
    tables = [[3, 9, 1, 4], [7, 2, 11]]  # scattered blocks: the gathers must follow the tables
    # a first chunk, then a second chunk attending over the cached prefix (lower-right causal), then decode steps
    got, ref = _step(backends, layer, [6, 5], [6, 5], tables, g, device)
    torch.testing.assert_close(got, ref, rtol=TOL[device], atol=TOL[device])
    got, ref = _step(backends, layer, [4, 3], [10, 8], tables, g, device)
    torch.testing.assert_close(got, ref, rtol=TOL[device], atol=TOL[device])
    for n in range(3):
        got, ref = _step(backends, layer, [1, 1], [11 + n, 9 + n], tables, g, device)
        torch.testing.assert_close(got, ref, rtol=TOL[device], atol=TOL[device])
    # the caches hold the same K/V
    for a, b in zip(backends[0].kv_cache(layer), backends[1].kv_cache(layer), strict=True):
        assert torch.equal(a, b)


def test_decode_of_one_sequence_and_missing_lengths() -> None:
    layer = Attention(4, 2, 8, 0.3)
    backends = _pair(layer)
    g = torch.Generator().manual_seed(1)
    _step(backends, layer, [7], [7], [[5, 2]], g)
    got, ref = _step(backends, layer, [1], [8], [[5, 2]], g)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ctx = _ctx(backends[0], [1], [9], [[5, 2, 6]])  # prepare() not called: no device lengths
    x = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="memo"):
        backends[0].forward(x, x[:, :2], x[:, :2], layer, ctx)


def test_make_backend_kinds() -> None:
    layers = [Attention(2, 1, 8, 0.3)]
    kw = dict(num_blocks=2, block_size=BLOCK, dtype=torch.float32)
    assert isinstance(make_backend(layers, **kw, kind="cuda_sdpa"), CudaSdpaBackend)
    assert type(make_backend(layers, **kw, kind="torch")) is TorchRefBackend
    assert not isinstance(make_backend(layers, **kw), CudaSdpaBackend)  # auto on the CPU
    with pytest.raises(ValueError, match="attention backend"):
        make_backend(layers, **kw, kind="flash")
    with pytest.raises(InvalidRequest, match="attention_backend must be one of auto, cuda_sdpa, torch"):
        EngineConfig.from_sources({"attention_backend": "flash"})


def _engine_run(loaded: object, backend: str, vocab: int) -> tuple[torch.Tensor, list[list[int]]]:
    llm = LLM(loaded, block_size=BLOCK, max_num_batched_tokens=8, max_model_len=128, attention_backend=backend)
    try:
        assert type(llm.engine.runner.backend) is (CudaSdpaBackend if backend == "cuda_sdpa" else TorchRefBackend)
        scored = llm.score(prompts(vocab, (19,), seed=1)[0].tolist())  # chunked prefill over the paged cache
        batch = [p.tolist() for p in prompts(vocab, (7, 13, 3), seed=2)]
        return scored, engine_greedy(llm.engine, batch, 12)
    finally:
        llm.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-window"])
def test_engine_matches_torch_reference(tmp_path: Path, arch: str, device: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if arch == "llama-gqa":
        path = tiny_checkpoint(LlamaForCausalLM, LlamaConfig, tmp_path, **common)
    else:
        path = tiny_checkpoint(MistralForCausalLM, MistralConfig, tmp_path, sliding_window=5, **common)
    loaded = load_hf(path, dtype="float32", device=device)
    vocab = loaded.decoder.vocab_size
    ref_logits, ref_tokens = _engine_run(loaded, "torch", vocab)
    got_logits, got_tokens = _engine_run(loaded, "cuda_sdpa", vocab)
    assert_close(got_logits, ref_logits, rtol=TOL[device])
    assert got_tokens == ref_tokens
    assert all(len(t) == 12 for t in got_tokens)
