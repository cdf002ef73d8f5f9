"""One failing request never hurts its batch mates: the engine bisects a failed step down to the request that makes
it fail, ends only that one (with an error naming the cause) and the others produce the tokens they produce alone.

The failure is injected by a test-only decoder wrapper around H1's tiny random GLM-4: it runs the real forward (so
K/V of every row in the batch is written, as a real mid-step failure would leave it) and then raises when the packed
batch holds the poison token id."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from torch import Tensor, nn

from autoglm.config import EngineConfig
from autoglm.engine.async_engine import AsyncEngine
from autoglm.engine.engine import Engine, RequestOutput
from autoglm.engine.prompt import PromptInputs, build_text_prompt
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import RequestFailed
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel

PROMPTS = ["Hello world, open Chrome", "你好，世界！这是一个测试", "def add(a, b):\n    return a + b\n"]


class Poisoned(nn.Module):
    """The real decoder; raises after its forward whenever `poison` is among the batch's input ids."""

    def __init__(self, inner: nn.Module, poison: int) -> None:
        super().__init__()
        self.inner = inner
        self.poison = poison
        self.failures = 0
        for name in ("position_rows", "prompt_positions", "vocab_size", "hidden_size", "max_position_embeddings",
                     "embed_tokens", "compute_logits"):
            setattr(self, name, getattr(inner, name))

    def forward(self, input_ids: Tensor, *args: object, **kw: object) -> Tensor:
        hidden = self.inner(input_ids, *args, **kw)  # K/V of every row written first
        if bool((input_ids == self.poison).any()):
            self.failures += 1
            raise RuntimeError(f"poisoned token {self.poison} in the batch")
        return hidden


@pytest.fixture(scope="module")
def model(tiny_glm4_dir: Path) -> LoadedModel:
    return load_model(tiny_glm4_dir)


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=max_tokens, ignore_eos=True)


def sampled(seed: int) -> SamplingParams:  # random sampling: the retry must not consume a request's generator twice
    return SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_tokens=12,
                          ignore_eos=True, seed=seed)


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def _params(i: int) -> SamplingParams:
    return greedy() if i % 2 == 0 else sampled(100 + i)


def _alone(model: LoadedModel) -> list[list[int]]:
    out = []
    for i, p in enumerate(PROMPTS):
        engine = Engine(model, EngineConfig(block_size=4))
        engine.add_request("a", build_text_prompt(model, p), _params(i))
        outs: list[RequestOutput] = []
        while engine.has_unfinished():
            outs.extend(engine.step())
        out.append(_tokens(outs))
    return out


def _poisoned_model(model: LoadedModel, alone: list[list[int]]) -> tuple[LoadedModel, int]:
    used = {t for p in PROMPTS for t in build_text_prompt(model, p).token_ids} | {t for a in alone for t in a}
    poison = next(i for i in range(model.decoder.vocab_size - 1, 0, -1) if i not in used)
    return LoadedModel(**{**model.__dict__, "decoder": Poisoned(model.decoder, poison)}), poison


def test_poisoned_request_fails_alone_engine(model: LoadedModel) -> None:
    alone = _alone(model)
    fake, poison = _poisoned_model(model, alone)
    engine = Engine(fake, EngineConfig(block_size=4))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), build_text_prompt(model, p), _params(i))
    outs: dict[str, list[RequestOutput]] = {}

    def step() -> None:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)

    for _ in range(3):  # the three are live (decoding) when the poisoned one arrives
        step()
    engine.add_request("bad", PromptInputs([*build_text_prompt(model, "x").token_ids, poison]), greedy())
    while engine.has_unfinished():
        step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    assert [_tokens(outs[str(i)]) for i in range(len(PROMPTS))] == alone
    assert all(outs[str(i)][-1].error is None for i in range(len(PROMPTS)))
    bad = outs["bad"]
    assert len(bad) == 1 and bad[0].finished and isinstance(bad[0].error, RequestFailed)
    assert "poisoned token" in bad[0].error.message and "RuntimeError" in bad[0].error.message
    assert engine.num_failed == 1 and engine.stats()["requests_failed"] == 1
    assert fake.decoder.failures >= 2  # the whole batch, then the bisected half holding it


def test_poisoned_stream_among_four_live_streams(model: LoadedModel) -> None:
    alone = _alone(model)
    fake, poison = _poisoned_model(model, alone)

    async def main() -> tuple[list[list[int] | BaseException], int]:
        engine = AsyncEngine(Engine(fake, EngineConfig(block_size=4)))
        try:
            prompts = [build_text_prompt(model, p) for p in PROMPTS]
            prompts.insert(1, PromptInputs([*build_text_prompt(model, "x").token_ids, poison]))
            params = [_params(0), greedy(), _params(1), _params(2)]

            async def consume(k: int) -> list[int] | BaseException:
                got: list[int] = []
                try:
                    async for out in engine.generate(f"r{k}", prompts[k], params[k]):
                        got.extend(out.new_token_ids)
                except RequestFailed as e:
                    return e
                return got

            results = await asyncio.gather(*(consume(k) for k in range(4)))
            return list(results), engine.engine.num_failed
        finally:
            engine.shutdown()

    results, num_failed = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(results[1], RequestFailed) and num_failed == 1
    assert [results[0], results[2], results[3]] == alone
