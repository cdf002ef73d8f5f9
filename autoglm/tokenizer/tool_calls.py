"""Tool calls in OpenAI's shape: finished calls, streaming deltas, and what a request's `tools` say about them.

A finished call is `{"id", "type": "function", "function": {"name", "arguments"}}` with `arguments` a JSON string
(OpenAI's wire shape; `to_ollama` gives Ollama's, the arguments an object). A streaming call arrives as deltas
with the same `index`: the first carries `id`, `type` and `function.name` (arguments ""), the following ones only
`function.arguments` pieces; their concatenation is the finished call's `arguments`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoglm.errors import InvalidRequest


def new_call_id() -> str:
    """`call_` + 24 hex digits, the shape OpenAI and vLLM use."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One finished call; `arguments` is a JSON text (an object)."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def to_ollama(self, index: int) -> dict[str, Any] | None:
        """Ollama's shape, `arguments` the JSON object itself; None when the text is not a JSON object."""
        args = arguments_mapping(self.arguments)
        if not isinstance(args, dict):
            return None
        return {"id": self.id, "function": {"index": index, "name": self.name, "arguments": args}}


@dataclass
class ToolCallDelta:
    """One streaming piece of call number `index`: the opening piece has `id` and `name`, later ones `arguments`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        if self.id is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class StreamDelta:
    """What one text delta of the reply turned into: visible content and tool-call pieces (either may be empty)."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass
class ParsedReply:
    """A whole reply split into content (None when only whitespace is left) and finished tool calls."""

    content: str | None
    tool_calls: list[ToolCall]


def assemble(deltas: Sequence[StreamDelta]) -> ParsedReply:
    """Join stream deltas into the finished reply (the non-streaming answer is built this way too)."""
    content = "".join(d.content for d in deltas)
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        for piece in d.tool_calls:
            if piece.id is not None:
                calls[piece.index] = ToolCall(name=piece.name or "", arguments=piece.arguments, id=piece.id)
            else:
                calls[piece.index].arguments += piece.arguments
    return ParsedReply(content=content if content.strip() else None, tool_calls=[calls[i] for i in sorted(calls)])


# --- what the request's `tools` say --------------------------------------------------------------------------------
def tool_function(tool: Any, index: int = 0) -> dict[str, Any]:
    """The `function` object of an OpenAI tool ({"type": "function", "function": {...}}); a bare function object
    (with `name`) is accepted too. Anything else -> InvalidRequest naming `tools[index]`."""
    if not isinstance(tool, Mapping):
        raise InvalidRequest(f"tools[{index}] must be an object", param=f"tools[{index}]")
    fn = tool.get("function", tool)
    if tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
        raise InvalidRequest(f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}}",
                             param=f"tools[{index}]")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"tools[{index}].function.name must be a non-empty string",
                             param=f"tools[{index}].function.name")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise InvalidRequest(f"tools[{index}].function.parameters must be a JSON schema object",
                             param=f"tools[{index}].function.parameters")
    return dict(fn)


def tool_functions(tools: Sequence[Any] | None) -> dict[str, dict[str, Any]]:
    """{name: function object} for the request's tools (validated; duplicate names -> InvalidRequest)."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or ()):
        fn = tool_function(tool, i)
        if fn["name"] in out:
            raise InvalidRequest(f"tools[{i}]: duplicate function name {fn['name']!r}", param=f"tools[{i}]")
        out[fn["name"]] = fn
    return out


def parameters_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
    """The function's `parameters` schema; a function without one takes an empty object."""
    params = fn.get("parameters")
    return dict(params) if isinstance(params, Mapping) else {"type": "object", "properties": {}}


def string_parameters(fn: Mapping[str, Any]) -> set[str]:
    """Top-level parameters typed as (only) string: their values are written raw in the GLM-4.5 format."""
    props = parameters_schema(fn).get("properties") or {}
    out = set()
    for key, sub in props.items():
        kind = sub.get("type") if isinstance(sub, Mapping) else None
        if kind == "string" or (isinstance(kind, list) and [k for k in kind if k != "null"] == ["string"]):
            out.add(key)
    return out


def dumps_arguments(arguments: Mapping[str, Any]) -> str:
    """The JSON text of an arguments object, in the one spelling both the streaming and the whole-reply paths use."""
    return json.dumps(dict(arguments), ensure_ascii=False)


def arguments_mapping(arguments: Any) -> Any:
    """`arguments` as templates want them: a JSON string becomes the object it encodes (as vLLM does before
    rendering); a string that is not a JSON object stays as it is."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments
