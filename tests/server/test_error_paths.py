"""Engine failures as clients see them (in-process app, real tiny model, an engine stand-in that fails on cue):
a 500 carries only a request id (the traceback is logged under it), a mid-stream failure arrives as an SSE error
event followed by [DONE], and a full queue is a 429 the OpenAI SDK understands."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from autoglm.errors import Overloaded
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel
from autoglm.server.app import create_app
from autoglm.server.config import ServerConfig

SECRET = "secret-internal-detail-/opt/weights"


@dataclass
class Out:
    request_id: str
    new_token_ids: list[int]
    content_delta: str
    reasoning_delta: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)
    num_prompt_tokens: int = 3
    num_output_tokens: int = 0
    num_reasoning_tokens: int = 0


class FailingEngine:
    """EngineClient stand-in: `mode` picks how the next request fails."""

    max_model_len = 256
    draining = False

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.mode = "ok"
        self.closed: list[str] = []

    def abort(self, request_id: str) -> None:
        pass

    def begin_drain(self, grace_seconds: float) -> None:
        pass

    def shutdown(self, timeout: float = 10.0) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 1}

    async def generate(self, request_id: str, prompt: Any, params: Any) -> AsyncIterator[Out]:
        try:
            if self.mode == "overloaded":
                raise Overloaded("the waiting queue is full (1 requests); retry later")
            if self.mode == "crash_first":
                raise RuntimeError(SECRET)
            yield Out(request_id, [1], "Hel", num_output_tokens=1)
            if self.mode == "crash_mid":
                raise RuntimeError(SECRET)
            yield Out(request_id, [2], "lo", finished=True, finish_reason="stop", num_output_tokens=2)
        finally:
            self.closed.append(request_id)


@pytest.fixture(scope="module")
def app_and_engine(tiny_glm4v_dir: Path) -> Iterator[tuple[TestClient, FailingEngine]]:
    model = load_model(str(tiny_glm4v_dir), no_vision=True)
    engine = FailingEngine(model)
    app = create_app(ServerConfig(max_model_len=256), model=model, engine=engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine


BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_ok_path(app_and_engine: tuple[TestClient, FailingEngine]) -> None:
    client, engine = app_and_engine
    engine.mode = "ok"
    reply = client.post("/v1/chat/completions", json=BODY)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "Hello"


def test_500_leaks_nothing_but_a_request_id(app_and_engine: tuple[TestClient, FailingEngine],
                                            caplog: pytest.LogCaptureFixture) -> None:
    client, engine = app_and_engine
    engine.mode = "crash_first"
    with caplog.at_level(logging.ERROR, logger="autoglm.server"):
        reply = client.post("/v1/chat/completions", json=BODY)
    assert reply.status_code == 500
    rid = reply.headers["x-request-id"]
    error = reply.json()["error"]
    assert error["type"] == "internal_error" and rid in error["message"]
    assert SECRET not in reply.text and "Traceback" not in reply.text
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and logged[0].exc_info is not None and SECRET in str(logged[0].exc_info[1])


def test_mid_stream_error_event_then_done(app_and_engine: tuple[TestClient, FailingEngine]) -> None:
    client, engine = app_and_engine
    engine.mode = "crash_mid"
    reply = client.post("/v1/chat/completions", json={**BODY, "stream": True})
    assert reply.status_code == 200
    events = [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "internal_error" and SECRET not in json.dumps(error)
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "Hel"
    assert engine.closed[-1] == reply.headers["x-request-id"]  # the engine's iterator was closed


def test_overloaded_is_429_with_retry_after(app_and_engine: tuple[TestClient, FailingEngine]) -> None:
    client, engine = app_and_engine
    engine.mode = "overloaded"
    reply = client.post("/v1/chat/completions", json=BODY)
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["type"] == "rate_limit_error"
    engine.mode = "ok"
    metrics = client.get("/metrics").text
    assert 'autoglm_requests_total{endpoint="chat",status="429"} 1.0' in metrics
    assert 'autoglm_requests_total{endpoint="chat",status="500"} 2.0' in metrics  # first-token and mid-stream
