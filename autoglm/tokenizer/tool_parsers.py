"""Tool-call formats per model family: parse replies into OpenAI `tool_calls`, stream them, constrain them.

The format is chosen from the chat template's text (what the model was trained to write), never from a file name
(`detect_tool_format`):
- `hermes` (Qwen2.5 / Qwen3 / Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block
  per call (several = parallel calls).
- `glm45` (GLM-4.5 / 4.6 / 4.7): `<tool_call>NAME\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>...</tool_call>`;
  a value is raw text for string parameters, JSON otherwise (vLLM's glm4_moe parser does the same).
- `glm4` (GLM-4-0414 / GLM-Z1): the whole reply is `NAME\\n{json arguments}`; the template renders a call as an
  assistant turn with `metadata` = name and a result as an `observation` turn (see tool_history).

Streams (`ToolFormat.stream(tools)`) take text deltas of the content channel and return `StreamDelta`s: content
never contains a partial tag (a possible tag prefix is held back) and each call opens with its id and name, then its
arguments arrive in pieces. The whole-reply parse is the same stream fed at once, so both paths agree. A malformed
call is kept as content and logged; parsing never raises.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from autoglm.tokenizer.tool_calls import (
    ParsedReply,
    StreamDelta,
    ToolCallDelta,
    arguments_mapping,
    assemble,
    dumps_arguments,
    new_call_id,
    string_parameters,
    tool_functions,
)

log = logging.getLogger("autoglm.tools")


class ToolCallStream(Protocol):
    """Per-reply streaming parser: `feed(text_delta)` then `finish()` once at the end of the reply."""

    def feed(self, text: str) -> StreamDelta: ...

    def finish(self) -> StreamDelta: ...


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text to hold back)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _Content:
    """Content with trailing whitespace held back (whitespace before a tool call is not content) and leading
    whitespace dropped (GLM-4.5 starts its answer with a newline after `<think></think>`)."""

    def __init__(self) -> None:
        self.pending = ""
        self.started = False

    def add(self, out: StreamDelta, text: str) -> None:
        text = self.pending + text
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.pending = text[len(body):]
        out.content += body
        self.started = self.started or bool(body)

    def drop(self) -> str:
        pending, self.pending = self.pending, ""
        return pending


# --- tag formats: <tool_call> ... </tool_call> ---------------------------------------------------------------------
class _Body(Protocol):
    """Incremental parser of one call's body (the text between the tags)."""

    def update(self, body: str) -> list[ToolCallDelta]: ...

    def finish(self, body: str) -> list[ToolCallDelta] | None:
        """The rest of the call; None when the body is malformed and nothing of it was emitted yet."""
        ...


