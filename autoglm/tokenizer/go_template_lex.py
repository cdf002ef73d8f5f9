"""Go template lexer: template text -> tokens (text, delimiters, fields, variables, literals, keywords), with the
`{{- ` / ` -}}` trimming applied to the text tokens and comments dropped, as Go's `text/template/parse/lex.go`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoglm.tokenizer.go_template_ast import GoTemplateError

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


class Lexer:
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
