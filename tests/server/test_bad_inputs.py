"""Every client mistake is a 4xx with an OpenAI error object and a clear message; the server stays healthy."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.server import IMAGE_LIMIT, MAX_IMAGE_PIXELS, MAX_MODEL_LEN, SERVED_NAMES, ServerProcess


def _png_bytes(w: int, h: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _image_msg(url: str, text: str = "what is this?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": SERVED_NAMES[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


SMALL_PNG = _png_bytes(32, 32)
SIDE = int(MAX_IMAGE_PIXELS**0.5) + 8

# (case id, request body (dict, or raw str sent as JSON), expected status, message fragment, expected param)
CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("malformed json", '{"model": "x", "messages": [', 400, "Malformed JSON", None),
    ("body not an object", "[1, 2, 3]", 400, "JSON object", None),
    ("wrong type temperature", _chat(temperature="hot"), 400, "temperature", "temperature"),
    ("wrong type messages", _chat(messages="hello"), 400, "messages", "messages"),
    ("wrong type max_tokens", _chat(max_tokens="many"), 400, "max_tokens", "max_tokens"),
    ("unknown model", _chat(model="gpt-4o"), 404, "The model `gpt-4o` does not exist.", "model"),
    ("empty messages", _chat(messages=[]), 400, "at least 1 item", "messages"),
    ("unknown role", _chat(messages=[{"role": "robot", "content": "x"}]), 400, "role", "messages.0.role"),
    ("unknown part type", _chat(messages=[{"role": "user", "content": [{"type": "video", "video": "x"}]}]),
     400, "type", None),
    ("max_tokens zero", _chat(max_tokens=0), 400, "max_tokens must be at least 1", "max_tokens"),
    ("max_completion_tokens negative", _chat(max_tokens=None, max_completion_tokens=-3), 400,
     "max_tokens must be at least 1", "max_tokens"),
    ("max_tokens over context", _chat(max_tokens=MAX_MODEL_LEN + 1), 400,
     f"maximum context length is {MAX_MODEL_LEN} tokens", "max_tokens"),
    ("prompt over context", _chat(messages=[{"role": "user", "content": "hello world " * MAX_MODEL_LEN}],
                                  max_tokens=None), 400, "maximum context length", "messages"),
    ("2 MB of text over context", _chat(messages=[{"role": "user", "content": "x y " * 500_000}], max_tokens=None),
     400, f"maximum context length is {MAX_MODEL_LEN} tokens", "messages"),  # the served limit, not the file's
    ("completion prompt over context", {"model": SERVED_NAMES[0], "prompt": "hello world " * MAX_MODEL_LEN,
                                        "max_tokens": 4}, 400, "your prompt resulted in", "prompt"),
    ("2 MB completion prompt", {"model": SERVED_NAMES[0], "prompt": "x y " * 500_000}, 400,
     f"maximum context length is {MAX_MODEL_LEN} tokens", "prompt"),
    ("completion max_tokens over context", {"model": SERVED_NAMES[0], "prompt": "hi", "max_tokens": MAX_MODEL_LEN},
     400, "in the prompt, ", "max_tokens"),
    ("stop token id past the vocabulary", _chat(stop_token_ids=[1_000_000_000]), 400, "outside the vocabulary",
     "stop_token_ids"),
    ("image in a message the template drops", _chat(messages=[
        {"role": "user", "content": "look"},
        {"role": "tool", "tool_call_id": "c1", "content": [
            {"type": "text", "text": "screenshot"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(SMALL_PNG)}}]}]),
     400, "the chat template placed 0 of the 1 media item(s)", "messages[1].content[1]"),
    ("n too large", _chat(n=17), 400, "n must be between 1 and 16", "n"),
    ("top_p out of range", _chat(top_p=1.5), 400, "top_p", "top_p"),
    ("bad reasoning_format", _chat(reasoning_format="sideways"), 400, "reasoning_format", "reasoning_format"),
    ("bad base64", _chat(messages=_image_msg("data:image/png;base64,%%%not base64%%%")), 400,
     "not valid base64", "image_url"),
    ("non-image bytes", _chat(messages=_image_msg("data:image/png;base64," + _b64(b"plain text, not a picture"))),
     400, "not a supported image", "image_url"),
    ("truncated png", _chat(messages=_image_msg("data:image/png;base64," + _b64(_png_bytes(64, 64)[:300]))),
     400, "truncated or corrupt", "image_url"),
    ("oversized image", _chat(messages=_image_msg("data:image/png;base64," + _b64(_png_bytes(SIDE, SIDE)))),
     400, f"the limit is {MAX_IMAGE_PIXELS} pixels", "image_url"),
    ("too many images", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(SMALL_PNG)}}
    ] * (IMAGE_LIMIT + 1) + [{"type": "text", "text": "compare"}]}]), 400,
     f"At most {IMAGE_LIMIT} image(s) may be provided in one prompt.", "messages"),
    ("remote url without permission", _chat(messages=_image_msg("http://127.0.0.1:9/screen.png")), 400,
     "--allow-remote-media", "image_url"),
    ("audio without speech module", _chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": _b64(b"RIFF0000WAVE"), "format": "wav"}}]}]),
     400, "input_audio parts need a speech module", "messages"),
    ("completion prompt empty", {"model": SERVED_NAMES[0], "prompt": ""}, 400, "prompt", "prompt"),
    # hostile values that used to be 500s or to fail every request in the batch
    ("top_k 2**63", _chat(top_k=2**63), 400, "top_k must be below 2**31", "top_k"),
    ("top_k below -1", _chat(top_k=-5), 400, "top_k", "top_k"),
    ("seed 2**64", _chat(seed=2**64), 400, "seed must fit in 64 bits", "seed"),
    ("temperature NaN", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature must be a finite number", "temperature"),
    ("repetition_penalty Infinity", '{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": '
     'Infinity}', 400, "repetition_penalty must be a finite number", "repetition_penalty"),
    ("frequency_penalty -Infinity", '{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": '
     '-Infinity}', 400, "frequency_penalty must be a finite number", "frequency_penalty"),
    ("logit_bias NaN", '{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}', 400,
     "logit_bias", "logit_bias"),
    ("lone surrogate in content", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "lone UTF-16 surrogate", "messages[0].content"),
    ("lone surrogate in a text part", '{"messages": [{"role": "user", "content": [{"type": "text", "text": '
     '"\\udfff"}]}]}', 400, "surrogate", "messages[0].content[0].text"),
    ("lone surrogate in model", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 400,
     "surrogate", "model"),
    ("lone surrogate in prompt", '{"prompt": "x\\udbff"}', 400, "surrogate", "prompt"),
    ("template kwargs: messages", _chat(chat_template_kwargs={"messages": []}), 400,
     "chat_template_kwargs may not set messages", "chat_template_kwargs"),
    ("template kwargs: add_generation_prompt", _chat(chat_template_kwargs={"add_generation_prompt": False}), 400,
     "may not set add_generation_prompt", "chat_template_kwargs"),
    ("prompt of booleans", {"model": SERVED_NAMES[0], "prompt": [[False]]}, 400, "prompt", None),
    ("stop_token_ids of booleans", _chat(stop_token_ids=[True]), 400, "stop_token_ids", None),
    ("too many stop strings", _chat(stop=[f"s{i}" for i in range(17)]), 400, "stop takes at most 16", "stop"),
    ("10k-deep JSON", "[" * 10_000 + "]" * 10_000, 400, "nests 10000 levels deep", None),
]


@pytest.mark.parametrize(("body", "status", "fragment", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(server: ServerProcess, body: Any, status: int, fragment: str, param: str | None) -> None:
    is_completion = "prompt" in body if isinstance(body, dict) else body.startswith('{"prompt"')
    endpoint = "/completions" if is_completion else "/chat/completions"
    if isinstance(body, str):
        response = httpx.post(server.v1 + endpoint, content=body, headers={"content-type": "application/json"},
                              timeout=60)
    else:
        response = httpx.post(server.v1 + endpoint, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param
    assert response.headers["x-request-id"]
    assert "Traceback" not in response.text


def test_local_paths_outside_the_allowed_directory(server: ServerProcess) -> None:
    assert server.media_dir is not None
    outside = server.media_dir.parent / "outside.png"
    assert outside.exists()
    for url in (f"file://{outside}", str(outside), f"file://{server.media_dir}/../outside.png", "/etc/passwd"):
        response = httpx.post(server.v1 + "/chat/completions", json=_chat(messages=_image_msg(url)), timeout=60)
        assert response.status_code == 400, url
        assert "must be a subpath" in response.json()["error"]["message"]


def test_unknown_route_and_method_are_openai_errors(server: ServerProcess) -> None:
    response = httpx.get(server.v1 + "/engines", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    response = httpx.get(server.v1 + "/chat/completions", timeout=30)
    assert response.status_code == 405 and "error" in response.json()


def test_unknown_fields_are_ignored(server: ServerProcess) -> None:
    response = httpx.post(server.v1 + "/chat/completions", json=_chat(frobnicate=True, web_search_options={}),
                          timeout=60)
    assert response.status_code == 200
    assert "ignoring unknown field(s) frobnicate, web_search_options" in server.log()


def test_server_still_healthy_after_bad_inputs(server: ServerProcess) -> None:
    assert httpx.get(server.base_url + "/health/ready", params={"force": "1"}, timeout=60).status_code == 200
    response = httpx.post(server.v1 + "/chat/completions", json=_chat(), timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"
    assert server.alive()
