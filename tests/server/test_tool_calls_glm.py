"""The GLM-4.5 tool-call format through the live server: the tiny GLM-4.1V checkpoint served with GLM-4.6's real
chat template (`--chat-template`), so the server picks the `<arg_key>`/`<arg_value>` format from the template text.
The model is random; `tool_choice` named forces a call by grammar, so the parsed call is valid whatever it samples."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.fixtures.server import ServerProcess, start_server

DATA = Path(__file__).resolve().parents[1] / "data"
NAME = "tiny-glm45-tools"
TOOL = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
        "label": {"type": "string", "enum": ["wake", "nap"]}}, "required": ["hour", "label"],
        "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tiny_glm4v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(tiny_glm4v_dir, tmp_path_factory.mktemp("glm_tools") / "logs", "--served-model-name", NAME,
                          "--chat-template", str(DATA / "glm46_chat_template.jinja"))
    yield handle
    handle.stop()


def test_named_call_in_glm45_format(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="EMPTY", max_retries=0, timeout=120)
    # 200 tokens: the tiny tokenizer spells the markup in characters
    kw = {"model": NAME, "messages": [{"role": "user", "content": "wake me at 7"}], "tools": [TOOL],
          "tool_choice": {"type": "function", "function": {"name": "set_alarm"}}, "max_tokens": 200,
          "temperature": 0}
    r = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    choice = r.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "set_alarm"
    jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])
    assert choice.finish_reason == "tool_calls"
    pieces = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    streamed = "".join(p.function.arguments or "" for d in pieces for p in d.tool_calls or [])
    assert json.loads(streamed) == json.loads(call.function.arguments)
    assert not "".join(d.content or "" for d in pieces).strip()
