"""The Go template AST: plain dataclasses a parsed template is made of (data only; `go_template` executes them),
and the error every parse or execution failure raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autoglm.errors import InvalidRequest


class GoTemplateError(InvalidRequest):
    """A template that does not parse or cannot be executed; the message is Go's (`template: :3: unexpected EOF`)."""

    def __init__(self, message: str, *, line: int = 0, column: int = 0) -> None:
        super().__init__(message, param="template")
        self.line = line
        self.column = column


@dataclass
class Pos:
    line: int
    col: int


@dataclass
class Text:
    text: str


@dataclass
class Field:
    names: list[str]  # .A.B -> ["A", "B"]; `.` alone -> []


@dataclass
class Variable:
    name: str  # "$" or "$x"
    fields: list[str] = field(default_factory=list)


@dataclass
class Literal:
    value: Any  # str, int, float, bool, None


@dataclass
class Identifier:
    name: str  # a function name


@dataclass
class Chain:
    node: Any  # a parenthesized Pipeline
    fields: list[str]


@dataclass
class Command:
    args: list[Any]


@dataclass
class Pipeline:
    pos: Pos
    decl: list[str]  # variables declared (`:=`) or assigned (`=`)
    is_assign: bool
    cmds: list[Command]
    source: str = ""  # the action's text, for error messages


@dataclass
class Action:
    pipe: Pipeline


@dataclass
class Branch:
    kind: str  # "if" | "with" | "range"
    pipe: Pipeline
    body: list[Any]
    else_body: list[Any] | None


@dataclass
class Loop:
    kind: str  # "break" | "continue"
    pos: Pos


@dataclass
class TemplateCall:
    name: str
    pipe: Pipeline | None
    pos: Pos


@dataclass
class Parsed:
    root: list[Any]
    defines: dict[str, list[Any]]
