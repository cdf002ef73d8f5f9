"""The shared model-test harness: a tiny random transformers checkpoint per architecture, and one oracle run.

`tiny_checkpoint(hf_model_cls, hf_config_cls, path, **config)` writes a complete HF directory (random weights with
spread, the tiny GLM-style BPE tokenizer of tests/fixtures/tokenizer.py, generation_config.json).
`check_architecture(path, hf_model_cls)` loads it with `load_hf` and asserts, against transformers in float32:
  1. logits of single and packed sequences (no cache) within RTOL x max|logit|, packed == each alone;
  2. cache == no cache through the real engine (`LLM.score` with 4-token KV blocks and an 8-token step budget, so
     prefill is chunked and later chunks attend over the paged cache);
  3. greedy decoding of a batch of two prompts (engine prefill + paged decode) == transformers' greedy tokens.
An architecture's test file is then a few configs and one call (see test_llama_parity.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autoglm.engine.prompt import PromptInputs
from autoglm.engine.sampling_params import SamplingParams
from autoglm.layers.attention import AttentionContext
from autoglm.llm import LLM
from autoglm.loader.hf import load_hf
from tests.fixtures.models import _randomize, _vocab_size, _write_tokenizer

RTOL = 1e-4  # of max|logit|
GREEDY_TOKENS = 12


def tiny_checkpoint(hf_model_cls: type, hf_config_cls: type, path: Path, *, seed: int = 0, **config: Any) -> Path:
    """Write a tiny random `hf_model_cls` checkpoint (float32 safetensors + tokenizer) at `path`."""
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = _write_tokenizer(path)
    vocab = _vocab_size(path, specials)
    eos = specials["<|endoftext|>"] if specials else vocab - 1
    cfg = hf_config_cls(vocab_size=vocab, max_position_embeddings=512, eos_token_id=eos, pad_token_id=eos, **config)
    torch.manual_seed(seed)
    model = hf_model_cls(cfg).eval()
    _randomize(model, seed)
    with torch.no_grad():  # soften attention a little: one-hot attention makes greedy tokens chaotic
        for name, p in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.mul_(0.5)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(eos_token_id=eos, pad_token_id=eos).save_pretrained(path)
    return path


def prompts(vocab: int, lens: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lens]


def uncached_logits(model: nn.Module, seqs: list[Tensor]) -> list[Tensor]:
    """Our logits of `seqs` packed into one no-cache forward: per-sequence [n, vocab]."""
    pos = [model.prompt_positions(s.shape[0], ()).span(0, s.shape[0]) for s in seqs]
    ctx = AttentionContext.no_cache([s.shape[0] for s in seqs])
    with torch.inference_mode():
        out = model.compute_logits(model(torch.cat(seqs), torch.cat(pos, dim=-1), ctx))
    return list(out.split([s.shape[0] for s in seqs]))


def hf_logits(hf: nn.Module, ids: Tensor) -> Tensor:
    with torch.inference_mode():
        return hf(input_ids=ids[None]).logits[0].float()


def rel_err(ours: Tensor, ref: Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def assert_close(ours: Tensor, ref: Tensor, rtol: float = RTOL) -> None:
    err = rel_err(ours, ref)
    assert err <= rtol, f"max |diff| / max|logit| = {err:.3g} > {rtol}"


def hf_greedy(hf: nn.Module, ids: Tensor, n: int) -> list[int]:
    """transformers' greedy tokens as full forwards (the reference semantics; its generate() cache paths drifted
    from its own forward on tiny sliding-window configs in 5.23)."""
    seq = ids[None]
    with torch.inference_mode():
        for _ in range(n):
            seq = torch.cat([seq, hf(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, ids.shape[0] :].tolist()


def check_architecture(path: Path, hf_model_cls: type) -> dict[str, float]:
    """Run the whole oracle on one checkpoint directory; -> the measured relative errors (for reports)."""
    loaded = load_hf(path, dtype="float32")
    ours = loaded.decoder
    hf = hf_model_cls.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.position_rows in (1, 3)
    errs: dict[str, float] = {}
    # 1. no cache: alone and packed
    a, b, c = prompts(ours.vocab_size, (1, 11, 23))
    packed = uncached_logits(ours, [a, b, c])
    for ids, got in zip((a, b, c), packed, strict=True):
        ref = hf_logits(hf, ids)
        assert_close(uncached_logits(ours, [ids])[0], ref)
        assert_close(got, ref)
        errs["uncached"] = max(errs.get("uncached", 0.0), rel_err(got, ref))
    # 2. cache == no cache through the engine's paged KV cache (chunked prefill over 4-token blocks)
    llm = LLM(loaded, block_size=4, max_num_batched_tokens=8, max_model_len=128)
    try:
        ids = prompts(ours.vocab_size, (19,), seed=1)[0]
        scored = llm.score(ids.tolist())
        assert_close(scored, hf_logits(hf, ids))
        errs["paged"] = rel_err(scored, hf_logits(hf, ids))
        # 3. greedy decode, batch of two (one engine step holds both), against transformers' greedy tokens
        p1, p2 = prompts(ours.vocab_size, (7, 13), seed=2)
        got = engine_greedy(llm.engine, [p1.tolist(), p2.tolist()], GREEDY_TOKENS)
        for p, tokens in zip((p1, p2), got, strict=True):
            assert tokens == hf_greedy(hf, p, GREEDY_TOKENS)
    finally:
        llm.close()
    return errs


def engine_greedy(engine: Any, prompts_ids: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens of several prompts run together through `Engine.add_request` / `step`."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts_ids):
        engine.add_request(f"r{i}", PromptInputs(token_ids=ids), params)
        out[f"r{i}"] = []
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[f"r{i}"] for i in range(len(prompts_ids))]
