"""Ollama Modelfile parser: `FROM`, `PARAMETER`, `TEMPLATE`, `SYSTEM`, `ADAPTER`, `LICENSE`, `MESSAGE`, `REQUIRES`.

Instructions are case-insensitive, one per line; `#` starts a comment line; a value runs to the end of its line,
or is quoted: `"..."` on one line, `\"\"\"...\"\"\"` across lines. Parameter values are typed as Ollama types them
(`num_ctx 2048` is an int, `temperature 0.5` a float, `stop` repeats). Every error names the Modelfile line.
The template is only parsed here (its errors carry the TEMPLATE's line); `create` is what rejects it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from autoglm.errors import InvalidRequest


class ModelfileError(InvalidRequest):
    """A Modelfile that does not parse; the message starts with `Modelfile line N:` where a line is known."""

    def __init__(self, message: str, *, line: int = 0) -> None:
        super().__init__(f"Modelfile line {line}: {message}" if line else message, param="modelfile")
        self.line = line


# Ollama's api.Options / api.Runner fields and their types (stop is the one list).
INT_PARAMS = ("num_ctx", "num_predict", "num_keep", "top_k", "seed", "repeat_last_n", "num_batch", "num_gpu",
              "main_gpu", "num_thread")
FLOAT_PARAMS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty")
BOOL_PARAMS = ("use_mmap", "numa")
LIST_PARAMS = ("stop",)
# Ollama still accepts these and ignores them
DEPRECATED_PARAMS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "mirostat",
                     "mirostat_tau", "mirostat_eta")
KNOWN_PARAMS = INT_PARAMS + FLOAT_PARAMS + BOOL_PARAMS + LIST_PARAMS

COMMANDS = ("from", "parameter", "template", "system", "adapter", "license", "message", "requires", "draft",
            "renderer", "parser")
_UNSUPPORTED = {
    "adapter": "ADAPTER is not supported: autoglm has no LoRA adapters yet; merge the adapter into the weights "
               "(e.g. with peft's merge_and_unload) and point FROM at the result",
    "draft": "DRAFT is not supported: autoglm has no speculative decoding with a draft model",
    "renderer": "RENDERER is not supported: use TEMPLATE (a Go template) for the prompt format",
    "parser": "PARSER is not supported: autoglm splits reasoning on the model's own think tokens",
}
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class Instruction:
    name: str  # lower-case command ("from", "parameter", ...)
    args: str
    line: int
    key: str = ""  # the parameter's name / the message's role


@dataclass
class Modelfile:
    """A parsed Modelfile. `parameters` holds typed values (`stop` a list)."""

    from_: str
    from_line: int = 1
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    template_line: int = 0
    system: str | None = None
    license: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    instructions: list[Instruction] = field(default_factory=list)

    def to_text(self) -> str:
        """The Modelfile written back the way Ollama's `/api/show` writes it."""
        return render_modelfile(self.from_, self.parameters, self.template, self.system, self.license,
                                self.messages)


def render_modelfile(from_: str, parameters: dict[str, Any], template: str | None, system: str | None,
                     license: list[str], messages: list[dict[str, str]]) -> str:
    lines = [f"FROM {from_}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    if system is not None:
        lines.append(f"SYSTEM {_quote(system)}")
    for text in license:
        lines.append(f"LICENSE {_quote(text)}")
    for key, value in parameters.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_quote(format_parameter(v))}")
    for m in messages:
        lines.append(f"MESSAGE {m['role']} {_quote(m['content'])}")
    return "\n".join(lines) + "\n"


