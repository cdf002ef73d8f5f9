"""Go `text/template` renderer for Ollama templates (Modelfile `TEMPLATE`), parsed once into an AST.

`GoTemplate(text)` parses (raising `GoTemplateError` with Go's message: `template: :3: unexpected EOF`);
`.execute(data)` renders with Go semantics (missing map keys read as nil and print `<no value>`, Ollama's
`missingkey=zero`) and Ollama's functions (`json`, `currentDate`, `yesterdayDate` besides Go's builtins).
Work is bounded: `range` iterates data only, every node visit counts against a step budget, output is capped.

`autoglm.tokenizer.ollama_template.OllamaTemplate` adds what Ollama does around it (messages vs per-turn rendering).
"""

from __future__ import annotations

import datetime as _dt
import json as _json
from collections.abc import Callable, Sequence
from typing import Any

from autoglm.tokenizer import go_values as gv
from autoglm.tokenizer.go_template_ast import (
    Action,
    Branch,
    Chain,
    Command,
    Field,
    GoTemplateError,
    Identifier,
    Literal,
    Loop,
    Parsed,
    Pipeline,
    TemplateCall,
    Text,
    Variable,
)
from autoglm.tokenizer.go_template_parse import parse
from autoglm.tokenizer.go_values import GoStruct

__all__ = ["GoStruct", "GoTemplate", "GoTemplateError"]

MAX_STEPS = 2_000_000  # node visits + range iterations per render
MAX_OUTPUT = 32 << 20  # characters
MAX_DEPTH = 64  # nested {{template}} calls


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _ExecError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _f_index(item: Any, *keys: Any) -> Any:
    for k in keys:
        if item is None:
            raise _ExecError("index of untyped nil")
        if isinstance(item, dict):
            item = item.get(k)
        elif isinstance(item, list | tuple | str):
            if not isinstance(k, int) or isinstance(k, bool):
                raise _ExecError(f"cannot index slice/array with type {gv.type_name(k)}")
            seq = item.encode() if isinstance(item, str) else item
            if not 0 <= k < len(seq):
                raise _ExecError(f"index out of range: {k}")
            item = seq[k]
        else:
            raise _ExecError(f"can't index item of type {gv.type_name(item)}")
    return item


def _f_slice(item: Any, *idx: Any) -> Any:
    if not isinstance(item, list | tuple | str):
        raise _ExecError(f"can't slice item of type {gv.type_name(item)}")
    if len(idx) > 3 or (isinstance(item, str) and len(idx) > 2):
        raise _ExecError("too many slice indexes")
    seq = item.encode() if isinstance(item, str) else list(item)
    bounds = [int(i) for i in idx]
    lo = bounds[0] if bounds else 0
    hi = bounds[1] if len(bounds) > 1 else len(seq)
    if not 0 <= lo <= hi <= len(seq):
        raise _ExecError(f"index out of range: {hi if hi > len(seq) else lo}")
    out = seq[lo:hi]
    return out.decode("utf-8", errors="replace") if isinstance(out, bytes) else out


def _f_len(item: Any) -> int:
    if isinstance(item, str):
        return len(item.encode())
    if isinstance(item, list | tuple | dict):
        return len(item)
    raise _ExecError(f"len of type {gv.type_name(item)}")


def _f_eq(a: Any, *bs: Any) -> bool:
    if not bs:
        raise _ExecError("missing argument for comparison")
    return any(gv.go_eq(a, b) for b in bs)


