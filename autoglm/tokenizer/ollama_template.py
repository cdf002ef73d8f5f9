"""Ollama's execution rules around a Go template (ollama `template/template.go`), for Modelfile TEMPLATEs.

A template that mentions neither `.Messages` nor `.Response` gets `{{ .Response }}` appended. A template that uses
`.Messages` is rendered once with `.System` (all system messages joined), `.Messages` (consecutive same-role turns
merged; each an `api.Message` with `.Role`, `.Content`, `.Thinking`, `.ToolCalls`, ...), `.Tools`, `.Think`;
otherwise it is rendered per turn with `.System` / `.Prompt` / `.Response` and the last turn is cut after
`.Response`, so the model continues from there.
"""

from __future__ import annotations

import json as _json
from collections.abc import Mapping, Sequence
from typing import Any

from autoglm.tokenizer import go_values as gv
from autoglm.tokenizer.go_template import GoTemplate
from autoglm.tokenizer.go_template_ast import Action, Branch, Command, Field, Pipeline, Pos
from autoglm.tokenizer.go_values import GoStruct, OrderedObject


def _omit(pairs: list[tuple[str, Any, bool]]) -> OrderedObject:
    """A Go struct's JSON: (json name, value, omitempty) in field order."""
    out = OrderedObject()
    for key, value, omitempty in pairs:
        if omitempty and not value:
            continue
        out[key] = value.json if isinstance(value, GoStruct) else value
    return out


def _arguments(args: Any) -> GoStruct:
    obj = OrderedObject(args) if isinstance(args, Mapping) else OrderedObject()
    return GoStruct("api.ToolCallFunctionArguments", {}, json=obj, text=gv.go_json(obj))


def message_value(m: Mapping[str, Any]) -> GoStruct:
    """An Ollama chat message (`api.Message`) as the template sees it: `.Role`, `.Content`, `.Thinking`,
    `.Images`, `.ToolCalls` (each `.Function.Name` / `.Function.Arguments`), `.ToolName`, `.ToolCallID`."""
    calls = []
    for i, call in enumerate(m.get("tool_calls") or []):
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = _json.loads(args)
            except ValueError:
                args = {}
        index = int(fn.get("index", i) or 0)
        a = _arguments(args)
        f = GoStruct("api.ToolCallFunction", {"Index": index, "Name": str(fn.get("name", "")), "Arguments": a})
        f.json = _omit([("index", index, False), ("name", f.fields["Name"], False), ("arguments", a, False)])
        c = GoStruct("api.ToolCall", {"ID": str(call.get("id", "") or ""), "Function": f})
        c.json = _omit([("id", c.fields["ID"], True), ("function", f, False)])
        calls.append(c)
    fields = {
        "Role": str(m.get("role", "") or "").lower(),
        "Content": str(m.get("content", "") or ""),
        "Thinking": str(m.get("thinking", "") or ""),
        "Images": list(m.get("images") or []),
        "ToolCalls": calls,
        "ToolName": str(m.get("tool_name", "") or ""),
        "ToolCallID": str(m.get("tool_call_id", "") or ""),
    }
    js = _omit([("role", fields["Role"], False), ("content", fields["Content"], False),
                ("thinking", fields["Thinking"], True), ("images", fields["Images"], True),
                ("tool_calls", [c.json for c in calls], True), ("tool_name", fields["ToolName"], True),
                ("tool_call_id", fields["ToolCallID"], True)])
    return GoStruct("*api.Message", fields, json=js)


def tool_value(t: Mapping[str, Any]) -> GoStruct:
    """An Ollama tool (`api.Tool`): `.Type`, `.Function.Name` / `.Description` / `.Parameters` (`.Type`,
    `.Required`, `.Properties` a map of `.Type` / `.Description` / `.Enum`); `json` writes it in Go's field order."""
    fn = dict(t.get("function") or {})
    params = dict(fn.get("parameters") or {})
    props = {}
    for name, p in (params.get("properties") or {}).items():
        p = dict(p or {})
        ptype = p.get("type")
        ptype = [ptype] if isinstance(ptype, str) else list(ptype or [])
        pj = _omit([("type", ptype[0] if len(ptype) == 1 else ptype, True), ("items", p.get("items"), True),
                    ("description", p.get("description", ""), True), ("enum", p.get("enum"), True),
                    ("properties", p.get("properties"), True), ("required", p.get("required"), True)])
        props[name] = GoStruct("api.ToolProperty", {"Type": ptype, "Items": p.get("items"),
                                                     "Description": str(p.get("description", "") or ""),
                                                     "Enum": list(p.get("enum") or [])}, json=pj, text=None)
    pjson = _omit([("type", params.get("type", "object"), False), ("$defs", params.get("$defs"), True),
                   ("items", params.get("items"), True), ("required", params.get("required"), True),
                   ("properties", OrderedObject((k, v.json) for k, v in props.items()), False)])
    p_struct = GoStruct("api.ToolFunctionParameters", {"Type": params.get("type", "object"),
                                                       "Required": list(params.get("required") or []),
                                                       "Properties": props}, json=pjson, text=gv.go_json(pjson))
    fjson = _omit([("name", str(fn.get("name", "")), False), ("description", str(fn.get("description", "") or ""),
                                                                              True), ("parameters", pjson, False)])
    f_struct = GoStruct("api.ToolFunction", {"Name": str(fn.get("name", "")),
                                             "Description": str(fn.get("description", "") or ""),
                                             "Parameters": p_struct}, json=fjson, text=gv.go_json(fjson))
    tjson = _omit([("type", str(t.get("type", "function")), False), ("items", t.get("items"), True),
                   ("function", fjson, False)])
    return GoStruct("api.Tool", {"Type": str(t.get("type", "function")), "Items": t.get("items"),
                                 "Function": f_struct}, json=tjson)


