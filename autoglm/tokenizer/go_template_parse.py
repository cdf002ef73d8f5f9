"""Go `text/template` lexer and parser: template text -> an AST of plain dataclasses (templates are data, never code).

Follows Go's `text/template/parse`: `{{`/`}}` delimiters, `{{- ` / ` -}}` trimming of the adjacent text's white
space, `{{/* comments */}}`, pipelines with `|`, variable declaration (`$x :=`) and assignment (`$x =`), `if` /
`else if` / `else`, `range` (with `$i, $m :=`, `break`, `continue`), `with` / `else with`, `define` / `template` /
`block`. Errors read like Go's: `template: :LINE: message`, with the column kept on the exception.
"""

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


# --- AST ---------------------------------------------------------------------------------------------------------
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


# --- lexer -------------------------------------------------------------------------------------------------------
_SPACE = " \t\r\n"
_KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue", "nil"}


@dataclass
class Tok:
    kind: str  # text, left, right, field, var, ident, string, number, bool, nil, char, pipe, lparen, rparen,
    #            declare, assign, comma, dot, keyword, eof, space
    value: Any
    line: int
    col: int
    offset: int = 0


class _Lexer:
    def __init__(self, src: str) -> None:
        self.src = src
        self.pos = 0
        self.toks: list[Tok] = []

    def where(self, pos: int) -> tuple[int, int]:
        line = self.src.count("\n", 0, pos) + 1
        return line, pos - (self.src.rfind("\n", 0, pos) + 1) + 1

    def error(self, message: str, pos: int) -> GoTemplateError:
        line, col = self.where(pos)
        return GoTemplateError(f"template: :{line}: {message}", line=line, column=col)

    def emit(self, kind: str, value: Any, pos: int) -> None:
        line, col = self.where(pos)
        self.toks.append(Tok(kind, value, line, col, pos))

    def run(self) -> list[Tok]:
        src, n = self.src, len(self.src)
        while self.pos < n:
            start = src.find("{{", self.pos)
            if start < 0:
                self.emit("text", src[self.pos:], self.pos)
                break
            trim_left = src.startswith("{{- ", start) or (src.startswith("{{-", start) and start + 3 < n
                                                         and src[start + 3] in _SPACE)
            text = src[self.pos:start]
            if trim_left:
                text = text.rstrip(_SPACE)
            if text:
                self.emit("text", text, self.pos)
            inner = start + (4 if trim_left else 2)
            self.pos = self.lex_action(start, inner)
        self.emit("eof", None, n)
        return self.toks

    def lex_action(self, start: int, pos: int) -> int:
        """Lex one `{{ ... }}` from `pos` (just inside the delimiter); -> the position after it (trim applied)."""
        src, n = self.src, len(self.src)
        # a comment must start right after the delimiter (and its trim marker)
        if src.startswith("/*", pos):
            end = src.find("*/", pos + 2)
            if end < 0:
                raise self.error("unclosed comment", start)
            after = end + 2
            if src.startswith("}}", after):
                return after + 2
            if src.startswith(" -}}", after):
                return self.skip_space(after + 4)
            raise self.error("comment ends before closing delimiter", start)
        self.emit("left", None, start)
        depth = 0
        while True:
            if pos >= n:
                raise self.error("unclosed action", start)
            c = src[pos]
            if src.startswith(" -}}", pos) or (c in _SPACE and src.startswith("-}}", pos + 1)):
                if depth:
                    raise self.error("unclosed left paren", pos)
                self.emit("right", None, pos)
                return self.skip_space(pos + 4)
            if src.startswith("}}", pos):
                if depth:
                    raise self.error("unclosed left paren", pos)
                self.emit("right", None, pos)
                return pos + 2
            if c in _SPACE:
                while pos < n and src[pos] in _SPACE and not src.startswith(" -}}", pos) \
                        and not (src[pos] in _SPACE and src.startswith("-}}", pos + 1)):
                    pos += 1
                self.emit("space", None, pos)
                continue
            if c == "(":
                depth += 1
                self.emit("lparen", None, pos)
                pos += 1
            elif c == ")":
                depth -= 1
                if depth < 0:
                    raise self.error(f"unexpected right paren {c!r}", pos)
                self.emit("rparen", None, pos)
                pos += 1
            elif c == "|":
                self.emit("pipe", None, pos)
                pos += 1
            elif c == ",":
                self.emit("comma", None, pos)
                pos += 1
            elif src.startswith(":=", pos):
                self.emit("declare", None, pos)
                pos += 2
            elif c == "=":
                self.emit("assign", None, pos)
                pos += 1
            elif c == '"':
                pos = self.lex_quote(pos)
            elif c == "`":
                end = src.find("`", pos + 1)
                if end < 0:
                    raise self.error("unterminated raw quoted string", pos)
                self.emit("string", src[pos + 1:end], pos)
                pos = end + 1
            elif c == "'":
                pos = self.lex_char(pos)
            elif c == "$":
                end = self.scan_word(pos + 1)
                self.emit("var", src[pos:end], pos)
                pos = self.lex_fields(end)
            elif c == ".":
                if pos + 1 < n and src[pos + 1].isdigit():
                    pos = self.lex_number(pos)
                else:
                    pos = self.lex_fields(pos, standalone=True)
            elif c.isdigit() or (c in "+-" and pos + 1 < n and src[pos + 1].isdigit()):
                pos = self.lex_number(pos)
            elif c.isalpha() or c == "_":
                end = self.scan_word(pos)
                word = src[pos:end]
                if word in ("true", "false"):
                    self.emit("bool", word == "true", pos)
                elif word == "nil":
                    self.emit("nil", None, pos)
                elif word in _KEYWORDS:
                    self.emit("keyword", word, pos)
                else:
                    self.emit("ident", word, pos)
                pos = end
            else:
                raise self.error(f"unexpected bad character U+{ord(c):04X} {c!r} in command", pos)

    def skip_space(self, pos: int) -> int:
        while pos < len(self.src) and self.src[pos] in _SPACE:
            pos += 1
        return pos

    def scan_word(self, pos: int) -> int:
        while pos < len(self.src) and (self.src[pos].isalnum() or self.src[pos] == "_"):
            pos += 1
        return pos

    def lex_fields(self, pos: int, standalone: bool = False) -> int:
        """`.A.B` after a variable or `)` (or alone): one `field` token per name; a lone `.` is `dot`."""
        src = self.src
        if standalone and (pos + 1 >= len(src) or not (src[pos + 1].isalpha() or src[pos + 1] == "_")):
            self.emit("dot", None, pos)
            return pos + 1
        while pos < len(src) and src[pos] == "." and pos + 1 < len(src) and (src[pos + 1].isalpha()
                                                                          or src[pos + 1] == "_"):
            end = self.scan_word(pos + 1)
            self.emit("field", src[pos + 1:end], pos)
            pos = end
        return pos

    def lex_quote(self, pos: int) -> int:
        src, i = self.src, pos + 1
        out: list[str] = []
        escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b",
                   "f": "\f", "v": "\v", "0": "\0"}
        while True:
            if i >= len(src) or src[i] == "\n":
                raise self.error("unterminated quoted string", pos)
            c = src[i]
            if c == '"':
                break
            if c == "\\" and i + 1 < len(src):
                e = src[i + 1]
                if e in "xuU":
                    width = {"x": 2, "u": 4, "U": 8}[e]
                    try:
                        out.append(chr(int(src[i + 2:i + 2 + width], 16)))
                    except ValueError:
                        raise self.error(f"invalid syntax in quoted string {src[pos:i + 2 + width]}", pos) from None
                    i += 2 + width
                    continue
                if e not in escapes:
                    raise self.error(f"invalid syntax: unknown escape \\{e}", pos)
                out.append(escapes[e])
                i += 2
                continue
            out.append(c)
            i += 1
        self.emit("string", "".join(out), pos)
        return i + 1

    def lex_char(self, pos: int) -> int:
        end = self.src.find("'", pos + 1)
        body = self.src[pos + 1:end] if end > 0 else ""
        if end < 0 or not body:
            raise self.error("unterminated character constant", pos)
        value = {"\\n": "\n", "\\t": "\t", "\\'": "'", "\\\\": "\\"}.get(body, body)
        if len(value) != 1:
            raise self.error(f"malformed character constant: '{body}'", pos)
        self.emit("number", ord(value), pos)
        return end + 1

    def lex_number(self, pos: int) -> int:
        src, end = self.src, pos
        if src[end] in "+-":
            end += 1
        while end < len(src) and (src[end].isalnum() or src[end] in "._" or (src[end] in "+-" and src[end - 1]
                                                                             in "eEpP")):
            end += 1
        text = src[pos:end].replace("_", "")
        try:
            value: Any = int(text, 0)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise self.error(f"bad number syntax: {src[pos:end]!r}", pos) from None
        self.emit("number", value, pos)
        return end


