"""Browsers and Ollama's clients against the live server: CORS for this machine's pages only (Ollama's default),
preflights answered before the API key is asked for, and HEAD on GET routes (Ollama's Go client pings `HEAD /`)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from autoglm.server.browser import CORSMiddleware, cors_options
from autoglm.server.config import ServerConfig
from tests.fixtures.server import SERVED_NAMES, ServerProcess

PREFLIGHT = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:8080", "https://localhost",
                                    "http://[::1]:5173", "app://obsidian.md"])
def test_local_pages_may_call_the_api(server: ServerProcess, origin: str) -> None:
    r = httpx.options(server.v1 + "/chat/completions", headers={"origin": origin, **PREFLIGHT}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.post(server.v1 + "/chat/completions", headers={"origin": origin}, timeout=120, json={
        "model": SERVED_NAMES[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    r = httpx.options(server.base_url + "/api/chat", headers={"origin": origin, **PREFLIGHT}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example", "null"])
def test_other_sites_may_not(server: ServerProcess, origin: str) -> None:
    r = httpx.options(server.v1 + "/chat/completions", headers={"origin": origin, **PREFLIGHT}, timeout=30)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.v1 + "/models", headers={"origin": origin}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # the browser withholds it


def test_head_answers_like_get_without_a_body(server: ServerProcess) -> None:
    for path in ("/", "/health", "/v1/models", "/api/version", "/api/tags"):
        get = httpx.get(server.base_url + path, timeout=30)
        head = httpx.head(server.base_url + path, timeout=30)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
    assert httpx.head(server.base_url + "/v1/chat/completions", timeout=30).status_code == 405  # POST-only


def test_allowed_origins_adds_origins() -> None:
    config = ServerConfig.from_sources({}, environ={"AUTOGLM_ALLOWED_ORIGINS": "https://ui.example, https://b.example"})
    assert config.allowed_origins == ("https://ui.example", "https://b.example")
    app = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("ok"))])
    client = TestClient(CORSMiddleware(app, **cors_options(config.allowed_origins)))
    for origin, allowed in (("https://ui.example", True), ("https://b.example", True), ("https://c.example", False),
                            ("http://localhost:1234", True)):
        r = client.get("/x", headers={"origin": origin})
        assert (r.headers.get("access-control-allow-origin") == origin) is allowed, origin
    anyone = TestClient(CORSMiddleware(app, **cors_options(("*",))))
    assert anyone.get("/x", headers={"origin": "https://c.example"}).headers["access-control-allow-origin"] == "*"