class OllamaTemplate:
    """An Ollama Modelfile TEMPLATE with Ollama's execution rules (see the module docstring)."""

    def __init__(self, text: str) -> None:
        self.template = GoTemplate(text)
        self.text = text
        self.vars = self.template.identifiers()
        self.root = list(self.template.parsed.root)
        if "messages" not in self.vars and "response" not in self.vars:
            self.root.append(Action(Pipeline(_end_pos(text), [], False, [Command([Field(["Response"])])],
                                             ".Response")))
            self.vars = sorted({*self.vars, "response"})

    @property
    def uses_messages(self) -> bool:
        return "messages" in self.vars or "document" in self.vars

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               think: bool | None = None, prompt: str | None = None, suffix: str | None = None) -> str:
        """Ollama's `Template.Execute`: messages (Ollama/OpenAI dicts: role, content, thinking, tool_calls,
        tool_name, images) -> prompt text. `prompt` + `suffix` renders a fill-in-the-middle request instead."""
        base = {"Think": bool(think), "IsThinkSet": think is not None}
        if prompt and suffix:
            return self.template.execute({"Prompt": prompt, "Suffix": suffix, "Response": "", **base}, self.root)
        system, collated = _collate(messages)
        if self.uses_messages:
            data = {"System": system, "Messages": [message_value(m) for m in collated],
                    "Tools": [tool_value(t) for t in tools or []], "Response": "", **base}
            return self.template.execute(data, self.root)
        out: list[str] = []
        turn = {"System": "", "Prompt": "", "Response": ""}

        def flush() -> None:
            out.append(self.template.execute({**turn, **base}, self.root))
            turn.update(System="", Prompt="", Response="")

        for m in collated:
            role, content = m.get("role"), str(m.get("content") or "")
            if role == "system":
                if turn["Prompt"] or turn["Response"]:
                    flush()
                turn["System"] = content
            elif role == "user":
                if turn["Response"]:
                    flush()
                turn["Prompt"] = content
            elif role == "assistant":
                turn["Response"] = content
        out.append(self.template.execute({**turn, **base}, _cut_after_response(self.root)))
        return "".join(out)


def _end_pos(text: str) -> Pos:
    return Pos(text.count("\n") + 1, len(text) - (text.rfind("\n") + 1) + 1)


def _collate(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's collate: system texts joined by a blank line; consecutive same-role turns merged (tool turns kept)."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        role = str(m.get("role", "") or "").lower()
        content = str(m.get("content", "") or "")
        if role == "system":
            system.append(content)
        if out and out[-1]["role"] == role and role != "tool":
            out[-1]["content"] = out[-1]["content"] + "\n\n" + content
        else:
            out.append({**m, "role": role, "content": content})
    return "\n\n".join(system), out


def _cut_after_response(nodes: list[Any]) -> list[Any]:
    """The tree up to and including the first `.Response` (in walk order); everything after it is removed, so the
    last turn ends where the model's answer begins (Ollama's deleteNode)."""
    cut = False

    def has_response(pipe: Pipeline) -> bool:
        return any(isinstance(a, Field) and "Response" in a.names for c in pipe.cmds for a in c.args)

    def walk(items: list[Any]) -> list[Any]:
        nonlocal cut
        kept: list[Any] = []
        for node in items:
            if cut:
                continue
            if isinstance(node, Action) and has_response(node.pipe):
                kept.append(node)
                cut = True
            elif isinstance(node, Branch):
                body = walk(node.body)
                else_body = walk(node.else_body) if node.else_body is not None else None
                kept.append(Branch(node.kind, node.pipe, body, else_body))
            else:
                kept.append(node)
        return kept

    return walk(nodes)
