"""A stream starts at admission: headers and the role chunk before the first token, `: keep-alive` comments while
the prefill runs. The official openai SDK with a 1 s read timeout reads a stream whose prefill takes 4 s to the end,
with no retry (the server counts exactly one request)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.server import SERVED_NAMES, ServerProcess, start_server

PREFILL_S = 4.0
KEEPALIVE_S = 0.3


@pytest.fixture(scope="module")
def slow_server(tiny_glm4v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("slow_server")
    handle = start_server(tiny_glm4v_dir, root / "logs", "--served-model-name", SERVED_NAMES[0], "--max-model-len",
                          "256", "--sse-keepalive", str(KEEPALIVE_S), "--slow-prefill", str(PREFILL_S),
                          module="tests.server.slow_model")
    yield handle
    handle.stop()


def _requests_counted(server: ServerProcess, endpoint: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(float(v) for v in re.findall(rf'autoglm_requests_total{{endpoint="{endpoint}",[^}}]*}} (\S+)', text))


def test_sdk_with_short_read_timeout_reads_slow_prefill_stream(slow_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=slow_server.v1, api_key="x", max_retries=2,
                           timeout=openai.Timeout(10.0, read=1.0))  # the SDK's own HTTP library's type
    before = _requests_counted(slow_server, "chat")
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model=SERVED_NAMES[0], messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert time.monotonic() - t0 >= PREFILL_S  # the prefill really was longer than the read timeout
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert _requests_counted(slow_server, "chat") - before == 1  # no SDK retry


def test_headers_role_chunk_and_keepalives_come_before_the_first_token(slow_server: ServerProcess) -> None:
    body = {"model": SERVED_NAMES[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "stream": True}
    events: list[tuple[float, str]] = []
    with httpx.stream("POST", f"{slow_server.v1}/chat/completions", json=body, timeout=30) as r:
        t0 = time.monotonic()  # headers are in
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                events.append((time.monotonic() - t0, line))
    lines = [line for _, line in events]
    payloads = [json.loads(line[6:]) if line.startswith("data: {") else None for line in lines]

    def is_token(p: dict | None) -> bool:
        return p is not None and bool(p["choices"][0]["delta"].get("content") or p["choices"][0]["finish_reason"])

    first_token = next(i for i, p in enumerate(payloads) if is_token(p))
    assert payloads[0] is not None and payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert lines[1:first_token].count(": keep-alive") >= 2
    assert lines[-1] == "data: [DONE]"


def test_admission_errors_stay_clean_4xx(slow_server: ServerProcess) -> None:
    body = {"model": SERVED_NAMES[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000,
            "stream": True}
    r = httpx.post(f"{slow_server.v1}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
