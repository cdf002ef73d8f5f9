"""Engine invariants on H1's tiny random GLM-4 checkpoint (float32): batching, chunked prefill, preemption, KV
freeing, stop handling, seeds, context limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from autoglm.config import EngineConfig
from autoglm.engine.engine import Engine, RequestOutput
from autoglm.engine.prompt import PromptInputs, build_text_prompt
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import ContextTooLong, InvalidRequest
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel

PROMPTS = [
    "Hello world, open Chrome",
    "你好，世界！这是一个测试",
    "def add(a, b):\n    return a + b\n" * 2,
    "Emoji time 😀😃",
]


@pytest.fixture(scope="module")
def model(tiny_glm4_dir: Path) -> LoadedModel:
    return load_model(tiny_glm4_dir)


def greedy(max_tokens: int = 16, **kw: object) -> SamplingParams:
    # the fixture's generation_config sets temperature/top_k/repetition_penalty defaults: override them
    return SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def drain(engine: Engine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    return outs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def run(model: LoadedModel, prompts: list[str], params: SamplingParams, **cfg: object) -> list[list[int]]:
    engine = Engine(model, EngineConfig(**{"block_size": 4, **cfg}))  # type: ignore[arg-type]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), build_text_prompt(model, p), params)
    outs = drain(engine)
    return [tokens(outs[str(i)]) for i in range(len(prompts))]


@pytest.fixture(scope="module")
def alone(model: LoadedModel) -> list[list[int]]:
    return [run(model, [p], greedy(24))[0] for p in PROMPTS]


def test_greedy_matches_transformers_generate(model: LoadedModel, tiny_glm4_dir: Path,
                                              alone: list[list[int]]) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_glm4_dir, dtype=torch.float32).eval()
    ids = build_text_prompt(model, PROMPTS[0]).token_ids
    out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                      repetition_penalty=1.0, eos_token_id=None, pad_token_id=0)
    assert out[0, len(ids):].tolist() == alone[0]


def test_batched_equals_alone(model: LoadedModel, alone: list[list[int]]) -> None:
    assert run(model, PROMPTS, greedy(24)) == alone


def test_a_long_prompt_shares_its_steps(model: LoadedModel, alone: list[list[int]]) -> None:
    """A long prompt alone takes the whole budget; once a short request waits, the long one's chunks shrink to
    long_prefill_token_threshold, so the short one is admitted the next step and decodes every step after, while
    the long prefill goes on beside it. The tokens are the same as alone."""
    long_ids = build_text_prompt(model, PROMPTS[2] * 3).token_ids
    engine = Engine(model, EngineConfig(block_size=4, max_num_batched_tokens=48, long_prefill_token_threshold=8))
    engine.add_request("long", PromptInputs(token_ids=long_ids), greedy(4))
    assert engine.step() == [] and engine.scheduler.running[0].num_computed_tokens == 48  # alone: the whole budget
    engine.add_request("short", build_text_prompt(model, PROMPTS[0]), greedy(24))
    outs: dict[str, list[RequestOutput]] = {}
    steps_with_short_decoding = 0
    while engine.scheduler.running or engine.scheduler.waiting:
        running = {r.request_id: r for r in engine.scheduler.running}
        long_left = running["long"].num_tokens - running["long"].num_computed_tokens if "long" in running else 0
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if long_left > 1 and "short" in running and running["short"].num_generated > 0:
            steps_with_short_decoding += 1
    assert tokens(outs["short"]) == alone[0]
    assert steps_with_short_decoding >= 3  # it decoded while the long prompt was still being prefilled


def test_chunked_prefill_equals_whole_prefill(model: LoadedModel, alone: list[list[int]]) -> None:
    assert run(model, PROMPTS, greedy(24), max_num_batched_tokens=5) == alone
    assert run(model, PROMPTS, greedy(24), max_num_batched_tokens=1) == alone


def test_preemption_with_tiny_kv_budget(model: LoadedModel, alone: list[list[int]]) -> None:
    longest = max(len(build_text_prompt(model, p).token_ids) for p in PROMPTS) + 24
    engine = Engine(model, EngineConfig(block_size=4, num_kv_blocks=(longest + 3) // 4 + 2))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), build_text_prompt(model, p), greedy(24))
    outs = drain(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [tokens(outs[str(i)]) for i in range(len(PROMPTS))] == alone


def test_request_added_mid_generation_joins_the_batch(model: LoadedModel, alone: list[list[int]]) -> None:
    engine = Engine(model, EngineConfig(block_size=4))
    engine.add_request("a", build_text_prompt(model, PROMPTS[0]), greedy(24))
    outs: dict[str, list[RequestOutput]] = {"a": [], "b": []}
    for _ in range(5):
        for o in engine.step():
            outs[o.request_id].append(o)
    engine.add_request("b", build_text_prompt(model, PROMPTS[1]), greedy(24))
    step = engine.step()
    assert {o.request_id for o in step} == {"a", "b"}  # b's prefill ran in the same forward as a's decode
    assert len(engine.scheduler.running) == 2
    for o in step:
        outs[o.request_id].append(o)
    for rid, more in drain(engine).items():
        outs[rid] += more
    assert tokens(outs["a"]) == alone[0] and tokens(outs["b"]) == alone[1]


def test_abort_frees_blocks(model: LoadedModel) -> None:
    engine = Engine(model, EngineConfig(block_size=4))
    engine.add_request("a", build_text_prompt(model, PROMPTS[2]), greedy(50))
    engine.add_request("b", build_text_prompt(model, PROMPTS[0]), greedy(50))
    engine.step()
    engine.step()
    assert engine.kv.num_used_blocks > 0
    out = engine.abort("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert engine.abort("a") is None
    engine.abort("b")
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.has_unfinished()
    # a waiting (never scheduled) request aborts too
    engine.add_request("c", build_text_prompt(model, PROMPTS[0]), greedy(5))
    assert engine.abort("c") is not None and not engine.has_unfinished()


def test_max_tokens_and_usage(model: LoadedModel) -> None:
    engine = Engine(model, EngineConfig(block_size=4))
    engine.add_request("a", build_text_prompt(model, PROMPTS[0]), greedy(7))
    outs = drain(engine)["a"]
    last = outs[-1]
    assert last.finished and last.finish_reason == "length"
    assert len(tokens(outs)) == 7 == last.num_output_tokens
    assert last.num_prompt_tokens == len(build_text_prompt(model, PROMPTS[0]).token_ids)
    assert all(not o.finished for o in outs[:-1])


def test_context_too_long(model: LoadedModel) -> None:
    engine = Engine(model, EngineConfig(max_model_len=32, block_size=4))
    ids = list(range(10, 30))  # 20 tokens
    with pytest.raises(ContextTooLong, match=r"maximum context length is 32 tokens.*requested 33 tokens \(20 in the "
                                             r"messages, 13 in the completion\)"):
        engine.add_request("a", PromptInputs(ids), greedy(13))
    with pytest.raises(ContextTooLong, match="resulted in 40 tokens"):
        engine.add_request("b", PromptInputs(ids * 2), SamplingParams())
    engine.add_request("c", PromptInputs(ids), greedy(12))  # exactly fits
    # max_tokens unset: generation stops at the context window
    engine.add_request("d", PromptInputs(ids), SamplingParams(temperature=0.0, ignore_eos=True))
    outs = drain(engine)
    assert outs["c"][-1].num_output_tokens == 12
    assert outs["d"][-1].num_output_tokens == 12 and outs["d"][-1].finish_reason == "length"
    with pytest.raises(InvalidRequest, match="already in use"):
        engine.add_request("x", PromptInputs(ids), greedy(2))
        engine.add_request("x", PromptInputs(ids), greedy(2))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request("y", PromptInputs([10**7]), greedy(2))
    with pytest.raises(InvalidRequest):
        engine.add_request("z", PromptInputs([]), greedy(2))


def test_same_seed_same_tokens_with_batch_mates(model: LoadedModel) -> None:
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=1234, max_tokens=20,
                       ignore_eos=True)
    alone = run(model, [PROMPTS[0]], p)[0]
    engine = Engine(model, EngineConfig(block_size=4))
    engine.add_request("mate1", build_text_prompt(model, PROMPTS[1]),
                       SamplingParams(temperature=0.9, seed=5, max_tokens=30))
    engine.add_request("x", build_text_prompt(model, PROMPTS[0]), p)
    engine.add_request("mate2", build_text_prompt(model, PROMPTS[2]), SamplingParams(temperature=1.3, max_tokens=9))
    assert tokens(drain(engine)["x"]) == alone
    other = run(model, [PROMPTS[0]], SamplingParams(**{**p.__dict__, "seed": 99}))[0]
    assert other != alone  # the seed matters (20 tokens over a ~400 vocab)


def test_top_k_1_is_greedy(model: LoadedModel, alone: list[list[int]]) -> None:
    p = SamplingParams(temperature=1.7, top_k=1, repetition_penalty=1.0, max_tokens=24, ignore_eos=True)
    assert run(model, PROMPTS[:2], p) == alone[:2]


def test_logprobs(model: LoadedModel) -> None:
    engine = Engine(model, EngineConfig(block_size=4))
    engine.add_request("a", build_text_prompt(model, PROMPTS[0]), greedy(4, logprobs=3))
    outs = drain(engine)["a"]
    lps = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == tokens(outs)
    for lp in lps:  # greedy: the chosen token is the best alternative
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id and lp.logprob <= 0


# --- stop handling with a scripted model: the real tokenizer, outputs forced token by token ------------------------
class Scripted(nn.Module):
    """Wraps the tiny decoder; its logits force `script` (one token per sampling call, one request at a time)."""

    def __init__(self, inner: nn.Module, script: list[int]) -> None:
        super().__init__()
        self.inner = inner
        self.script = script
        self.calls = 0
        self.position_rows = inner.position_rows
        self.prompt_positions = inner.prompt_positions
        self.vocab_size = inner.vocab_size
        self.hidden_size = inner.hidden_size
        self.max_position_embeddings = inner.max_position_embeddings

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.inner.embed_tokens(ids)

    def forward(self, *args: object, **kw: object) -> Tensor:
        return self.inner(*args, **kw)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = torch.full((hidden.shape[0], self.vocab_size), -10.0)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


def scripted_run(model: LoadedModel, script: list[int], params: SamplingParams,
                 prompt: list[int] | None = None) -> list[RequestOutput]:
    fake = LoadedModel(**{**model.__dict__, "decoder": Scripted(model.decoder, script)})
    engine = Engine(fake, EngineConfig(block_size=4))
    engine.add_request("s", PromptInputs(prompt or model.tokenizer.encode("hi")), params)
    return drain(engine)["s"]


def _text(outs: list[RequestOutput]) -> str:
    return "".join(o.content_delta for o in outs)


TEXT = "ab 你好世界 stop😀 here, again 你好 end"


def _script(model: LoadedModel) -> list[int]:
    return model.tokenizer.encode(TEXT, add_special_tokens=False)


def test_scripted_text_roundtrip(model: LoadedModel) -> None:
    script = _script(model)
    outs = scripted_run(model, script, greedy(len(script)))
    assert _text(outs) == TEXT
    for o in outs:  # never half a character
        assert "\ufffd" not in o.content_delta


def _token_spanning_stops(model: LoadedModel) -> Iterator[str]:
    """Stop strings that start inside one token and end inside a later one, incl. multi-byte characters."""
    yield "好世"  # Chinese chars are several bytes, often split over byte-level tokens
    yield "😀"
    yield "p😀 h"
    yield "世界 st"
    yield "again"
    yield "end"


@pytest.mark.parametrize("which", range(6))
def test_stop_strings_cut_exactly(model: LoadedModel, which: int) -> None:
    stop = list(_token_spanning_stops(model))[which]
    script = _script(model)
    outs = scripted_run(model, script, greedy(len(script), stop=[stop, "never-there"]))
    assert _text(outs) == TEXT[: TEXT.index(stop)]
    assert outs[-1].finish_reason == "stop"


def test_stop_string_prefix_is_released_when_it_does_not_match(model: LoadedModel) -> None:
    script = _script(model)
    outs = scripted_run(model, script, greedy(len(script), stop=["你好世界X", "end!"]))
    assert _text(outs) == TEXT and outs[-1].finish_reason == "length"


def test_eos_never_emitted_and_ignore_eos(model: LoadedModel) -> None:
    eos = model.eos_token_ids[0]
    script = model.tokenizer.encode("abc", add_special_tokens=False)
    outs = scripted_run(model, [*script, eos, *script], SamplingParams(temperature=0.0, max_tokens=10))
    assert tokens(outs) == script and _text(outs) == "abc"
    assert outs[-1].finish_reason == "stop" and outs[-1].num_output_tokens == len(script) + 1
    outs = scripted_run(model, [*script, eos, *script], greedy(2 * len(script) + 1))
    assert tokens(outs) == [*script, eos, *script] and outs[-1].finish_reason == "length"
    custom = script[1]
    outs = scripted_run(model, script, greedy(10, stop_token_ids=[custom]))
    assert tokens(outs) == script[:1] and outs[-1].finish_reason == "stop"


def test_reasoning_split_drops_tags(model: LoadedModel) -> None:
    tok = model.tokenizer
    think, end_think = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    ans, end_ans = tok.token_to_id("<answer>"), tok.token_to_id("</answer>")
    r, c = tok.encode("I should tap", add_special_tokens=False), tok.encode("do(action)", add_special_tokens=False)
    script = [think, *r, end_think, ans, *c, end_ans]
    outs = scripted_run(model, script, greedy(len(script)))
    assert "".join(o.reasoning_delta for o in outs) == "I should tap"
    assert _text(outs) == "do(action)"
    assert outs[-1].num_reasoning_tokens == len(r)


def test_engine_config_precedence() -> None:
    env = {"AUTOGLM_MAX_NUM_SEQS": "3", "AUTOGLM_BLOCK_SIZE": "8", "AUTOGLM_ENABLE_PREFIX_CACHING": "yes",
           "AUTOGLM_MAX_MODEL_LEN": "100"}
    cfg = EngineConfig.from_sources({"block_size": 32, "max_num_seqs": None}, env=env,
                                    model_values={"max_model_len": 64, "max_num_batched_tokens": 77})
    assert cfg.block_size == 32  # flag > env
    assert cfg.max_num_seqs == 3 and cfg.enable_prefix_caching is True  # env > model files / default
    assert cfg.max_model_len == 100  # env > model files
    assert cfg.max_num_batched_tokens == 77  # model files > default
    assert EngineConfig.from_sources(env={}).max_num_seqs == EngineConfig().max_num_seqs
    with pytest.raises(InvalidRequest, match="AUTOGLM_BLOCK_SIZE"):
        EngineConfig.from_sources(env={"AUTOGLM_BLOCK_SIZE": "big"})
    with pytest.raises(InvalidRequest, match="unknown engine option"):
        EngineConfig.from_sources({"blok_size": 4}, env={})
    with pytest.raises(InvalidRequest):
        EngineConfig(block_size=0)


def test_prefix_caching_same_tokens_and_hits(model: LoadedModel, alone: list[list[int]]) -> None:
    engine = Engine(model, EngineConfig(block_size=4, enable_prefix_caching=True))
    shared = build_text_prompt(model, PROMPTS[2]).token_ids  # 2 repeats of a code line: > 4 full blocks
    engine.add_request("first", PromptInputs(list(shared)), greedy(24))
    first = tokens(drain(engine)["first"])
    assert first == alone[2] and engine.scheduler.num_cached_tokens == 0
    # the same prompt again, and a longer one sharing it, in one batch with an unrelated one
    engine.add_request("again", PromptInputs(list(shared)), greedy(24))
    engine.add_request("longer", PromptInputs([*shared, *model.tokenizer.encode("x = 1")]), greedy(8))
    engine.add_request("other", build_text_prompt(model, PROMPTS[0]), greedy(24))
    outs = drain(engine)
    hits = engine.scheduler.num_cached_tokens
    assert hits >= 2 * ((len(shared) - 1) // 4) * 4 > 0
    assert tokens(outs["again"]) == alone[2] and tokens(outs["other"]) == alone[0]
    ref = Engine(model, EngineConfig(block_size=4))
    ref.add_request("longer", PromptInputs([*shared, *model.tokenizer.encode("x = 1")]), greedy(8))
    assert tokens(outs["longer"]) == tokens(drain(ref)["longer"])
    # cached blocks survive as free blocks and are reused for new content under pressure
    small = Engine(model, EngineConfig(block_size=4, enable_prefix_caching=True, num_kv_blocks=40))
    for i, p in enumerate(PROMPTS * 2):
        small.add_request(str(i), build_text_prompt(model, p), greedy(24))
    outs = drain(small)
    assert [tokens(outs[str(i)]) for i in range(8)] == alone * 2
    assert small.scheduler.num_cached_tokens > 0