def _f_html(*args: Any) -> str:
    s = gv.sprint(list(args))
    return (s.replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&#34;").replace("\0", "\ufffd"))


def _f_json(v: Any) -> str:
    return gv.go_json(v)


def _today(days: int = 0) -> str:
    return (_dt.date.today() + _dt.timedelta(days=days)).isoformat()


FUNCS: dict[str, Callable[..., Any]] = {
    "eq": _f_eq,
    "ne": lambda a, b: not gv.go_eq(a, b),
    "lt": gv.go_lt,
    "le": lambda a, b: gv.go_lt(a, b) or gv.go_eq(a, b),
    "gt": lambda a, b: gv.go_lt(b, a),
    "ge": lambda a, b: gv.go_lt(b, a) or gv.go_eq(a, b),
    "not": lambda a: not gv.truth(a),
    "len": _f_len,
    "index": _f_index,
    "slice": _f_slice,
    "print": lambda *a: gv.sprint(list(a)),
    "printf": lambda f, *a: gv.sprintf(f, list(a)),
    "println": lambda *a: " ".join(gv.fmt_value(x, False) for x in a) + "\n",
    "html": _f_html,
    "json": _f_json,
    "currentDate": lambda: _today(),
    "yesterdayDate": lambda: _today(-1),
}
_LAZY = {"and", "or"}  # evaluated argument by argument (Go 1.18+ short-circuits)
FUNC_NAMES = set(FUNCS) | _LAZY


class GoTemplate:
    """A parsed Go template. Immutable after construction; `execute` may run concurrently."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.parsed: Parsed = parse(text, FUNC_NAMES)

    def identifiers(self) -> list[str]:
        """Lower-cased field and variable names used anywhere (Ollama's `Template.Vars`)."""
        names: set[str] = set()
        for body in [self.parsed.root, *self.parsed.defines.values()]:
            _identifiers(body, names)
        return sorted(names)

    def execute(self, data: Any, root: list[Any] | None = None) -> str:
        run = _Run(self.parsed, data)
        try:
            run.walk(data, self.parsed.root if root is None else root)
        except _ExecError as e:  # already formatted with position
            raise GoTemplateError(e.message) from None
        return "".join(run.out)


def _identifiers(nodes: list[Any], names: set[str]) -> None:
    for node in nodes:
        if isinstance(node, Action):
            _pipe_identifiers(node.pipe, names)
        elif isinstance(node, Branch):
            _pipe_identifiers(node.pipe, names)
            _identifiers(node.body, names)
            if node.else_body:
                _identifiers(node.else_body, names)
        elif isinstance(node, TemplateCall) and node.pipe is not None:
            _pipe_identifiers(node.pipe, names)


def _pipe_identifiers(pipe: Pipeline, names: set[str]) -> None:
    for cmd in pipe.cmds:
        for arg in cmd.args:
            if isinstance(arg, Field):
                names.update(n.lower() for n in arg.names)
            elif isinstance(arg, Variable):
                names.update(n.lower() for n in [arg.name, *arg.fields])
            elif isinstance(arg, Chain) and not arg.fields:  # Go's parser keeps a bare (pipe) as a PipeNode
                _pipe_identifiers(arg.node, names)


class _Run:
    def __init__(self, parsed: Parsed, data: Any) -> None:
        self.parsed = parsed
        self.out: list[str] = []
        self.size = 0
        self.steps = 0
        self.depth = 0
        self.vars: list[tuple[str, Any]] = [("$", data)]

    def tick(self, pipe: Pipeline | None = None) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            self.fail(pipe, f"template too expensive: more than {MAX_STEPS} steps")

    def write(self, s: str, pipe: Pipeline | None = None) -> None:
        self.size += len(s)
        if self.size > MAX_OUTPUT:
            self.fail(pipe, f"template output larger than {MAX_OUTPUT} characters")
        self.out.append(s)

    def fail(self, pipe: Pipeline | None, message: str) -> None:
        if pipe is None:
            raise _ExecError(f"template: : {message}")
        raise _ExecError(f'template: :{pipe.pos.line}:{pipe.pos.col}: executing "" at <{pipe.source}>: {message}')

    # --- statements ---------------------------------------------------------------------------------------------
    def walk(self, dot: Any, nodes: list[Any]) -> None:
        for node in nodes:
            self.tick()
            if isinstance(node, Text):
                self.write(node.text)
            elif isinstance(node, Action):
                value = self.pipeline(dot, node.pipe)
                if not node.pipe.decl:
                    self.write(gv.fmt_value(value), node.pipe)
            elif isinstance(node, Branch):
                self.branch(dot, node)
            elif isinstance(node, Loop):
                raise _Break() if node.kind == "break" else _Continue()
            elif isinstance(node, TemplateCall):
                self.call(dot, node)

    def branch(self, dot: Any, node: Branch) -> None:
        mark = len(self.vars)
        try:
            if node.kind == "range":
                self.range(dot, node)
                return
            value = self.pipeline(dot, node.pipe)
            if gv.truth(value):
                self.walk(value if node.kind == "with" else dot, node.body)
            elif node.else_body is not None:
                self.walk(dot, node.else_body)
        finally:
            del self.vars[mark:]

    def range(self, dot: Any, node: Branch) -> None:
        value = self.pipeline(dot, node.pipe)
        if isinstance(value, dict):
            items: Sequence[tuple[Any, Any]] = [(k, value[k]) for k in sorted(value, key=str)]
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if value > MAX_STEPS:
                self.fail(node.pipe, f"range over {value} exceeds the step budget")
            items = [(i, i) for i in range(max(0, value))]
        elif value is None:
            items = []
        else:
            self.fail(node.pipe, f"range can't iterate over {gv.fmt_value(value, False)}")
            return
        if not items:
            if node.else_body is not None:
                self.walk(dot, node.else_body)
            return
        mark = len(self.vars)
        decl = node.pipe.decl
        for key, elem in items:
            self.tick(node.pipe)
            if len(decl) == 1:
                self.vars.append((decl[0], elem))
            elif len(decl) == 2:
                self.vars.append((decl[0], key))
                self.vars.append((decl[1], elem))
            try:
                self.walk(elem, node.body)
            except _Break:
                break
            except _Continue:
                pass
            finally:
                del self.vars[mark:]

    def call(self, dot: Any, node: TemplateCall) -> None:
        body = self.parsed.defines.get(node.name)
        if body is None:
            raise _ExecError(f'template: :{node.pos.line}:{node.pos.col}: executing "" at <{{{{template '
                             f'"{node.name}"}}}}>: template "{node.name}" not defined')
        if self.depth >= MAX_DEPTH:
            raise _ExecError(f"template: :{node.pos.line}: exceeded maximum template depth ({MAX_DEPTH})")
        new_dot = self.pipeline(dot, node.pipe) if node.pipe is not None else None
        saved, self.vars = self.vars, [("$", new_dot)]
        self.depth += 1
        try:
            self.walk(new_dot, body)
        finally:
            self.depth -= 1
            self.vars = saved

    # --- expressions --------------------------------------------------------------------------------------------
    def pipeline(self, dot: Any, pipe: Pipeline) -> Any:
        value: Any = None
        first = True
        for cmd in pipe.cmds:
            value = self.command(dot, cmd, pipe, None if first else value, piped=not first)
            first = False
        if pipe.decl:
            if pipe.is_assign:
                self.set_var(pipe.decl[0], value, pipe)
            else:
                self.vars.append((pipe.decl[0], value))
        return value

    def command(self, dot: Any, cmd: Command, pipe: Pipeline, final: Any, piped: bool) -> Any:
        head = cmd.args[0]
        if isinstance(head, Identifier):
            return self.function(dot, head.name, cmd.args[1:], pipe, final, piped)
        if len(cmd.args) > 1 or piped:
            self.fail(pipe, f"can't give argument to non-function {_arg_text(head)}")
        return self.arg(dot, head, pipe)

    def function(self, dot: Any, name: str, args: list[Any], pipe: Pipeline, final: Any, piped: bool) -> Any:
        if name in _LAZY:
            operands = [lambda a=a: self.arg(dot, a, pipe) for a in args]
            if piped:
                operands.append(lambda: final)
            if not operands:
                self.fail(pipe, f"wrong number of args for {name}: want at least 1 got 0")
            value: Any = None
            for get in operands:
                value = get()
                if gv.truth(value) != (name == "and"):
                    return value
            return value
        values = [self.arg(dot, a, pipe) for a in args]
        if piped:
            values.append(final)
        try:
            return FUNCS[name](*values)
        except gv.CompareError as e:
            self.fail(pipe, f"error calling {name}: {e}")
        except _ExecError as e:
            self.fail(pipe, f"error calling {name}: {e.message}")
        except TypeError:
            self.fail(pipe, f"wrong number of args for {name}: got {len(values)}")
        return None

    def arg(self, dot: Any, node: Any, pipe: Pipeline) -> Any:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, Field):
            return self.fields(dot, node.names, pipe)
        if isinstance(node, Variable):
            return self.fields(self.get_var(node.name, pipe), node.fields, pipe)
        if isinstance(node, Chain):
            return self.fields(self.pipeline(dot, node.node), node.fields, pipe)
        if isinstance(node, Identifier):
            return self.function(dot, node.name, [], pipe, None, False)
        self.fail(pipe, f"can't evaluate {node!r}")
        return None

    def fields(self, value: Any, names: list[str], pipe: Pipeline) -> Any:
        for name in names:
            if isinstance(value, dict):
                value = value.get(name)
            elif isinstance(value, GoStruct):
                if name not in value.fields:
                    self.fail(pipe, f"can't evaluate field {name} in type {value.type_name}")
                value = value.fields[name]
            elif value is None:
                self.fail(pipe, f"nil pointer evaluating interface {{}}.{name}")
            else:
                self.fail(pipe, f"can't evaluate field {name} in type {gv.type_name(value)}")
        return value

    def get_var(self, name: str, pipe: Pipeline) -> Any:
        for k in range(len(self.vars) - 1, -1, -1):
            if self.vars[k][0] == name:
                return self.vars[k][1]
        self.fail(pipe, f"undefined variable: {name}")
        return None

    def set_var(self, name: str, value: Any, pipe: Pipeline) -> None:
        for k in range(len(self.vars) - 1, -1, -1):
            if self.vars[k][0] == name:
                self.vars[k] = (name, value)
                return
        self.fail(pipe, f"undefined variable: {name}")


def _arg_text(node: Any) -> str:
    if isinstance(node, Field):
        return "." + ".".join(node.names)
    if isinstance(node, Variable):
        return node.name + "".join("." + f for f in node.fields)
    if isinstance(node, Literal):
        return _json.dumps(node.value) if isinstance(node.value, str) else str(node.value)
    return "(...)"
