"""A server started with --api-key (and --no-vision): the SDK's AuthenticationError for a wrong key, 200 with the
right one; health and metrics stay open; an image to a text-only server is a clear 400."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.fixtures.server import ServerProcess, start_server

KEY = "sk-test-secret"


@pytest.fixture(scope="module")
def keyed_server(tiny_glm4v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(tiny_glm4v_dir, tmp_path_factory.mktemp("keyed") / "logs", "--api-key", KEY,
                          "--no-vision", "--max-model-len", "128")
    yield handle
    handle.stop()


def _client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=60)


def test_wrong_key_is_authentication_error(keyed_server: ServerProcess) -> None:
    for key in ("EMPTY", "sk-wrong"):
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            _client(keyed_server, key).chat.completions.create(
                model="tiny_glm4v0", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            _client(keyed_server, key).models.list()
    response = httpx.get(keyed_server.v1 + "/models", timeout=30)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_right_key_works_and_probes_stay_open(keyed_server: ServerProcess) -> None:
    client = _client(keyed_server, KEY)
    name = client.models.list().data[0].id  # no --served-model-name: the model directory's name
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    for path in ("/health", "/health/ready", "/metrics", "/", "/status/data"):
        assert httpx.get(keyed_server.base_url + path, timeout=60).status_code == 200, path
    assert KEY not in httpx.get(keyed_server.base_url + "/status/data", timeout=60).text


def test_image_to_text_only_server_is_400(keyed_server: ServerProcess) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    client = _client(keyed_server, KEY)
    name = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="no encoder loaded"):
        client.chat.completions.create(model=name, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}])


def test_ps_names_the_missing_key(
    keyed_server: ServerProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`autoglm ps` against a keyed server: without AUTOGLM_API_KEY it says a key is wanted (not "start a server")."""
    from autoglm.cli import main

    port = str(httpx.URL(keyed_server.base_url).port)
    monkeypatch.delenv("AUTOGLM_API_KEY", raising=False)
    assert main(["ps", "--host", "127.0.0.1", "--port", port]) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "AUTOGLM_API_KEY" in err and "start one" not in err
    monkeypatch.setenv("AUTOGLM_API_KEY", KEY)
    assert main(["ps", "--host", "127.0.0.1", "--port", port]) == 0
    assert "NAME" in capsys.readouterr().out
