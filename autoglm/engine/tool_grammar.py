"""Grammars that force a tool call (`tool_choice` "required" or a named function) in the model's own format.

Written in llguidance's Lark dialect: `%json{schema}` for JSON parts, `<[id]>` for markup that the tokenizer has as
one added token (llguidance matches added tokens only by id, so the literal text would be refused). The grammar
ends after the last call; the sampler then only allows end-of-sequence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from autoglm.engine.grammar import JSON_WHITESPACE, GrammarSpec
from autoglm.errors import InvalidRequest
from autoglm.tokenizer.tokenizer import Tokenizer
from autoglm.tokenizer.tool_calls import parameters_schema, string_parameters, tool_functions
from autoglm.tokenizer.tool_parsers import Glm4ToolFormat, Glm45ToolFormat, HermesToolFormat, ToolFormat


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Markup:
    """Lark spelling of a format's tags for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._added = {tok.content: tid for tid, tok in tokenizer.backend.get_added_tokens_decoder().items()}

    def __call__(self, tag: str) -> str:
        tid = self._added.get(tag)
        return f"<[{tid}]>" if tid is not None else _lit(tag)


def _json(schema: Mapping[str, Any]) -> str:
    return "%json" + json.dumps({**schema, "x-guidance": JSON_WHITESPACE}, ensure_ascii=False)


def _chosen(tools: Sequence[Any] | None, tool_choice: Any) -> tuple[list[dict[str, Any]], bool]:
    """(functions the call may use, whether several calls are allowed) for a forcing tool_choice."""
    functions = tool_functions(tools)
    if not functions:
        raise InvalidRequest("tool_choice requires a call but the request has no tools", param="tool_choice")
    if tool_choice == "required":
        return list(functions.values()), True
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, Mapping) else None
    if not isinstance(name, str):
        raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if name not in functions:
        raise InvalidRequest(f"tool_choice names function {name!r}, which is not in tools "
                             f"({', '.join(sorted(functions))})", param="tool_choice")
    return [functions[name]], False


def _hermes(functions: list[dict[str, Any]], many: bool, tag: _Markup) -> str:
    calls = [{"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": parameters_schema(fn)},
              "required": ["name", "arguments"], "additionalProperties": False} for fn in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    call = f'call: {tag("<tool_call>")} "\\n" {_json(schema)} "\\n" {tag("</tool_call>")}'
    return ('start: call ("\\n" call)*\n' if many else "start: call\n") + call + "\n"


_RAW_STRING_KEYS = {"type", "description", "title", "default", "examples", "minLength", "maxLength", "enum", "const",
                    "pattern"}


def _raw_string(fn: str, key: str, sub: Mapping[str, Any]) -> str:
    """A GLM-4.5 string value is written raw (no quotes), so its JSON-schema constraints become a Lark expression."""
    unknown = sorted(set(sub) - _RAW_STRING_KEYS)
    if unknown:
        raise InvalidRequest(f"tools: parameter {key!r} of {fn!r}: {', '.join(unknown)} cannot be enforced on a raw "
                             "string value in this model's tool-call format", param="tools")
    if "const" in sub or "enum" in sub:
        values = [sub["const"]] if "const" in sub else list(sub["enum"])
        return "(" + " | ".join(_lit(str(v)) for v in values) + ")"
    if "pattern" in sub:
        return "/" + str(sub["pattern"]).replace("/", "\\/") + "/"
    low, high = int(sub.get("minLength", 0)), sub.get("maxLength")
    # no "<": the value ends at </arg_value>
    return f"/[^<]{{{low},{int(high)}}}/" if high is not None else ("/[^<]*/" if low == 0 else f"/[^<]{{{low},}}/")


def _glm45(functions: list[dict[str, Any]], many: bool, tag: _Markup) -> str:
    rules = []
    for i, fn in enumerate(functions):
        schema = parameters_schema(fn)
        required = set(schema.get("required") or ())
        raw = string_parameters(fn)
        args = []
        for key, sub in (schema.get("properties") or {}).items():
            sub = sub if isinstance(sub, Mapping) else {}
            value = _raw_string(fn["name"], key, sub) if key in raw else _json(sub)
            arg = (f'{tag("<arg_key>")} {_lit(key)} {tag("</arg_key>")} "\\n" {tag("<arg_value>")} {value} '
                   f'{tag("</arg_value>")} "\\n"')
            args.append(f"({arg})" if key in required else f"({arg})?")
        rules.append(f'fn{i}: {_lit(fn["name"] + chr(10))} {" ".join(args)}'.rstrip())
    names = " | ".join(f"fn{i}" for i in range(len(functions)))
    # the template puts a newline between `<think></think>` and the first call
    head = 'start: "\\n"? call ("\\n" call)*\n' if many else 'start: "\\n"? call\n'
    return head + f'call: {tag("<tool_call>")} ({names}) {tag("</tool_call>")}\n' + "\n".join(rules) + "\n"


def _glm4(functions: list[dict[str, Any]], tag: _Markup) -> str:
    alts = " | ".join(f"fn{i}" for i in range(len(functions)))
    rules = [f'fn{i}: {_lit(fn["name"] + chr(10))} {_json(parameters_schema(fn))}' for i, fn in enumerate(functions)]
    return f"start: {alts}\n" + "\n".join(rules) + "\n"


def tool_call_grammar(tool_format: ToolFormat, tools: Sequence[Any] | None, tool_choice: Any,
                      tokenizer: Tokenizer, *, parallel_tool_calls: bool = True) -> GrammarSpec | None:
    """The grammar a `tool_choice` imposes: None for "none" / "auto" / absent; for "required" one or more calls
    of any tool (exactly one with `parallel_tool_calls=False`, and for GLM-4-0414, whose format has one call per
    turn); for a named function exactly one call of it. Unknown names or a forced call without tools ->
    InvalidRequest."""
    if tool_choice in (None, "none", "auto"):
        return None
    functions, many = _chosen(tools, tool_choice)
    many = many and parallel_tool_calls
    tag = _Markup(tokenizer)
    if isinstance(tool_format, HermesToolFormat):
        return GrammarSpec.lark(_hermes(functions, many, tag))
    if isinstance(tool_format, Glm45ToolFormat):
        return GrammarSpec.lark(_glm45(functions, many, tag))
    if isinstance(tool_format, Glm4ToolFormat):
        return GrammarSpec.lark(_glm4(functions, tag))
    raise InvalidRequest(f"tool_choice {tool_choice!r} cannot be enforced for tool format {tool_format.name!r}",
                         param="tool_choice")
