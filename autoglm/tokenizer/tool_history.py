"""Assistant `tool_calls` and `role: tool` results, reshaped for the model's own chat template.

OpenAI clients send a call's `arguments` as a JSON string; templates iterate it as a mapping (GLM-4.5's
`tc.arguments.items()`, Qwen's `arguments | tojson`), so the string is decoded first, as vLLM does. GLM-4-0414's
template knows neither `tool_calls` nor `role: tool`: a call is an assistant turn whose `metadata` is the function
name and whose content is the arguments JSON, and a result is an `observation` turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from autoglm.errors import InvalidRequest
from autoglm.tokenizer.tool_calls import arguments_mapping
from autoglm.tokenizer.tool_parsers import Glm4ToolFormat, ToolFormat


def _as_dict(message: Any, index: int) -> dict[str, Any]:
    if isinstance(message, Mapping):
        return dict(message)
    dump = getattr(message, "model_dump", None)
    if callable(dump):  # the server's pydantic messages
        return dict(dump(exclude_none=True))
    raise InvalidRequest(f"messages[{index}] must be an object", param=f"messages[{index}]")


def _call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise InvalidRequest(f"{where} must be an object", param=where)
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"{where}.function.name must be a string", param=f"{where}.function.name")
    out = dict(call)
    out["function"] = {**fn, "arguments": arguments_mapping(fn.get("arguments") or {})}
    out.setdefault("type", "function")
    return out


def template_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    """`messages[index].tool_calls` (OpenAI's or Ollama's shape) checked, each with `type` set and its arguments a
    mapping when they are a JSON object (or its text); a bad shape -> InvalidRequest naming the field."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where} must be a list", param=where)
    return [_call(c, f"{where}[{j}]") for j, c in enumerate(calls)]


def messages_for_template(messages: Sequence[Any], tool_format: ToolFormat | None) -> list[dict[str, Any]]:
    """Messages ready for `ChatTemplate.render`: every assistant tool call's arguments decoded to a mapping, and for
    GLM-4-0414-style templates calls and results rewritten as `metadata` / `observation` turns."""
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(messages):
        msg = _as_dict(raw, i)
        if msg.get("tool_calls") is not None:
            msg["tool_calls"] = template_calls(msg["tool_calls"], i)
        if isinstance(tool_format, Glm4ToolFormat):
            out += _glm4_turns(msg)
        else:
            out.append(msg)
    return out


def _glm4_turns(msg: dict[str, Any]) -> list[dict[str, Any]]:
    role = msg.get("role")
    if role == "tool":
        return [{"role": "observation", "content": msg.get("content") or ""}]
    if role != "assistant" or not msg.get("tool_calls"):
        return [msg]
    turns: list[dict[str, Any]] = []
    if msg.get("content"):
        turns.append({"role": "assistant", "content": msg["content"]})
    for call in msg["tool_calls"]:
        fn = call["function"]
        args = fn["arguments"]
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        turns.append({"role": "assistant", "metadata": fn["name"], "content": text})
    return turns
