"""n choices of one prompt share its KV blocks (prefix cache), and grammar-constrained and free requests share a
batch — on the engine directly with the built-in Qwen2.5-Coder-0.5B (the server's n > 1 is these n requests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.builtins import default_model_path
from autoglm.config import EngineConfig
from autoglm.engine.engine import Engine
from autoglm.engine.grammar import GrammarCompiler, GrammarSpec
from autoglm.engine.prompt import build_text_prompt
from autoglm.engine.sampling_params import SamplingParams
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    path = default_model_path()
    if not Path(path).exists():
        pytest.skip(f"the built-in model is not installed at {path}")
    return load_model(str(path))


def _run(engine: Engine) -> tuple[dict[str, str], dict[str, str], int]:
    """Step to the end: (text, finish reason) per request and the most KV blocks in use at once."""
    text: dict[str, str] = {}
    reasons: dict[str, str] = {}
    peak = 0
    while engine.has_unfinished():
        for out in engine.step():
            text[out.request_id] = text.get(out.request_id, "") + out.content_delta
            assert out.error is None, out.error
            if out.finished:
                reasons[out.request_id] = out.finish_reason or ""
        peak = max(peak, engine.stats()["kv_blocks_used"])
    return text, reasons, peak


def test_four_choices_share_the_prompt_blocks(model: LoadedModel) -> None:
    engine = Engine(model, EngineConfig(enable_prefix_caching=True, kv_cache_tokens=4096, max_model_len=2048))
    prompt = build_text_prompt(model, "def fibonacci(n):\n    " + "# compute the sequence carefully\n    " * 12)
    n_prompt = len(prompt.token_ids)
    block = engine.stats()["kv_block_size"]
    for i in range(4):
        engine.add_request(f"c{i}", prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=i))
    _, reasons, peak = _run(engine)
    assert set(reasons) == {"c0", "c1", "c2", "c3"}
    unshared = 4 * -(-(n_prompt + 3) // block)  # blocks four private copies would hold
    assert peak < unshared
    assert engine.stats()["prefix_cache_hit_tokens"] >= 3 * ((n_prompt - 1) // block) * block
    engine.close()


def test_constrained_and_free_requests_share_a_batch(model: LoadedModel) -> None:
    engine = Engine(model, EngineConfig(kv_cache_tokens=2048, max_model_len=1024))
    compiler = GrammarCompiler(model.tokenizer, vocab_size=model.decoder.vocab_size,
                               eos_token_ids=model.eos_token_ids)
    grammar = compiler.compile(GrammarSpec.choice(["sunny", "rainy", "foggy"]))
    prompt = build_text_prompt(model, "The weather today is")
    engine.add_request("free", prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=1, ignore_eos=True))
    for i in range(3):
        engine.add_request(f"g{i}", prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=i, grammar=grammar))
    text, reasons, _ = _run(engine)
    for i in range(3):
        assert text[f"g{i}"] in ("sunny", "rainy", "foggy")
        assert reasons[f"g{i}"] == "stop"
    assert reasons["free"] == "length"
    engine.close()
