"""Go `text/template` lexer and parser: template text -> an AST of plain dataclasses (templates are data, never code).

Follows Go's `text/template/parse`: `{{`/`}}` delimiters, `{{- ` / ` -}}` trimming of the adjacent text's white
space, `{{/* comments */}}`, pipelines with `|`, variable declaration (`$x :=`) and assignment (`$x =`), `if` /
`else if` / `else`, `range` (with `$i, $m :=`, `break`, `continue`), `with` / `else with`, `define` / `template` /
`block`. Errors read like Go's: `template: :LINE: message`, with the column kept on the exception.
"""

from __future__ import annotations

from typing import Any

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
    Pos,
    TemplateCall,
    Text,
    Variable,
)
from autoglm.tokenizer.go_template_lex import Lexer, Tok

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
    toks = Lexer(src).run()
    return _Parser(src, toks, funcs).parse()
