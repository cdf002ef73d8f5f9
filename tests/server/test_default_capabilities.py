"""What README's Quick start says the default server cannot do: see. An image part gets a clean 400 (not a 500,
not a silent text-only answer), and `/v1/models` says what actually answers."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image

from tests.fixtures.server import ServerProcess


def _png() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_default_server_refuses_images(default_server: ServerProcess) -> None:
    body = {"model": "autoglm-phone-9b", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png()}}, {"type": "text", "text": "What is on the screen?"}]}]}
    response = httpx.post(default_server.v1 + "/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"], response.text


def test_default_server_names_the_real_model(default_server: ServerProcess) -> None:
    models = httpx.get(default_server.v1 + "/models", timeout=30).json()["data"]
    alias = next(m for m in models if m["id"] == "autoglm-phone-9b")
    assert "qwen2.5-coder-0.5b-instruct" in alias["parent"], alias
