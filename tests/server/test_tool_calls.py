"""Tool calling, structured outputs, n > 1 and models.retrieve with the official openai SDK against the live server
on the built-in Qwen2.5-Coder-0.5B-Instruct (its own ChatML template with tools, Hermes `<tool_call>` format).

Forced calls (`tool_choice` required / named) and `response_format` are enforced by the grammar mask, so the
assertions hold for any sampled output; generated tokens are kept few."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from autoglm.builtins import default_model_path
from tests.fixtures.server import ServerProcess, start_server

NAME = "qwen-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = default_model_path()
    if not Path(path).exists():
        pytest.skip(f"the built-in model is not installed at {path}")
    handle = start_server(Path(path), tmp_path_factory.mktemp("tools") / "logs", "--served-model-name", NAME)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="EMPTY", max_retries=0, timeout=300)


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 40)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=NAME, messages=kw.pop("messages", ASK), **kw)


def _call_args(call: Any, tool: dict[str, Any]) -> dict[str, Any]:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_required_weather_call(client: openai.OpenAI) -> None:
    r = _chat(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert isinstance(_call_args(call, WEATHER)["city"], str)


def test_named_function_among_two(client: openai.OpenAI) -> None:
    r = _chat(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    _call_args(call, TIME)
    assert r.choices[0].finish_reason == "tool_calls"


def test_two_tool_choice_calls_a_listed_tool(client: openai.OpenAI) -> None:
    r = _chat(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=1,
              seed=5)
    (call,) = r.choices[0].message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    _call_args(call, tool)


def test_streamed_call_reassembles_to_the_non_streamed_one(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    whole = _chat(client, **kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict[str, Any]] = {}
    content, finish = "", None
    for chunk in _chat(client, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.id is not None:  # the opening piece: id and name first
                assert piece.index not in calls and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            calls[piece.index]["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert "<tool_call>" not in content and not content.strip()
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == whole.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    first = _chat(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    messages = [*ASK, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    r = _chat(client, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=12)
    msg = r.choices[0].message
    assert msg.tool_calls is None and msg.content
    # the call and its result are rendered into the prompt (tool_choice none: the tool list itself is not)
    alone = _chat(client, tools=[WEATHER], tool_choice="none", max_tokens=1).usage.prompt_tokens
    assert r.usage.prompt_tokens > alone + len(call.function.arguments) // 4


def test_json_schema_response_validates(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    for seed in range(4):
        r = _chat(client, messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=1,
                  seed=seed, max_tokens=60, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_and_guided_choice(client: openai.OpenAI) -> None:
    r = _chat(client, response_format={"type": "json_object"}, max_tokens=60, temperature=1, seed=1)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = _chat(client, extra_body={"guided_choice": ["sunny", "rainy"]}, temperature=1, seed=2)
    assert r.choices[0].message.content in ("sunny", "rainy")


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": 3}}},
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"not": {"type": "string"}}}},
    {"type": "yaml"},
])
def test_bad_schema_is_400(client: openai.OpenAI, fmt: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, response_format=fmt)
    assert "response_format" in str(info.value)


def test_schema_past_the_parsers_limits_is_400(client: openai.OpenAI) -> None:
    """700 properties overflow the grammar parser's row limit on its first token, at the top of the schema or nested:
    a 400 before anything is generated (the compile-time probe), with the parser's first line and none of its state
    or grammar, and the server unharmed."""
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(700)}}
    nested = {"type": "object", "properties": {"a": wide}, "required": ["a"], "additionalProperties": False}
    for schema in (wide, nested):
        fmt = {"type": "json_schema", "json_schema": {"name": "wide", "schema": schema}}
        with pytest.raises(openai.BadRequestError, match="too large or complex") as info:
            _chat(client, response_format=fmt, max_tokens=16)
        assert "<state>" not in str(info.value) and len(str(info.value)) < 1000
    assert _chat(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")  # the server is unharmed


@pytest.mark.parametrize("schema", [{"type": "banana"}, {"$ref": "#/$defs/missing"}])
def test_a_bad_tool_schema_is_blamed_on_that_tool(client: openai.OpenAI, schema: dict[str, Any]) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": schema}}
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, tools=[WEATHER, bad], tool_choice="required")
    error = info.value.body
    assert error["param"] == "tools[1].function.parameters", error
    assert error["message"].startswith("tools[1].function.parameters: unsupported or invalid JSON schema")


@pytest.mark.parametrize("kw", [
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tool_choice": "required"},
    {"tools": [WEATHER], "tool_choice": "sometimes"},
    {"tools": [{"type": "function", "function": {"name": ""}}]},
    {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
    {"extra_body": {"guided_regex": "[a-z]+", "guided_choice": ["a", "b"]}},
])
def test_bad_tool_or_constraint_requests_are_400(client: openai.OpenAI, kw: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError):
        _chat(client, **kw)


def test_n_choices(client: openai.OpenAI) -> None:
    r = _chat(client, n=2, max_tokens=4, temperature=1, seed=11)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    one = _chat(client, max_tokens=4, temperature=1, seed=11)
    assert r.choices[0].message.content == one.choices[0].message.content  # choice 0 keeps the seed
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    # every choice is counted: 4 tokens each when both ran to the limit
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 8
    assert 2 <= r.usage.completion_tokens <= 8


def test_n_streamed(client: openai.OpenAI) -> None:
    finishes: dict[int, str] = {}
    text: dict[int, str] = {0: "", 1: ""}
    for chunk in _chat(client, n=2, max_tokens=4, temperature=1, seed=11, stream=True):
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert set(finishes) == {0, 1}
    whole = _chat(client, n=2, max_tokens=4, temperature=1, seed=11)
    assert [text[0], text[1]] == [c.message.content for c in whole.choices]


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(NAME)
    assert model.id == NAME and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completions_guided_regex_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model=NAME, prompt="The answer is", max_tokens=8, temperature=1, seed=4, n=2,
                                  extra_body={"guided_regex": "[0-9]{1,3}"})
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.text.isdigit() and len(c.text) <= 3
        assert c.finish_reason == "stop"
