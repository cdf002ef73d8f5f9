"""Tool calls on Ollama's `/api/chat`: the request's `tools` and tool history checked and reshaped, and the reply's
calls in Ollama's shape, whole or streamed.

Ollama's tool schema is OpenAI's (`[{"type": "function", "function": {"name", "description", "parameters"}}]`);
what differs is a call: `{"id", "function": {"index", "name", "arguments": {...}}}`, `arguments` a JSON object
(OpenAI: a JSON string), in history and in replies; a result is `{"role": "tool", "content", "tool_name"}`.
The reply is parsed by the OpenAI route's parsers (`ToolFormat` of the template, `autoglm.tokenizer.tool_parsers`);
a stream sends each call once it is complete (never partial JSON), as Ollama does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from autoglm.errors import InvalidRequest
from autoglm.tokenizer.tool_calls import ParsedReply, StreamDelta, ToolCall, assemble, tool_functions
from autoglm.tokenizer.tool_history import template_calls
from autoglm.tokenizer.tool_parsers import ToolCallStream, ToolFormat

log = logging.getLogger("autoglm.server")

_TOOLS_SHAPE = "[{'type': 'function', 'function': {'name': ..., 'description': ..., 'parameters': {...}}}]"


def request_tools(raw: Any) -> list[dict[str, Any]] | None:
    """The request's `tools` (None when absent or empty); a bad shape -> InvalidRequest naming it."""
    if raw is None or (isinstance(raw, list) and not raw):
        return None
    if not isinstance(raw, list):
        raise InvalidRequest(f"tools must be a list of tools, {_TOOLS_SHAPE}; got {type(raw).__name__}", param="tools")
    tool_functions(raw)  # each one an object with function.name (names unique), parameters a schema
    return raw


def checked_history(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Request messages with every assistant `tool_calls` entry checked (a list of `{"function": {"name",
    "arguments"}}`, arguments an object or the JSON text of one, decoded) -> InvalidRequest naming the field."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"messages[{i}] must be an object", param="messages")
        msg = dict(m)
        if msg.get("tool_calls") is not None:
            calls = template_calls(msg["tool_calls"], i)
            for j, call in enumerate(calls):
                args = call["function"]["arguments"]
                if not isinstance(args, Mapping):
                    where = f"messages[{i}].tool_calls[{j}].function.arguments"
                    raise InvalidRequest(f"{where} must be a JSON object, got {args!r}", param=where)
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def engine_fields(m: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI-style fields of a checked Ollama message beyond role / content: its `tool_calls` (arguments
    objects, as templates iterate them), and for a `tool` result its `tool_name` (also as `name`) and
    `tool_call_id`."""
    out: dict[str, Any] = {}
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    if m.get("tool_name"):
        out["tool_name"] = out["name"] = str(m["tool_name"])
    if m.get("tool_call_id"):
        out["tool_call_id"] = str(m["tool_call_id"])
    return out


def reply(parsed: ParsedReply, first_index: int = 0) -> tuple[str, list[dict[str, Any]]]:
    """A parsed reply (or part of one) -> (content, Ollama tool calls numbered from `first_index`). A call whose
    arguments are not a JSON object (a reply cut off by num_predict) stays text in the content."""
    content = parsed.content or ""
    calls: list[dict[str, Any]] = []
    for call in parsed.tool_calls:
        obj = call.to_ollama(first_index + len(calls))
        if obj is None:
            log.warning(
                "tool call %r has arguments that are not a JSON object; kept as content: %r",
                call.name,
                call.arguments[:200],
            )
            content += f"{call.name} {call.arguments}"
        else:
            calls.append(obj)
    return content, calls


class ToolCallLines:
    """One streamed reply's text deltas -> (content, finished Ollama calls) per delta. Content passes as the
    parser releases it; a call is held until its arguments form a whole JSON object (or the next call starts, or
    the reply ends)."""

    def __init__(self, fmt: ToolFormat, tools: list[dict[str, Any]] | None) -> None:
        self._stream: ToolCallStream = fmt.stream(tools)
        self._open: dict[int, list[StreamDelta]] = {}  # call index -> its pieces so far
        self._sent = 0  # Ollama index of the next call

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        return self._take(self._stream.feed(text), final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        return self._take(self._stream.finish(), final=True)

    def _take(self, delta: StreamDelta, *, final: bool) -> tuple[str, list[dict[str, Any]]]:
        for piece in delta.tool_calls:
            self._open.setdefault(piece.index, []).append(StreamDelta(tool_calls=[piece]))
        done: list[ToolCall] = []
        for index in sorted(self._open):
            calls = assemble(self._open[index]).tool_calls
            later = any(i > index for i in self._open)
            if final or later or (calls and calls[0].to_ollama(0) is not None):
                done += calls
                del self._open[index]
        content, calls = reply(ParsedReply(delta.content, done), self._sent)
        self._sent += len(calls)
        return content, calls
