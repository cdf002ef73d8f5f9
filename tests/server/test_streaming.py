"""Raw SSE over httpx, a phone-agent-shaped conversation, and client disconnects freeing the engine at once."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import openai
from PIL import Image

from tests.fixtures.server import MAX_MODEL_LEN, SERVED_NAMES, ServerProcess


def _screenshot_url(w: int = 108, h: int = 240) -> str:
    pixels = np.random.default_rng(5).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _events(lines: list[str]) -> list[str]:
    """SSE `data:` payloads in order; every non-empty line must be a data line."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        out.append(line[len("data: "):])
    return out


def test_raw_sse_events(server: ServerProcess) -> None:
    body = {"model": SERVED_NAMES[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        events = _events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]  # every event but the last is valid JSON
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    # no reasoning fields by default (API_NOTES §2 table, first row)
    assert not any("reasoning_content" in c["choices"][0]["delta"] for c in chunks if c["choices"])


def test_phone_agent_conversation(server: ServerProcess) -> None:
    """Open-AutoGLM's phone_agent shape: system string, user [image, text], assistant history strings,
    temperature 0, top_p 0.85, frequency_penalty 0.2, streaming; it reads only delta.content."""
    client = openai.OpenAI(base_url=server.v1, api_key="EMPTY", max_retries=0, timeout=120)
    messages = [
        {"role": "system", "content": "今天的日期是: 2025年1月1日\n你是一个智能体分析专家..."},
        {"role": "user", "content": [{"type": "text", "text": "打开微信\n\n{\"current_app\": \"System Home\"}"}]},
        {"role": "assistant", "content": "<think>需要打开微信</think><answer>do(action=\"Launch\", app=\"微信\")"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _screenshot_url()}},
                                     {"type": "text", "text": "** Screen Info **\n\n{\"current_app\": \"微信\"}"}]},
    ]
    kwargs = dict(model=SERVED_NAMES[0], messages=messages, max_tokens=12, temperature=0.0, top_p=0.85,
                  frequency_penalty=0.2)
    stream = client.chat.completions.create(stream=True, **kwargs)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.content == content
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens >= 1
    # its startup check: a non-streaming "Hi" with max_tokens=5
    hi = client.chat.completions.create(model=SERVED_NAMES[0], messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=5)
    assert hi.usage.completion_tokens <= 5 and hi.choices[0].finish_reason in ("stop", "length")


def _engine(server: ServerProcess) -> dict:
    return httpx.get(server.base_url + "/status/data", timeout=30).json()


def test_client_disconnect_aborts_and_frees_kv(server: ServerProcess) -> None:
    max_tokens = MAX_MODEL_LEN - 64
    body = {"model": SERVED_NAMES[0], "messages": [{"role": "user", "content": "count forever"}],
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as response:
        rid = response.headers["x-request-id"]
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    record = None
    while time.monotonic() < deadline:
        data = _engine(server)
        record = next((r for r in data["recent"] if r["request_id"] == rid), None)
        if record is not None and data["engine"]["running"] == 0 and data["engine"]["kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert record is not None, "the aborted request was never recorded"
    assert record["status"] == 499
    assert record["completion_tokens"] < max_tokens  # stopped early, not run to completion
    assert data["engine"]["running"] == 0 and data["engine"]["waiting"] == 0
    assert data["engine"]["kv_blocks_used"] == 0


def test_non_streaming_disconnect_aborts(server: ServerProcess) -> None:
    body = {"model": SERVED_NAMES[0], "messages": [{"role": "user", "content": "count forever"}],
            "max_tokens": MAX_MODEL_LEN - 64, "ignore_eos": True}
    try:
        httpx.post(server.v1 + "/chat/completions", json=body, timeout=0.3)
    except httpx.TimeoutException:
        pass  # the client gave up and closed the connection
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        engine = _engine(server)["engine"]
        if engine["running"] == 0 and engine["kv_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert engine["running"] == 0 and engine["kv_blocks_used"] == 0
    assert any(r["status"] == 499 and not r["stream"] for r in _engine(server)["recent"])


def test_concurrent_requests_equal_their_solo_replies(server: ServerProcess) -> None:
    """Requests batched together by the engine give the same greedy replies as each alone."""
    import asyncio

    prompts = ["Open Chrome", "打开微信", "What is on the screen?", "Scroll down twice"]
    params = dict(model=SERVED_NAMES[0], max_tokens=12, temperature=0, extra_body={"repetition_penalty": 1.0})
    solo = openai.OpenAI(base_url=server.v1, api_key="EMPTY", max_retries=0, timeout=120)
    expected = [solo.chat.completions.create(messages=[{"role": "user", "content": p}], **params)
                .choices[0].message.content for p in prompts]

    async def together() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="EMPTY", max_retries=0, timeout=120)

        async def one(p: str) -> str:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": p}], stream=True,
                                                          **params)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await client.close()

    assert asyncio.run(together()) == expected
