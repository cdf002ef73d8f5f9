"""The generation layer's contract (what a second protocol builds on): event order, admission errors before any
event, in-band failure, abort and status 499 when the consumer leaves, metrics recorded once per request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from autoglm.engine.output import RequestOutput
from autoglm.engine.prompt import PromptInputs
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import Overloaded
from autoglm.server.config import ServerConfig
from autoglm.server.engine_client import EngineClient
from autoglm.server.generation import Admitted, Delta, Failed, Finished, Generation
from autoglm.server.metrics import Metrics
from autoglm.server.state import ServerState


def _out(rid: str, ids: list[int], content: str = "", reasoning: str = "", *, done: bool = False) -> RequestOutput:
    return RequestOutput(rid, ids, content, reasoning, done, "stop" if done else None, num_prompt_tokens=3,
                         num_output_tokens=len(ids), num_reasoning_tokens=1 if reasoning else 0)


class ScriptEngine:
    """EngineClient whose generate plays `script` (outputs, or an exception to raise at that point)."""

    max_model_len = 64
    draining = False

    def __init__(self, script: list[Any]) -> None:
        self.model = SimpleNamespace(generation_defaults={})
        self.script = script
        self.closed: list[str] = []

    async def generate(self, request_id: str, prompt: PromptInputs, params: SamplingParams
                       ) -> AsyncGenerator[RequestOutput, None]:
        try:
            for item in self.script:
                if isinstance(item, BaseException):
                    raise item
                yield item
                await asyncio.sleep(0)
        finally:
            self.closed.append(request_id)

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, Any]:
        return {}

    def begin_drain(self, grace_seconds: float) -> None: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


def _generation(engine: ScriptEngine, *, stream: bool = True, mode: str = "separate") -> tuple[Generation, Metrics]:
    assert isinstance(engine, EngineClient)
    metrics = Metrics()
    state = ServerState(config=ServerConfig(), metrics=metrics, model=engine.model, engine=engine)  # type: ignore[arg-type]

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never leaves
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    gen = Generation(state, request, rid="r1", endpoint="chat", model_name="m", stream=stream, mode=mode,
                     arrival=0.0)
    return gen, metrics


async def _events(gen: Generation, stop_after: int | None = None) -> list[Any]:
    got: list[Any] = []
    async with contextlib.aclosing(gen.events()) as events:
        async for event in events:
            got.append(event)
            if stop_after is not None and len(got) == stop_after:
                break
    return got


PROMPT = PromptInputs([1, 2, 3])


def test_events_in_order() -> None:
    engine = ScriptEngine([_out("r1", [7], reasoning="hm"), _out("r1", [8], "Hel"), _out("r1", [9], "lo", done=True)])
    gen, metrics = _generation(engine)

    async def run() -> list[Any]:
        await gen.start(PROMPT, SamplingParams(max_tokens=4))
        return await _events(gen)

    events = asyncio.run(run())
    assert [type(e) for e in events] == [Admitted, Delta, Delta, Delta, Finished]
    assert events[1].reasoning == "hm" and "".join(e.content for e in events[2:4]) == "Hello"
    assert events[-1].reason == "stop" and events[-1].usage.completion_tokens == 1
    assert engine.closed == ["r1"] and [r.status for r in metrics.recent] == [200]


def test_admission_error_raises_before_any_event() -> None:
    engine = ScriptEngine([Overloaded("queue full")])
    gen, metrics = _generation(engine)
    with pytest.raises(Overloaded):
        asyncio.run(gen.start(PROMPT, SamplingParams(max_tokens=4)))
    assert engine.closed == ["r1"] and [r.status for r in metrics.recent] == [429]


def test_mid_stream_error_is_the_last_event() -> None:
    engine = ScriptEngine([_out("r1", [8], "Hel"), RuntimeError("boom")])
    gen, metrics = _generation(engine)

    async def run() -> list[Any]:
        await gen.start(PROMPT, SamplingParams(max_tokens=4))
        return await _events(gen)

    events = asyncio.run(run())
    assert [type(e) for e in events] == [Admitted, Delta, Failed]
    assert events[-1].status == 500 and str(events[-1].error) == "boom"
    assert [r.status for r in metrics.recent] == [500]


def test_leaving_early_aborts_and_records_499() -> None:
    engine = ScriptEngine([_out("r1", [8], "Hel"), _out("r1", [9], "lo"), _out("r1", [10], "!", done=True)])
    gen, metrics = _generation(engine)

    async def run() -> list[Any]:
        await gen.start(PROMPT, SamplingParams(max_tokens=4))
        return await _events(gen, stop_after=2)

    assert len(asyncio.run(run())) == 2
    assert engine.closed == ["r1"] and [r.status for r in metrics.recent] == [499]


def test_collect_joins_deltas_and_raises_errors() -> None:
    engine = ScriptEngine([_out("r1", [7], reasoning="hm"), _out("r1", [8], "Hel"), _out("r1", [9], "lo", done=True)])
    gen, _ = _generation(engine, stream=False)

    async def run() -> Any:
        await gen.start(PROMPT, SamplingParams(max_tokens=4))
        return await gen.collect()

    done = asyncio.run(run())
    assert (done.content, done.reasoning, done.finish_reason) == ("Hello", "hm", "stop")
    failing = ScriptEngine([_out("r1", [8], "Hel"), RuntimeError("boom")])
    gen, metrics = _generation(failing, stream=False)
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(run())
    assert [r.status for r in metrics.recent] == [500]
