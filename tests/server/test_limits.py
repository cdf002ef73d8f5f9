"""Request-body limits on the live server: size (413), UTF-8 and nesting (400), and /health stays responsive while a
large body is being handled."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx

from tests.fixtures.server import SERVED_NAMES, ServerProcess

LIMIT = 48 * 1024 * 1024  # the server's default --max-request-body-bytes


def _error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]
    return error


def test_body_over_the_limit_is_413(server: ServerProcess) -> None:
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * LIMIT + b'"}]}'
    response = httpx.post(server.v1 + "/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code == 413, response.text[:300]
    error = _error(response)
    assert "accepts at most" in error["message"] and "--max-request-body-bytes" in error["message"]


def test_chunked_body_over_the_limit_is_413(server: ServerProcess) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // (1 << 20) + 2):
            yield b"y" * (1 << 20)
        yield b'"}]}'

    response = httpx.post(server.v1 + "/chat/completions", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code == 413, response.text[:300]
    assert "request body is over" in _error(response)["message"]


def test_invalid_utf8_names_the_byte(server: ServerProcess) -> None:
    body = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    response = httpx.post(server.v1 + "/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert "not valid UTF-8 (byte 46" in _error(response)["message"]


def test_health_answers_while_a_large_body_is_handled(server: ServerProcess) -> None:
    text = "hello world " * (10 * 1024 * 1024 // 12)  # ~10 MB of text: far over the context window
    big: dict = {}

    def send() -> None:
        big["response"] = httpx.post(server.v1 + "/chat/completions", timeout=300, json={
            "model": SERVED_NAMES[0], "messages": [{"role": "user", "content": text}], "max_tokens": 4})
        big["done"] = time.monotonic()

    worker = threading.Thread(target=send)
    worker.start()
    latencies = []
    while worker.is_alive() and len(latencies) < 200:
        started = time.monotonic()
        assert httpx.get(server.base_url + "/health", timeout=60).status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    worker.join(300)
    response = big["response"]
    assert response.status_code == 400, response.text[:300]
    assert "maximum context length" in _error(response)["message"]
    assert latencies, "the large request finished before /health was asked once"
    print(f"/health latency while a 10 MB request was handled: max {max(latencies) * 1000:.1f} ms, "
          f"{len(latencies)} probes")