def format_parameter(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _quote(s: str) -> str:
    if "\n" in s or s.startswith(" ") or s.endswith(" ") or not s:
        return f'"""{s}"""' if '"' in s or "\n" in s or not s else f'"{s}"'
    return s


_NAME = re.compile(r"[A-Za-z]+")


def parse_modelfile(text: str) -> Modelfile:
    """Modelfile text -> Modelfile; raises ModelfileError naming the line."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    instructions: list[Instruction] = []
    i = 0
    while i < len(lines):
        line_no = i + 1
        stripped = lines[i].strip(" \t")
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        m = _NAME.match(stripped)
        name = m.group(0).lower() if m else ""
        rest = stripped[m.end():] if m else stripped
        if name not in COMMANDS or (rest and rest[0] not in " \t"):
            word = stripped.split()[0]
            raise ModelfileError(f"unknown instruction {word!r}: expected one of "
                                 + ", ".join(c.upper() for c in COMMANDS), line=line_no)
        rest = rest.lstrip(" \t")
        key = ""
        if name in ("parameter", "message"):
            parts = rest.split(None, 1)
            if len(parts) < 2:
                what = "a parameter name and a value" if name == "parameter" else "a role and a message"
                raise ModelfileError(f"{name.upper()} needs {what}", line=line_no)
            key, rest = parts[0], parts[1]
            if name == "parameter" and not re.fullmatch(r"[A-Za-z0-9_]+", key):
                raise ModelfileError(f"invalid parameter name {key!r}", line=line_no)
            if name == "message" and key not in MESSAGE_ROLES:
                raise ModelfileError(f'MESSAGE role must be one of "system", "user", or "assistant", got {key!r}',
                                     line=line_no)
        value, i = _value(lines, i, rest, line_no)
        if not value and name in ("from", "parameter"):
            raise ModelfileError(f"{name.upper()} needs a value", line=line_no)
        instructions.append(Instruction(name, value, line_no, key))
    return _build(instructions)


def _value(lines: list[str], i: int, rest: str, line_no: int) -> tuple[str, int]:
    """The instruction's value starting at `rest` on line i -> (value, index of the next line)."""
    body = rest.rstrip(" \t")
    if body.startswith('"""'):
        inner = body[3:]
        if inner.endswith('"""') and len(inner) >= 3:
            return inner[:-3], i + 1
        if '"""' in inner:
            raise ModelfileError('text after the closing """', line=line_no)
        parts = [rest.lstrip(" \t")[3:]]
        for j in range(i + 1, len(lines)):
            end = lines[j].find('"""')
            if end >= 0:
                if lines[j][end + 3:].strip():
                    raise ModelfileError('text after the closing """', line=j + 1)
                parts.append(lines[j][:end])
                return "\n".join(parts), j + 1
            parts.append(lines[j])
        raise ModelfileError('unterminated """ (opened here; no closing """ before the end of the file)',
                             line=line_no)
    if body.startswith('"'):
        if len(body) < 2 or not body.endswith('"'):
            raise ModelfileError('unterminated quote: a "..." value must end on the same line (use """ for '
                                 "several lines)", line=line_no)
        return body[1:-1], i + 1
    return body, i + 1


def _build(instructions: list[Instruction]) -> Modelfile:
    froms = [ins for ins in instructions if ins.name == "from"]
    if not froms:
        raise ModelfileError("no FROM line: a Modelfile starts from a GGUF file, an HF directory or a model name")
    if len(froms) > 1:
        raise ModelfileError(f"more than one FROM (first on line {froms[0].line})", line=froms[1].line)
    first = froms[0]
    glued = re.search(r"\s(TEMPLATE|PARAMETER|SYSTEM|MESSAGE|LICENSE|ADAPTER)\s", first.args)
    if glued:
        raise ModelfileError(f"the FROM value {first.args[:60]!r}... contains a {glued.group(1)} instruction: "
                             "put each instruction on its own line", line=first.line)
    mf = Modelfile(from_=first.args, from_line=first.line, instructions=instructions)
    for ins in instructions:
        if ins.name in _UNSUPPORTED:
            raise ModelfileError(_UNSUPPORTED[ins.name], line=ins.line)
        if ins.name == "parameter":
            value = parse_parameter(ins.key, ins.args, line=ins.line)
            if value is None:
                continue
            name = ins.key.lower()
            if name in LIST_PARAMS:
                mf.parameters.setdefault(name, []).append(value)
            else:
                mf.parameters[name] = value
        elif ins.name == "template":
            mf.template, mf.template_line = ins.args, ins.line
        elif ins.name == "system":
            mf.system = ins.args
        elif ins.name == "license":
            mf.license.append(ins.args)
        elif ins.name == "message":
            mf.messages.append({"role": ins.key, "content": ins.args})
    return mf


def parse_parameter(name: str, value: Any, *, line: int = 0) -> Any:
    """One PARAMETER (or /api options entry) -> its typed value; None for deprecated, ignored ones.

    Raises ModelfileError naming the parameter for an unknown name or a value of the wrong type."""
    key = name.lower()
    if key in DEPRECATED_PARAMS:
        return None
    if key not in KNOWN_PARAMS:
        raise ModelfileError(f"unknown parameter {name!r}; known: {', '.join(sorted(KNOWN_PARAMS))}", line=line)
    text = value if isinstance(value, str) else None
    try:
        if key in INT_PARAMS:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value == int(value):
                return int(value)
            return int(text.strip()) if text is not None else int(value)
        if key in FLOAT_PARAMS:
            if isinstance(value, bool):
                raise ValueError
            return float(text.strip()) if text is not None else float(value)
        if key in BOOL_PARAMS:
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("true", "1"):
                return True
            if low in ("false", "0"):
                return False
            raise ValueError
    except (TypeError, ValueError):
        kind = "an integer" if key in INT_PARAMS else "a number" if key in FLOAT_PARAMS else "true or false"
        raise ModelfileError(f"invalid value for parameter {name!r}: {value!r} is not {kind}", line=line) from None
    return str(value)  # stop