class _TaggedStream:
    def __init__(self, start: str, end: str, new_body: Any) -> None:
        self._start, self._end, self._new_body = start, end, new_body
        self._buf = ""
        self._body: str | None = None  # inside a call: its body so far
        self._call: _Body | None = None
        self._index = 0
        self._content = _Content()

    def feed(self, text: str) -> StreamDelta:
        out = StreamDelta()
        self._buf += text
        while True:
            if self._body is None:
                pos = self._buf.find(self._start)
                if pos < 0:
                    keep = _partial_suffix(self._buf, self._start)
                    self._content.add(out, self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._content.add(out, self._buf[:pos])
                self._buf = self._buf[pos + len(self._start):]
                self._body, self._call = "", self._new_body(self._index)
            else:
                assert self._call is not None
                pos = self._buf.find(self._end)
                if pos < 0:
                    keep = _partial_suffix(self._buf, self._end)
                    self._body += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    out.tool_calls += self._call.update(self._body)
                    return out
                self._body += self._buf[:pos]
                self._buf = self._buf[pos + len(self._end):]
                self._close(out, self._start + self._body + self._end)

    def _close(self, out: StreamDelta, raw: str) -> None:
        assert self._call is not None and self._body is not None
        pieces = self._call.finish(self._body)
        if pieces is None:
            log.warning("malformed tool call kept as content: %r", raw[:200])
            self._content.add(out, raw)
        else:
            self._content.drop()  # whitespace between content and a call is not content
            out.tool_calls += pieces
            self._index += 1
        self._body, self._call = None, None

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if self._body is not None:  # the reply ended inside a call (max_tokens or a stop string)
            self._body += self._buf
            self._buf = ""
            self._close(out, self._start + self._body)
        self._content.add(out, self._buf)
        self._buf = ""
        pending = self._content.drop()
        if self._index == 0:
            out.content += pending
        return out


_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_HERMES_TAIL = re.compile(r"\s*\}?\s*$")  # the outer object's closing brace (and spaces) is not argument text


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class _HermesBody:
    def __init__(self, index: int) -> None:
        self.index = index
        self.args_at: int | None = None  # where the arguments start in the body, once the head is read
        self.sent = 0

    @staticmethod
    def _args(body: str, start: int) -> str:
        args = body[start:].lstrip()
        return args[: _HERMES_TAIL.search(args).start()]  # type: ignore[union-attr]

    def update(self, body: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if self.args_at is None:
            m = _HERMES_HEAD.match(body)
            if m is None:
                return out
            self.args_at = m.end()
            out.append(ToolCallDelta(self.index, id=new_call_id(), name=json.loads(f'"{m.group(1)}"')))
        args = self._args(body, self.args_at)
        if len(args) > self.sent:
            out.append(ToolCallDelta(self.index, arguments=args[self.sent:]))
            self.sent = len(args)
        return out

    def finish(self, body: str) -> list[ToolCallDelta] | None:
        obj = _loads(body)
        ok = isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)
        if self.args_at is not None:  # already announced: send the rest, even if it turned out broken
            if not ok:
                log.warning("tool call %r ended malformed: %r", self.index, body[:200])
            return self.update(body)
        if not ok:
            return None
        assert isinstance(obj, dict)
        head = _HERMES_HEAD.match(body)
        if head is not None and _loads(self._args(body, head.end())) == obj["arguments"]:
            return self.update(body)  # the model's own spelling, as the stream sends it
        return [ToolCallDelta(self.index, id=new_call_id(), name=obj["name"]),
                ToolCallDelta(self.index, arguments=dumps_arguments(obj["arguments"]))]


_GLM45_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


class _Glm45Body:
    def __init__(self, index: int, functions: Mapping[str, Mapping[str, Any]]) -> None:
        self.index = index
        self.functions = functions
        self.name: str | None = None
        self.scan = 0  # body offset after the last parsed key/value pair
        self.pairs = 0

    def _value(self, key: str, raw: str) -> Any:
        fn = self.functions.get(self.name or "")
        if fn is not None and key in string_parameters(fn):
            return raw
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def _head(self, body: str) -> int | None:
        cut = [p for p in (body.find("\n"), body.find("<arg_key>")) if p >= 0]
        return min(cut) if cut else None

    def update(self, body: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if self.name is None:
            cut = self._head(body)
            if cut is None or not body[:cut].strip():
                return out
            self.name, self.scan = body[:cut].strip(), cut
            out.append(ToolCallDelta(self.index, id=new_call_id(), name=self.name))
        while (m := _GLM45_PAIR.match(body, self.scan)) is not None:
            key = m.group(1).strip()
            value = json.dumps(self._value(key, m.group(2)), ensure_ascii=False)
            piece = ("{" if self.pairs == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": " + value
            out.append(ToolCallDelta(self.index, arguments=piece))
            self.pairs += 1
            self.scan = m.end()
        return out

    def finish(self, body: str) -> list[ToolCallDelta] | None:
        out: list[ToolCallDelta] = []
        if self.name is None:  # nothing sent yet: check the whole body before announcing the call
            cut = self._head(body)
            cut = len(body) if cut is None else cut
            pos = cut
            while (m := _GLM45_PAIR.match(body, pos)) is not None:
                pos = m.end()
            if not body[:cut].strip() or body[pos:].strip():
                return None
            self.name, self.scan = body[:cut].strip(), cut
            out.append(ToolCallDelta(self.index, id=new_call_id(), name=self.name))
        out += self.update(body)
        if body[self.scan:].strip():
            log.warning("tool call %r ended malformed: %r", self.index, body[:200])
        out.append(ToolCallDelta(self.index, arguments="}" if self.pairs else "{}"))
        return out


# --- GLM-4-0414: the reply is `name\n{json}` -----------------------------------------------------------------------
class _Glm4Stream:
    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.mode = "start"  # -> "content" or "call"
        self.buf = ""
        self.args = ""
        self.sent = 0

    def _could_be_name(self, head: str) -> bool:
        return any(n.startswith(head) or head == n + " " for n in self.names)

    def _args_piece(self, final: bool) -> list[ToolCallDelta]:
        args = self.args.strip() if final else self.args.lstrip()
        args = args if final else args[: len(args.rstrip())]
        if final and not args:
            args = "{}"
        if len(args) <= self.sent:
            return []
        piece = args[self.sent:]
        self.sent = len(args)
        return [ToolCallDelta(0, arguments=piece)]

    def feed(self, text: str) -> StreamDelta:
        out = StreamDelta()
        if self.mode == "content":
            out.content = text
            return out
        if self.mode == "call":
            self.args += text
            out.tool_calls = self._args_piece(final=False)
            return out
        self.buf += text
        head = self.buf.lstrip()
        line, newline, rest = head.partition("\n")
        if newline and line.rstrip(" ") in self.names:
            self.mode, self.args = "call", rest
            out.tool_calls = [ToolCallDelta(0, id=new_call_id(), name=line.rstrip(" "))]
            out.tool_calls += self._args_piece(final=False)
        elif newline or not self._could_be_name(head):
            self.mode, out.content = "content", self.buf
        return out

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if self.mode == "start":
            name = self.buf.strip()
            if name in self.names:
                out.tool_calls = [ToolCallDelta(0, id=new_call_id(), name=name, arguments="{}")]
            else:
                out.content = self.buf
        elif self.mode == "call":
            try:
                ok = isinstance(json.loads(self.args.strip() or "{}"), dict)
            except ValueError:
                ok = False
            if not ok:
                log.warning("GLM-4 tool call arguments are not a JSON object: %r", self.args[:200])
            out.tool_calls = self._args_piece(final=True)
        return out


# --- the formats ---------------------------------------------------------------------------------------------------
class ToolFormat:
    """One family's tool-call syntax. Subclasses set `name`, `markup` (strings that must survive detokenization:
    serve replies with these tokens kept) and implement `stream`; `parse` is the stream fed at once."""

    name: ClassVar[str]
    markup: ClassVar[tuple[str, ...]] = ()

    def stream(self, tools: Sequence[Any] | None) -> ToolCallStream:
        raise NotImplementedError

    def parse(self, text: str, tools: Sequence[Any] | None) -> ParsedReply:
        """Whole reply -> content + tool calls (what the non-streaming response carries).

        Unlike the stream, which cannot take back a call it has announced, a call whose arguments are not a JSON
        object (cut by max_tokens, or malformed) is left out here, so clients can json.loads every call they get
        (vLLM's parsers do the same); when that leaves no call, the whole reply is the content, so nothing is lost."""
        stream = self.stream(tools)
        reply = assemble([stream.feed(text), stream.finish()])
        calls = [c for c in reply.tool_calls if isinstance(arguments_mapping(c.arguments), dict)]
        if len(calls) == len(reply.tool_calls):
            return reply
        log.warning("left out %d tool call(s) whose arguments are not a JSON object",
                    len(reply.tool_calls) - len(calls))
        if not calls:
            return ParsedReply(content=text if text.strip() else None, tool_calls=[])
        return ParsedReply(content=reply.content, tool_calls=calls)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class HermesToolFormat(ToolFormat):
    name = "hermes"
    markup = ("<tool_call>", "</tool_call>")

    def stream(self, tools: Sequence[Any] | None) -> ToolCallStream:
        return _TaggedStream("<tool_call>", "</tool_call>", _HermesBody)


class Glm45ToolFormat(ToolFormat):
    name = "glm45"
    markup = ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")

    def stream(self, tools: Sequence[Any] | None) -> ToolCallStream:
        functions = tool_functions(tools)
        return _TaggedStream("<tool_call>", "</tool_call>", lambda i: _Glm45Body(i, functions))


class Glm4ToolFormat(ToolFormat):
    name = "glm4"

    def stream(self, tools: Sequence[Any] | None) -> ToolCallStream:
        return _Glm4Stream(list(tool_functions(tools)))


TOOL_FORMATS: dict[str, type[ToolFormat]] = {f.name: f for f in (HermesToolFormat, Glm45ToolFormat, Glm4ToolFormat)}


def detect_tool_format(template_source: str | None, architecture: str | None = None) -> ToolFormat | None:
    """The tool-call format the chat template teaches, from its text; None when it has no tool syntax.

    `architecture` (config.json `model_type` / GGUF `general.architecture`) only breaks a tie for templates that
    show no syntax of their own."""
    src = template_source or ""
    if "<arg_key>" in src:
        return Glm45ToolFormat()
    if "<tool_call>" in src:
        return HermesToolFormat()
    if "<|observation|>" in src and "metadata" in src:
        return Glm4ToolFormat()
    if "tools" in src and architecture in ("qwen2", "qwen3"):
        return HermesToolFormat()
    return None
