"""API_NOTES §2's thinking table on a live server, streamed and not, with LangChain's ChatOpenAI as the article
uses it. The server's decoder follows a token script that thinks (tests/server/scripted_model.py); the expected
texts come from decoding the script's tokens with the same tokenizer."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from autoglm.loader import load_model
from tests.fixtures.server import SERVED_NAMES, ServerProcess
from tests.server.scripted_model import expected_texts, make_script

MESSAGES = [{"role": "user", "content": "你是谁?"}]


@pytest.fixture(scope="module")
def script_info(scripted_server: ServerProcess) -> tuple[str, str, int]:
    """(reasoning text, answer text, number of reasoning tokens) of the served script."""
    model = load_model(str(scripted_server.model_dir), no_vision=True)
    script = make_script(model)
    reasoning, answer = expected_texts(model, script)
    assert reasoning and answer and reasoning != answer
    return reasoning, answer, len(script.reasoning_ids)


@pytest.fixture(scope="module")
def texts(script_info: tuple[str, str, int]) -> tuple[str, str]:
    return script_info[0], script_info[1]


@pytest.fixture(scope="module")
def client(scripted_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=scripted_server.v1, api_key="EMPTY", max_retries=0, timeout=60)


def _rows(reasoning: str, answer: str) -> list[tuple[dict[str, Any], str, str | None]]:
    """(extra request fields, expected content, expected reasoning or None when the fields must be absent)."""
    return [
        ({}, reasoning + answer, None),
        ({"return_reasoning": True}, answer, reasoning),
        ({"enable_thinking": True, "return_reasoning": True}, answer, reasoning),
        ({"return_reasoning": False}, answer, None),
        ({"reasoning_format": "inline"}, f"<think>{reasoning}</think>{answer}", None),
        ({"enable_thinking": False}, answer, None),
        ({"chat_template_kwargs": {"enable_thinking": False}}, answer, None),
    ]


def test_table_non_streaming(client: openai.OpenAI, script_info: tuple[str, str, int]) -> None:
    for extra, content, reasoning in _rows(*script_info[:2]):
        reply = client.chat.completions.create(model=SERVED_NAMES[0], messages=MESSAGES, max_tokens=32,
                                               extra_body=extra)
        message = reply.choices[0].message
        assert message.content == content, extra
        fields = message.model_extra or {}
        if reasoning is None:
            assert "reasoning_content" not in fields and "reasoning" not in fields, extra
        else:
            assert fields["reasoning_content"] == reasoning and fields["reasoning"] == reasoning, extra
        thinking = extra.get("enable_thinking", (extra.get("chat_template_kwargs") or {}).get("enable_thinking"))
        n_reasoning = reply.usage.completion_tokens_details.reasoning_tokens
        assert n_reasoning == (0 if thinking is False else script_info[2]), extra
        assert reply.choices[0].finish_reason == "stop"


def test_table_streaming(client: openai.OpenAI, texts: tuple[str, str]) -> None:
    for extra, content, reasoning in _rows(*texts):
        chunks = list(client.chat.completions.create(
            model=SERVED_NAMES[0], messages=MESSAGES, max_tokens=32, stream=True,
            stream_options={"include_usage": True}, extra_body=extra,
        ))
        assert chunks[0].choices[0].delta.role == "assistant"
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == content, extra
        got_r = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        got_r2 = "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas)
        assert got_r == got_r2 == (reasoning or ""), extra
        assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_truncated_reasoning_inline_is_closed(client: openai.OpenAI, texts: tuple[str, str]) -> None:
    reasoning, _ = texts
    # two tokens: <think> and the first reasoning token; the tag is closed so clients can parse it
    reply = client.chat.completions.create(model=SERVED_NAMES[0], messages=MESSAGES, max_tokens=2,
                                           extra_body={"reasoning_format": "inline"})
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert content.startswith("<think>") and content.endswith("</think>")
    assert reasoning.startswith(content[len("<think>"):-len("</think>")])


def test_assistant_history_reasoning_fields_accepted(client: openai.OpenAI) -> None:
    history = [*MESSAGES, {"role": "assistant", "content": "hello", "reasoning_content": "r"},
               {"role": "user", "content": "again"}]
    reply = client.chat.completions.create(model=SERVED_NAMES[0], messages=history, max_tokens=4)
    assert reply.choices[0].message.content


# --- LangChain, with the article's arguments ------------------------------------------------------------------------
def _chat_model(server: ServerProcess, **extra_body: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=SERVED_NAMES[0], temperature=0.5, base_url=server.v1, api_key="EMPTY",
                      extra_body={"enable_thinking": True, "return_reasoning": True, **extra_body},
                      streaming=True, max_retries=0, timeout=60)


def test_langchain_invoke_and_stream(scripted_server: ServerProcess, texts: tuple[str, str]) -> None:
    _, answer = texts
    chat_model = _chat_model(scripted_server)
    message = chat_model.invoke("你是谁?")
    assert message.content == answer  # LangChain reads only `content`; the reasoning went to its own fields
    pieces = [chunk.content for chunk in chat_model.stream("你是谁?")]
    assert "".join(pieces) == answer and len([p for p in pieces if p]) >= 2


def test_langchain_inline_reasoning_reaches_content(scripted_server: ServerProcess, texts: tuple[str, str]) -> None:
    reasoning, answer = texts
    chat_model = _chat_model(scripted_server, reasoning_format="inline")
    expected = f"<think>{reasoning}</think>{answer}"
    assert chat_model.invoke("你是谁?").content == expected
    assert "".join(chunk.content for chunk in chat_model.stream("你是谁?")) == expected
