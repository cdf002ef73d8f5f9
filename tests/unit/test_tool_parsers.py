"""Tool-call formats on the real chat templates: render a call, parse it back, stream it in pieces.

Templates: Qwen2.5's (from the Qwen2.5-Coder-0.5B-Instruct GGUF metadata), GLM-4.6's (zai-org, as in llama.cpp's
models/templates; GLM-4.5 uses the same tool syntax), GLM-Z1-0414's (the GLM-4-0414 family's `metadata` /
`observation` turns), and GLM-4.1V's (no tool syntax).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from autoglm.tokenizer.chat_template import ChatTemplate
from autoglm.tokenizer.tool_calls import StreamDelta, assemble
from autoglm.tokenizer.tool_history import messages_for_template
from autoglm.tokenizer.tool_parsers import (
    Glm4ToolFormat,
    Glm45ToolFormat,
    HermesToolFormat,
    ToolFormat,
    detect_tool_format,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TEMPLATES = {
    "hermes": DATA / "qwen2.5_chat_template.jinja",
    "glm45": DATA / "glm46_chat_template.jinja",
    "glm4": DATA / "glm4z1_chat_template.jinja",
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "detail": {"type": "object"}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]
CALLS = [("get_weather", {"city": "Paris <Île-de-France>", "days": 3, "detail": {"wind": True, "levels": [1, 2]}}),
         ("get_time", {"tz": "Europe/Rome"})]
MARKUP = ("<tool_call", "</tool_call", "<arg_", "</arg_")


def _template(name: str) -> ChatTemplate:
    return ChatTemplate(TEMPLATES[name].read_text(encoding="utf-8"), name=name)


def _openai_calls(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(calls)]


def _rendered_reply(fmt_name: str, calls: list[tuple[str, dict[str, Any]]], content: str = "") -> str:
    """The assistant turn exactly as the real template writes it (= what the model was trained to generate)."""
    tmpl = _template(fmt_name)
    fmt = detect_tool_format(tmpl.source)
    user = [{"role": "user", "content": "What is the weather in Paris?"}]
    turn = {"role": "assistant", "content": content, "tool_calls": _openai_calls(calls)}
    full = tmpl.render(messages_for_template([*user, turn], fmt), tools=TOOLS, add_generation_prompt=False)
    if fmt_name == "hermes":
        reply = full.split("<|im_start|>assistant\n", 1)[1]
        return reply.split("<|im_end|>", 1)[0]
    if fmt_name == "glm45":
        reply = full.split("<|assistant|>", 1)[1]
        return reply.split("<think></think>", 1)[1]
    assert len(calls) == 1  # GLM-4-0414: one call per assistant turn
    return full.split("<|assistant|>", 1)[1]


def _stream(fmt: ToolFormat, text: str, pieces: list[str]) -> list[StreamDelta]:
    stream = fmt.stream(TOOLS)
    deltas = [stream.feed(p) for p in pieces]
    deltas.append(stream.finish())
    assert "".join(pieces) == text
    return deltas


def _random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 40))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_format_is_chosen_from_the_template_text() -> None:
    assert isinstance(detect_tool_format(TEMPLATES["hermes"].read_text()), HermesToolFormat)
    assert isinstance(detect_tool_format(TEMPLATES["glm45"].read_text()), Glm45ToolFormat)
    assert isinstance(detect_tool_format(TEMPLATES["glm4"].read_text()), Glm4ToolFormat)
    assert detect_tool_format((DATA / "glm4v_chat_template.jinja").read_text()) is None
    assert detect_tool_format(None) is None


@pytest.mark.parametrize("fmt_name", ["hermes", "glm45", "glm4"])
def test_rendered_calls_parse_back(fmt_name: str) -> None:
    calls = CALLS if fmt_name != "glm4" else CALLS[:1]
    reply = _rendered_reply(fmt_name, calls)
    parsed = detect_tool_format(_template(fmt_name).source).parse(reply, TOOLS)  # type: ignore[union-attr]
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)
    assert len({c.id for c in parsed.tool_calls}) == len(calls)


@pytest.mark.parametrize("fmt_name", ["hermes", "glm45"])
def test_content_before_calls_is_kept(fmt_name: str) -> None:
    reply = _rendered_reply(fmt_name, CALLS, content="Let me check both.")
    parsed = detect_tool_format(_template(fmt_name).source).parse(reply, TOOLS)  # type: ignore[union-attr]
    assert parsed.content == "Let me check both."
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("fmt_name", ["hermes", "glm45", "glm4"])
def test_streamed_deltas_reassemble_to_the_same_calls(fmt_name: str) -> None:
    calls = CALLS if fmt_name != "glm4" else CALLS[:1]
    fmt = detect_tool_format(_template(fmt_name).source)
    assert fmt is not None
    text = ("" if fmt_name == "glm4" else "Checking.\n") + _rendered_reply(fmt_name, calls)
    whole = fmt.parse(text, TOOLS)
    rng = random.Random(fmt_name)
    splits = [[text[i:i + 1] for i in range(len(text))], [text]] + [_random_pieces(text, rng) for _ in range(30)]
    for pieces in splits:
        deltas = _stream(fmt, text, pieces)
        got = assemble(deltas)
        assert got.content == whole.content
        assert [(c.name, c.arguments) for c in got.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
        for d in deltas:  # never partial (or whole) markup in content
            assert not any(m in d.content for m in MARKUP), d
        seen: set[int] = set()
        for d in deltas:
            for piece in d.tool_calls:  # OpenAI's shape: the opening piece names the call, the rest add arguments
                wire = piece.to_openai()
                if piece.index not in seen:
                    assert wire["id"].startswith("call_") and wire["type"] == "function"
                    assert wire["function"]["name"] in {"get_weather", "get_time"}
                    seen.add(piece.index)
                else:
                    assert set(wire) == {"index", "function"} and set(wire["function"]) == {"arguments"}


def test_hermes_arguments_keep_the_models_spelling() -> None:
    reply = '<tool_call>\n{"name": "get_time", "arguments": {"tz":"UTC"}}\n</tool_call>'
    assert HermesToolFormat().parse(reply, TOOLS).tool_calls[0].arguments == '{"tz":"UTC"}'


def test_glm45_values_are_raw_for_string_parameters_and_json_otherwise() -> None:
    reply = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>42</arg_value>\n"
             "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n<arg_key>note</arg_key>\n"
             "<arg_value>not json</arg_value>\n</tool_call>")
    (call,) = Glm45ToolFormat().parse(reply, TOOLS).tool_calls
    assert json.loads(call.arguments) == {"city": "42", "days": 2, "note": "not json"}


def test_glm45_call_without_arguments() -> None:
    (call,) = Glm45ToolFormat().parse("<tool_call>get_time\n</tool_call>", TOOLS).tool_calls
    assert (call.name, call.arguments) == ("get_time", "{}")


@pytest.mark.parametrize(("fmt", "text"), [
    (HermesToolFormat(), '<tool_call>\n{"name": "get_time", "arguments": {"tz": }\n</tool_call>'),
    (HermesToolFormat(), "<tool_call>\nnot json at all\n</tool_call> and more"),
    (HermesToolFormat(), '<tool_call>\n{"arguments": {}}\n</tool_call>'),
    (HermesToolFormat(), "a < b, and <tool"),
    (Glm45ToolFormat(), "<tool_call>\n</tool_call>"),
    (Glm45ToolFormat(), "<tool_call>get_time\n<arg_key>tz</arg_key>oops</tool_call>"),
    (Glm4ToolFormat(), "get_weather is what I would call, but no."),
    (Glm4ToolFormat(), "get_time\nnot json"),
    (Glm4ToolFormat(), "Sure! Here you go."),
])
def test_malformed_calls_stay_content(fmt: ToolFormat, text: str) -> None:
    # (GLM-4-0414 announces `get_time` at the first newline, so its stream sends that call; the whole reply does not)
    parsed = fmt.parse(text, TOOLS)
    assert parsed.tool_calls == [] and parsed.content == text


def test_truncated_call_is_content_when_unparsable_and_a_call_when_complete() -> None:
    fmt = HermesToolFormat()
    cut = '<tool_call>\n{"name": "get_time", "argu'
    assert fmt.parse(cut, TOOLS).content == cut
    done = fmt.parse('<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}', TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in done.tool_calls] == [("get_time", {"tz": "UTC"})]


def test_a_call_cut_after_its_name_is_left_out_of_the_whole_reply() -> None:
    """max_tokens ends the reply inside a call's arguments: the stream has announced it, the non-streaming reply
    keeps only the calls whose arguments parse (every `arguments` there is a JSON object), the rest as text."""
    fmt = HermesToolFormat()
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
    parsed = fmt.parse(one, TOOLS)
    assert parsed.tool_calls == [] and parsed.content == one
    two = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\n' + one
    parsed = fmt.parse(two, TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_time", {"tz": "UTC"})]
    stream = fmt.stream(TOOLS)  # the stream still sends what it announced
    streamed = assemble([stream.feed(one), stream.finish()])
    assert [c.name for c in streamed.tool_calls] == ["get_weather"]


def test_plain_content_streams_through_without_waiting() -> None:
    stream = HermesToolFormat().stream(TOOLS)
    assert stream.feed("Hello").content == "Hello"
    assert stream.feed(" world <").content == " world"  # "<" may open a tag: held back
    assert stream.feed("3 is less").content == " <3 is less"
    assert stream.finish().content == ""


def test_glm4_content_starting_like_a_tool_name_is_released() -> None:
    stream = Glm4ToolFormat().stream(TOOLS)
    assert stream.feed("get").content == ""  # could still be `get_time\n`
    assert stream.feed("ting there").content == "getting there"
