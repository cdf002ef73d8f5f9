"""Assistant tool calls and tool results rendered back through the real templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoglm.errors import InvalidRequest
from autoglm.tokenizer.chat_template import ChatTemplate
from autoglm.tokenizer.tool_history import messages_for_template
from autoglm.tokenizer.tool_parsers import detect_tool_format

DATA = Path(__file__).resolve().parents[1] / "data"
CALL = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18C, sunny"},
]


def _render(name: str, messages: list[dict[str, object]]) -> str:
    tmpl = ChatTemplate((DATA / name).read_text(encoding="utf-8"))
    return tmpl.render(messages_for_template(messages, detect_tool_format(tmpl.source)), add_generation_prompt=True)


def test_qwen_renders_arguments_as_an_object_and_results_as_tool_responses() -> None:
    out = _render("qwen2.5_chat_template.jinja", HISTORY)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in out
    assert "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>" in out


def test_glm46_needs_a_mapping_and_gets_one() -> None:
    tmpl = ChatTemplate((DATA / "glm46_chat_template.jinja").read_text(encoding="utf-8"))
    with pytest.raises(InvalidRequest):  # the raw OpenAI message (arguments as a string) breaks `.items()`
        tmpl.render(HISTORY)
    out = _render("glm46_chat_template.jinja", HISTORY)
    assert "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>" in out
    assert "<|observation|>\n<tool_response>\n18C, sunny\n</tool_response><|assistant|>" in out


def test_glm4_0414_gets_metadata_and_observation_turns() -> None:
    out = _render("glm4z1_chat_template.jinja", [*HISTORY[:1], {**HISTORY[1], "content": "Checking."}, HISTORY[2]])
    assert '<|assistant|>\nChecking.<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n18C, sunny' in out


def test_messages_keep_other_fields_and_decode_only_json_objects() -> None:
    msgs = messages_for_template([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "x", "function": {"name": "f", "arguments": "not json"}},
        {"id": "y", "function": {"name": "g", "arguments": {"a": 1}}}]}], None)
    calls = msgs[0]["tool_calls"]
    assert calls[0]["function"]["arguments"] == "not json" and calls[0]["type"] == "function"
    assert calls[1]["function"]["arguments"] == {"a": 1} and calls[1]["id"] == "y"
    assert json.dumps(msgs)  # still plain JSON


def test_bad_tool_calls_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.tool_calls\[0\]"):
        messages_for_template([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], None)
    with pytest.raises(InvalidRequest, match="must be a list"):
        messages_for_template([{"role": "assistant", "tool_calls": {"x": 1}}], None)
