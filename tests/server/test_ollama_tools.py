"""Tool calls on Ollama's /api/chat through the official `ollama` client, against the live server.

The server runs the tiny GLM-4.1V checkpoint with GLM-4.6's real chat template (`--chat-template`: tools rendered
into the system turn, GLM-4.5 `<tool_call>` syntax) and a decoder that always answers with `REPLY` (some text,
then one `get_weather` call; tests/server/tool_scripted_model.py). Tokenizer, template, engine, tool-call parser
and HTTP are the production ones. The prompt lengths are checked against transformers' own rendering of the same
template (an independent oracle), so the tools and the tool history are known to reach the model as /v1 renders
them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.fixtures.server import SERVED_NAMES, ServerProcess, start_server
from tests.server.tool_scripted_model import REPLY

DATA = Path(__file__).resolve().parents[1] / "data"
TEMPLATE = DATA / "glm46_chat_template.jinja"
NAME = "tiny-glm45-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGS = {"city": "Paris", "days": 3}  # what REPLY's call decodes to (days: an integer parameter, so JSON)
CONTENT = "Let me check."  # REPLY's text before the call
GREEDY = {"temperature": 0}
Count = Callable[..., int]
# A Modelfile TEMPLATE (Go) that teaches the same syntax, and one without .Tools
GO_TOOLS = """{{- if .Tools }}<|system|>
Call a tool as <tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>. Tools:
{{- range .Tools }} {{ .Function.Name }}{{ end }}
{{- end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|user|>
{{ .Content }}
{{- else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}{{ range .ToolCalls }}<tool_call>{{ .Function.Name }} {{ .Function.Arguments }}</tool_call>{{ end }}
{{- else if eq .Role "tool" }}<|observation|>
{{ .Content }}
{{- end }}
{{- end }}<|assistant|>"""
GO_PLAIN = """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}{{ end }}<|assistant|>"""


@pytest.fixture(scope="module")
def tool_server(tiny_glm4v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ollama_tools")
    handle = start_server(
        tiny_glm4v_dir, root / "logs", "--served-model-name", NAME, "--chat-template", str(TEMPLATE),
        "--max-model-len", "1024", module="tests.server.tool_scripted_model",
        env={"XDG_DATA_HOME": str(root / "xdg")},  # a private model store for /api/create
    )  # fmt: skip
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(tool_server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=tool_server.base_url, timeout=120)


@pytest.fixture(scope="module")
def hf_prompt_tokens(tiny_glm4v_dir: Path) -> Count:
    """Token count of transformers' rendering of GLM-4.6's template for OpenAI-style messages (the oracle)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_glm4v_dir)
    source = TEMPLATE.read_text(encoding="utf-8")

    def count(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
        text = tok.apply_chat_template(
            messages, tools=tools, chat_template=source, add_generation_prompt=True, tokenize=False
        )
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count


def _post(server: ServerProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/chat", json={"model": NAME, "options": GREEDY, **body}, timeout=120)


def test_show_lists_tools(client: ollama.Client) -> None:
    assert "tools" in (client.show(NAME).capabilities or [])


def test_tool_call_not_streamed(client: ollama.Client, tool_server: ServerProcess, hf_prompt_tokens: Count) -> None:
    r = client.chat(model=NAME, messages=ASK, tools=[WEATHER], options=GREEDY, stream=False)
    assert r.done and r.done_reason == "stop"
    assert r.message.role == "assistant" and r.message.content == CONTENT
    (call,) = r.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert dict(call.function.arguments) == ARGS
    # the tools were rendered into the template's system turn, exactly as transformers renders them
    assert r.prompt_eval_count == hf_prompt_tokens(ASK, [WEATHER])
    # on the wire: Ollama's shape, `arguments` a JSON object (not OpenAI's string)
    wire = _post(tool_server, {"messages": ASK, "tools": [WEATHER], "stream": False})
    assert wire.status_code == 200
    (raw,) = wire.json()["message"]["tool_calls"]
    assert raw["function"] == {"index": 0, "name": "get_weather", "arguments": ARGS}


def test_tool_call_streamed(client: ollama.Client, tool_server: ServerProcess) -> None:
    chunks = list(client.chat(model=NAME, messages=ASK, tools=[WEATHER], options=GREEDY, stream=True))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done and chunks[-1].done_reason == "stop"
    with_calls = [c for c in chunks if c.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done  # the whole call in one message chunk, before done
    (call,) = with_calls[0].message.tool_calls or []
    assert call.function.name == "get_weather" and dict(call.function.arguments) == ARGS
    assert "".join(c.message.content or "" for c in chunks) == CONTENT
    assert chunks[-1].eval_count and chunks[-1].eval_count > 10
    # raw NDJSON: one JSON object a line, no markup or partial arguments in any content
    body = {"model": NAME, "messages": ASK, "tools": [WEATHER], "options": GREEDY}
    with httpx.stream("POST", f"{tool_server.base_url}/api/chat", json=body, timeout=120) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert all("<" not in line["message"]["content"] for line in lines)
    (raw,) = [c for line in lines for c in line["message"].get("tool_calls", [])]
    assert raw["id"].startswith("call_")
    assert raw["function"] == {"index": 0, "name": "get_weather", "arguments": ARGS}


def test_two_round_trip(client: ollama.Client, tool_server: ServerProcess, hf_prompt_tokens: Count) -> None:
    first = client.chat(model=NAME, messages=ASK, tools=[WEATHER], options=GREEDY, stream=False)
    assert first.message.tool_calls
    # the client's own message object goes back (arguments an object), then the tool's result
    history = [*ASK, first.message, {"role": "tool", "content": "Sunny, 22 C", "tool_name": "get_weather"}]
    second = client.chat(model=NAME, messages=history, tools=[WEATHER], options=GREEDY, stream=False)
    assert second.done and second.done_reason == "stop" and second.message.tool_calls
    engine_history = [
        *ASK,
        {"role": "assistant", "content": CONTENT,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "content": "Sunny, 22 C"},
    ]  # fmt: skip
    assert second.prompt_eval_count == hf_prompt_tokens(engine_history, [WEATHER])
    assert second.prompt_eval_count > first.prompt_eval_count + first.eval_count  # the call and result are in it
    # arguments as a JSON string (as OpenAI-minded clients send them back; the ollama client refuses) render the same
    as_text = [*ASK, {"role": "assistant", "content": CONTENT, "tool_calls": [
        {"function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]}, history[-1]]  # fmt: skip
    third = _post(tool_server, {"messages": as_text, "tools": [WEATHER], "stream": False})
    assert third.status_code == 200 and third.json()["prompt_eval_count"] == second.prompt_eval_count


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        ({"tools": {"type": "function"}}, "tools must be a list"),
        ({"tools": "get_weather"}, "tools must be a list"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, 7]}, "tools[1] must be an object"),
        ({"tools": [WEATHER, WEATHER]}, "duplicate function name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "parameters"),
        ({"messages": [*ASK, {"role": "assistant", "content": "", "tool_calls": {"name": "f"}}]},
         "messages[1].tool_calls must be a list"),
        ({"messages": [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]},
         "messages[1].tool_calls[0].function.name"),
        ({"messages": [*ASK, {"role": "assistant", "content": "", "tool_calls": [7]}]},
         "messages[1].tool_calls[0] must be an object"),
        ({"messages": [*ASK, {"role": "assistant", "content": "",
                              "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}]},
         "messages[1].tool_calls[0].function.arguments must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_tool_input_is_400(tool_server: ServerProcess, body: dict[str, Any], cause: str) -> None:
    r = _post(tool_server, {"messages": ASK, "tools": [WEATHER], "stream": False, **body})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and cause in r.json()["error"]


def test_bad_tools_through_the_client(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=NAME, messages=ASK, tools=[{"type": "function", "function": {"name": ""}}], stream=False)
    assert err.value.status_code == 400 and "tools[0].function.name" in err.value.error


def test_plain_chat_unchanged(client: ollama.Client, hf_prompt_tokens: Count) -> None:
    r = client.chat(model=NAME, messages=ASK, options=GREEDY, stream=False)
    assert r.message.content == REPLY and not r.message.tool_calls  # no tools: the reply is not parsed
    assert r.prompt_eval_count == hf_prompt_tokens(ASK)
    chunks = list(client.chat(model=NAME, messages=ASK, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == REPLY
    assert not any(c.message.tool_calls for c in chunks) and chunks[-1].done_reason == "stop"
    empty = client.chat(model=NAME, messages=ASK, tools=[], options=GREEDY, stream=False)  # [] = no tools
    assert empty.message.content == REPLY and not empty.message.tool_calls


def test_modelfile_template_tools(client: ollama.Client) -> None:
    client.create(model="go-tools", from_=NAME, template=GO_TOOLS)
    client.create(model="go-plain", from_=NAME, template=GO_PLAIN)
    assert "tools" in (client.show("go-tools").capabilities or [])
    assert "tools" not in (client.show("go-plain").capabilities or [])
    r = client.chat(model="go-tools", messages=ASK, tools=[WEATHER], options=GREEDY, stream=False)
    (call,) = r.message.tool_calls or []  # parsed in the syntax the TEMPLATE teaches
    assert call.function.name == "get_weather" and dict(call.function.arguments) == ARGS
    assert r.message.content == CONTENT
    history = [*ASK, r.message, {"role": "tool", "content": "Sunny", "tool_name": "get_weather"}]
    again = client.chat(model="go-tools", messages=history, tools=[WEATHER], options=GREEDY, stream=False)
    assert again.done and again.prompt_eval_count > r.prompt_eval_count
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="go-plain", messages=ASK, tools=[WEATHER], stream=False)
    assert err.value.status_code == 400 and "go-plain:latest does not support tools" in err.value.error
    assert client.chat(model="go-plain", messages=ASK, options=GREEDY, stream=False).message.content == REPLY


def test_template_without_tools_is_400(server: ServerProcess) -> None:
    """The shared tiny GLM-4.1V server: its own chat template has no tool syntax."""
    plain = ollama.Client(host=server.base_url, timeout=120)
    name = f"{SERVED_NAMES[0]}:latest"
    assert "tools" not in (plain.show(name).capabilities or [])
    with pytest.raises(ollama.ResponseError) as err:
        plain.chat(model=name, messages=ASK, tools=[WEATHER], stream=False)
    assert err.value.status_code == 400
    assert f"{name} does not support tools" in err.value.error and "chat template" in err.value.error