# --- parser ------------------------------------------------------------------------------------------------------

class _Parser:
    def __init__(self, src: str, toks: list[Tok], funcs: set[str]) -> None:
        self.src = src
        self.toks = toks
        self.i = 0
        self.funcs = funcs
        self.defines: dict[str, list[Any]] = {}
        self.vars: list[str] = ["$"]
        self.range_depth = 0

    # token helpers
    def peek(self, skip_space: bool = True) -> Tok:
        j = self.i
        while skip_space and self.toks[j].kind == "space":
            j += 1
        return self.toks[j]

    def next(self, skip_space: bool = True) -> Tok:
        while skip_space and self.toks[self.i].kind == "space":
            self.i += 1
        tok = self.toks[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def error(self, message: str, tok: Tok) -> GoTemplateError:
        return GoTemplateError(f"template: :{tok.line}: {message}", line=tok.line, column=tok.col)

    def expect_right(self, context: str) -> None:
        tok = self.next()
        if tok.kind != "right":
            raise self.error(f"unexpected {_describe(tok)} in {context}", tok)

    # structure
    def parse(self) -> Parsed:
        body, end = self.item_list(top=True)
        assert end is None
        return Parsed(body, self.defines)

    def item_list(self, top: bool = False) -> tuple[list[Any], str | None]:
        """Items up to `{{end}}` / `{{else}}` (consumed; -> which one) or EOF at the top level."""
        items: list[Any] = []
        while True:
            tok = self.next(skip_space=False)
            if tok.kind == "eof":
                if top:
                    return items, None
                raise self.error("unexpected EOF", tok)
            if tok.kind == "text":
                items.append(Text(tok.value))
                continue
            # tok is `left`
            head = self.peek()
            if head.kind == "keyword":
                word = head.value
                if word in ("end", "else"):
                    if top:
                        raise self.error(f"unexpected {{{{{word}}}}}", head)
                    self.next()
                    if word == "end":
                        self.expect_right("end")
                    return items, word
                self.next()
                items.append(self.control(word, head))
                continue
            items.append(Action(self.pipeline("command", tok)))

    def control(self, word: str, tok: Tok) -> Any:
        if word in ("if", "with", "range"):
            return self.branch(word, tok)
        if word in ("break", "continue"):
            if not self.range_depth:
                raise self.error(f"{{{{{word}}}}} outside {{{{range}}}}", tok)
            self.expect_right(word)
            return Loop(word, Pos(tok.line, tok.col))
        if word == "define":
            name = self.next()
            if name.kind != "string":
                raise self.error(f"unexpected {_describe(name)} in define clause", name)
            self.expect_right("define clause")
            saved, self.vars = self.vars, ["$"]
            body, end = self.item_list()
            self.vars = saved
            if end != "end":
                raise self.error("unexpected {{else}} in define clause", tok)
            self.defines[name.value] = body
            return Text("")
        if word in ("template", "block"):
            name = self.next()
            if name.kind != "string":
                raise self.error(f"unexpected {_describe(name)} in {word} clause", name)
            pipe = None
            if self.peek().kind != "right":
                pipe = self.pipeline(f"{word} clause", tok)
            else:
                self.next()
            if word == "block":
                saved, self.vars = self.vars, ["$"]
                body, end = self.item_list()
                self.vars = saved
                if end != "end":
                    raise self.error("unexpected {{else}} in block clause", tok)
                self.defines[name.value] = body
            return TemplateCall(name.value, pipe, Pos(tok.line, tok.col))
        raise self.error(f"unexpected {{{{{word}}}}}", tok)

    def branch(self, kind: str, tok: Tok) -> Branch:
        mark = len(self.vars)
        pipe = self.pipeline(kind, tok, allow_decl=True)
        if not pipe.cmds:
            raise self.error(f"missing value for {kind}", tok)
        if kind == "range":
            self.range_depth += 1
        body, end = self.item_list()
        if kind == "range":
            self.range_depth -= 1
        else_body: list[Any] | None = None
        if end == "else":
            nxt = self.peek()
            if nxt.kind == "keyword" and nxt.value in ("if", "with") and kind != "range":
                # `{{else if x}}` is `{{else}}{{if x}}...{{end}}{{end}}` sharing the one `{{end}}`
                self.next()
                else_body = [self.branch(nxt.value, nxt)]
            else:
                self.expect_right("else")
                else_body, end2 = self.item_list()
                if end2 != "end":
                    raise self.error("expected end; found {{else}}", tok)
        del self.vars[mark:]
        return Branch(kind, pipe, body, else_body)

    def pipeline(self, context: str, start: Tok, allow_decl: bool = True) -> Pipeline:
        """Parse `[$x[, $y] :=] cmd | cmd ...` up to and including `}}` (or `)` for a nested pipeline)."""
        pos = Pos(start.line, start.col)
        decl: list[str] = []
        is_assign = False
        first = self.peek()
        if first.kind == "var" and allow_decl:
            save = self.i
            names: list[str] = []
            op = None
            while (v := self.next()).kind == "var":
                names.append(v.value)
                op = self.next()
                if op.kind == "comma" and context == "range" and len(names) < 2:
                    continue
                break
            if op is not None and op.kind in ("declare", "assign"):
                decl, is_assign = names, op.kind == "assign"
                for name in names:
                    if is_assign and name not in self.vars:
                        raise self.error(f'undefined variable "{name}"', first)
                if not is_assign:
                    self.vars.extend(names)
            else:
                self.i = save
        cmds: list[Command] = []
        source_start = self.i
        while True:
            tok = self.peek()
            if tok.kind in ("right", "rparen"):
                self.next()
                if tok.kind == "rparen" and context != "parenthesized pipeline":
                    raise self.error("unexpected right paren", tok)
                if tok.kind == "right" and context == "parenthesized pipeline":
                    raise self.error("unclosed left paren", tok)
                break
            if tok.kind == "eof":
                raise self.error("unclosed action", tok)
            cmds.append(self.command(context))
            sep = self.peek()
            if sep.kind == "pipe":
                self.next()
                if self.peek().kind in ("right", "rparen"):
                    raise self.error("missing command", sep)
        if not cmds and context not in ("if", "with", "range"):
            raise self.error(f"missing value for {context}", start)
        if decl and not cmds:
            raise self.error(f"missing value for {context}", start)
        for k, cmd in enumerate(cmds[1:], 1):
            head = cmd.args[0]
            if isinstance(head, Literal) or (isinstance(head, Field) and not head.names):
                raise self.error(f"non executable command in pipeline stage {k + 1}", start)
        span = [t for t in self.toks[source_start:self.i - 1] if t.kind != "space"]
        source = self.src[span[0].offset:self.toks[self.i - 1].offset].strip() if span else ""
        return Pipeline(pos, decl, is_assign, cmds, source)

    def command(self, context: str) -> Command:
        args: list[Any] = []
        while True:
            tok = self.peek()
            if tok.kind in ("right", "rparen", "pipe", "eof"):
                break
            if args and self.toks[self.i].kind != "space":
                raise self.error(f"missing space? unexpected {_describe(tok)} in operand", tok)
            args.append(self.operand(context))
        if not args:
            raise self.error(f"missing value for {context}", self.peek())
        return Command(args)

    def operand(self, context: str) -> Any:
        tok = self.next()
        kind = tok.kind
        if kind == "field":
            names = [tok.value]
            while self.peek(skip_space=False).kind == "field":
                names.append(self.next(skip_space=False).value)
            return Field(names)
        if kind == "dot":
            return Field([])
        if kind == "var":
            if tok.value not in self.vars:
                raise self.error(f'undefined variable "{tok.value}"', tok)
            names = []
            while self.peek(skip_space=False).kind == "field":
                names.append(self.next(skip_space=False).value)
            return Variable(tok.value, names)
        if kind in ("string", "number", "bool", "nil"):
            return Literal(tok.value)
        if kind == "ident":
            if tok.value not in self.funcs:
                raise self.error(f'function "{tok.value}" not defined', tok)
            return Identifier(tok.value)
        if kind == "lparen":
            inner = self.pipeline("parenthesized pipeline", tok, allow_decl=False)
            names = []
            while self.peek(skip_space=False).kind == "field":
                names.append(self.next(skip_space=False).value)
            return Chain(inner, names)
        if kind == "eof":
            raise self.error("unclosed action", tok)
        raise self.error(f"unexpected {_describe(tok)} in {'operand' if context != 'command' else 'command'}", tok)


def _describe(tok: Tok) -> str:
    names = {"right": '"}}"', "rparen": '")"', "pipe": '"|"', "comma": '","', "declare": '":="', "assign": '"="',
             "eof": "EOF", "left": '"{{"'}
    if tok.kind in names:
        return names[tok.kind]
    if tok.kind == "keyword":
        return f"<{tok.value}>"
    return f"<{_token_text(tok)}>"


def _token_text(tok: Tok) -> str:
    if tok.kind == "field":
        return "." + tok.value
    if tok.kind == "dot":
        return "."
    if tok.kind == "string":
        return '"' + str(tok.value) + '"'
    if tok.kind in ("lparen", "rparen", "pipe", "comma", "declare", "assign"):
        return {"lparen": "(", "rparen": ")", "pipe": "|", "comma": ",", "declare": ":=", "assign": "="}[tok.kind]
    if tok.kind == "bool":
        return "true" if tok.value else "false"
    if tok.kind == "nil":
        return "nil"
    return str(tok.value)


def parse(src: str, funcs: set[str]) -> Parsed:
    """Template text -> Parsed; raises GoTemplateError with Go's message, line and column."""
    toks = _Lexer(src).run()
    return _Parser(src, toks, funcs).parse()
