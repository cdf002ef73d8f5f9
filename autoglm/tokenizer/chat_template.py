"""ChatTemplate: a model's own Jinja2 chat template rendered in a sandbox with transformers' semantics.

Environment as in `transformers.utils.chat_template_utils`: `ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)` with loop controls and `{% generation %}`, `tojson` without HTML escaping, `raise_exception`,
`strftime_now`, a limited `dict` and a `namespace` that refuses underscore names; the named special tokens
(`bos_token`, `eos_token`, ...) are variables. Everything the template sees is rebuilt from plain JSON types.

Content modes (vLLM's `--chat-template-content-format`):
- "string": list content is flattened to one string per message: one media placeholder + "\n" per media part in
  front, then the text parts joined with "\n" (what AutoGLM models were served with).
- "openai": list content goes to the template as a list, media parts normalised to `{"type": "image"}` etc.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from autoglm.errors import ConfigError, InvalidRequest

ContentFormat = Literal["string", "openai"]

# Per-model media placeholders; the first one found in the template source is the model's.
IMAGE_PLACEHOLDERS: tuple[str, ...] = (
    "<|begin_of_image|><|image|><|end_of_image|>",  # GLM-4.1V / GLM-4.5V / AutoGLM-Phone
    "<|vision_start|><|image_pad|><|vision_end|>",  # Qwen2-VL / Qwen2.5-VL
    "<start_of_image>",  # Gemma 3
    "<image>",  # LLaVA-style
)
VIDEO_PLACEHOLDERS: tuple[str, ...] = (
    "<|begin_of_video|><|video|><|end_of_video|>",
    "<|vision_start|><|video_pad|><|vision_end|>",
    "<video>",
)
AUDIO_PLACEHOLDERS: tuple[str, ...] = ("<|begin_of_audio|><|audio|><|end_of_audio|>", "<audio>")

_TEXT_TYPES = {"text", "input_text"}
_MEDIA_KINDS = {
    "image": "image",
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image",
    "video": "video",
    "video_url": "video",
    "audio": "audio",
    "audio_url": "audio",
    "input_audio": "audio",
}
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning arrives under; transformers fills all of them from whichever is set.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# --- sandbox helpers -----------------------------------------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask marker in HF templates): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON (as transformers renders it).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` inside templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names (no reaching CPython internals through it)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's Namespace signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _TemplateNamespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


MAX_TEMPLATE_ITEMS = 1_000_000  # longest string or list a template may build with * / % / center, and its loop budget
_LOOP_BUDGET: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("_LOOP_BUDGET", default=None)


def _too_big(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(f"{what} is over the chat template limit of {MAX_TEMPLATE_ITEMS} items")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on what a template (a file's metadata: hostile input) can make the process do:
    `*`, `**` and `%` are checked before they run (and so never folded at compile time, where `'x' * 10**10`
    would allocate while merely loading the file), and `range` counts against one budget per render, so nested
    loops cannot run for hours."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_ITEMS:
                    raise _too_big(f"a repetition of {len(seq)} x {n}")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and (
                right > 64 and abs(left) > 1 or abs(left).bit_length() * max(right, 0) > 4096):
            raise _too_big(f"{left} ** {right}")
        if operator == "%" and isinstance(left, str) and re.search(r"%[-+ #0]*(\d{6,}|\*)", left):
            raise _too_big("a %-format width")
        return super().call_binop(context, operator, left, right)


class _CountedRange:
    """`range` whose iteration draws on the render's loop budget (len, indexing and reversal as a range)."""

    def __init__(self, r: range) -> None:
        self.r = r

    def __len__(self) -> int:
        return len(self.r)

    def __getitem__(self, i: Any) -> Any:
        return self.r[i]

    def __iter__(self) -> Any:
        return _counted(iter(self.r))

    def __reversed__(self) -> Any:
        return _counted(reversed(self.r))


def _counted(it: Any) -> Any:
    budget = _LOOP_BUDGET.get()
    for item in it:
        if budget is not None:
            budget[0] -= 1
            if budget[0] < 0:
                raise _too_big("the loops of one render")
        yield item


def _range(*args: int) -> _CountedRange:
    return _CountedRange(jinja2.sandbox.safe_range(*args))


def _center(value: Any, width: int = 80) -> str:
    if isinstance(width, int) and width > MAX_TEMPLATE_ITEMS:
        raise _too_big(f"center width {width}")
    return str(value).center(width)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.globals["range"] = _range
    env.filters["center"] = _center
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types; anything else becomes an inert "<TypeName>" string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value] if isinstance(value, list) else tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic models (the server's protocol objects)
        return _plain(dump(exclude_none=True))
    return f"<{type(value).__name__}>"


def _first_in(source: str, table: Iterable[str], vocab: Mapping[str, int] | None = None) -> str | None:
    """The first placeholder written in the template; else the first whose tokens are all in `vocab`."""
    found = next((p for p in table if p in source), None)
    if found is None and vocab:
        found = next((p for p in table if all(t in vocab for t in re.findall(r"<[^<>]+>", p))), None)
    return found


# --- the template --------------------------------------------------------------------------------------------------
# llama-server's fallback for a model that carries no template (common/chat.cpp uses ChatML); we do the same.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class NoChatTemplate(ConfigError):
    """The model directory carries no chat template at all (a base model): loaders treat this as "no template"."""


class ChatTemplate:
    """One model's chat template. `render(messages, ...) -> prompt text` (media placeholders not yet expanded)."""

    def __init__(
        self,
        source: str,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        image_placeholder: str | None = None,
        video_placeholder: str | None = None,
        audio_placeholder: str | None = None,
        vocab: Mapping[str, int] | None = None,
        name: str = "",
    ) -> None:
        """`vocab` ({token: id}, e.g. `Tokenizer.get_vocab()`) lets placeholders be found from the tokenizer
        when the template does not spell them out."""
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"chat template of {name or 'the model'} is empty")
        self.source = source
        self.name = name
        # how it was chosen (autoglm.tokenizer.builtin_templates sets these for built-ins and fallbacks)
        self.origin = "embedded"
        self.family = ""
        self.reason = ""
        self.special_tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.image_placeholder = image_placeholder or _first_in(source, IMAGE_PLACEHOLDERS, vocab)
        self.video_placeholder = video_placeholder or _first_in(source, VIDEO_PLACEHOLDERS, vocab)
        self.audio_placeholder = audio_placeholder or _first_in(source, AUDIO_PLACEHOLDERS, vocab)
        # The template reads `enable_thinking` (GLM-4.5V+, Qwen3); GLM-4.1V's does not (it always thinks).
        self.supports_enable_thinking = "enable_thinking" in source
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            where = name or "the model"
            raise ConfigError(f"chat template of {where} has a syntax error at line {e.lineno}: {e}") from e
        except (RecursionError, MemoryError, OverflowError, jinja2.exceptions.TemplateError) as e:
            raise ConfigError(f"chat template of {name or 'the model'} cannot be compiled: {type(e).__name__}: "
                              f"{str(e)[:200]}") from e

    # --- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_string(
        cls,
        source: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        image_placeholder: str | None = None,
        vocab: Mapping[str, int] | None = None,
        name: str = "",
    ) -> ChatTemplate:
        """From a template string (GGUF `tokenizer.chat_template`)."""
        tokens = dict(special_tokens or {})
        tokens.setdefault("bos_token", bos_token)
        tokens.setdefault("eos_token", eos_token)
        return cls(source, special_tokens=tokens, image_placeholder=image_placeholder, vocab=vocab, name=name)

    @classmethod
    def from_hf_dir(cls, path: str | Path, *, template_name: str = "default", **kwargs: Any) -> ChatTemplate:
        """From an HF model directory: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a
        string, or a list of {"name", "template"} from which `template_name` is taken), else `chat_template.json`.
        The named special tokens (bos_token, eos_token, ...) come from `tokenizer_config.json`."""
        path = Path(path)
        cfg: dict[str, Any] = {}
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
        tokens = {k: _content(cfg.get(k)) for k in _NAMED_SPECIALS}
        source = _find_hf_template(path, cfg, template_name)
        return cls(source, special_tokens=tokens, name=kwargs.pop("name", str(path)), **kwargs)

    # --- rendering -----------------------------------------------------------------------------------------------
    def render(
        self,
        messages: Sequence[Any],
        *,
        add_generation_prompt: bool = True,
        content_format: ContentFormat = "string",
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Prompt text for `messages` (dicts or pydantic models with role/content). Extra `kwargs`
        (`chat_template_kwargs`, e.g. enable_thinking) become template variables; a None value is left undefined.
        Template errors (raise_exception, unsafe access, bad input shape) -> InvalidRequest."""
        if content_format not in ("string", "openai"):
            raise InvalidRequest(f"content_format must be 'string' or 'openai', got {content_format!r}",
                                 param="chat_template_content_format")
        chat = [self._message(m, i, content_format) for i, m in enumerate(_plain(list(messages)))]
        variables: dict[str, Any] = dict(self.special_tokens)
        variables.update({k: _plain(v) for k, v in kwargs.items() if v is not None})
        token = _LOOP_BUDGET.set([MAX_TEMPLATE_ITEMS])
        try:
            return self._template.render(
                messages=chat,
                tools=_plain(list(tools)) if tools is not None else None,
                documents=_plain(list(documents)) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.SecurityError as e:
            raise InvalidRequest(f"chat template of {self.name or 'the model'} attempted an unsafe operation: {e}",
                                 param="messages") from e
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequest(f"chat template error: {e}", param="messages") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                RecursionError) as e:
            raise InvalidRequest(f"chat template cannot render these messages: {type(e).__name__}: {e}",
                                 param="messages") from e
        finally:
            _LOOP_BUDGET.reset(token)

    def _message(self, msg: Any, index: int, content_format: ContentFormat) -> dict[str, Any]:
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{index}] must be an object, got {type(msg).__name__}",
                                 param=f"messages[{index}]")
        # Keys with None values are dropped (templates handle a missing key, not a literal None).
        msg = {k: v for k, v in msg.items() if v is not None}
        if not isinstance(msg.get("role"), str):
            raise InvalidRequest(f"messages[{index}] has no string 'role'", param=f"messages[{index}].role")
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:  # transformers' aliasing: templates read any of the names
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        content = msg.get("content")
        if isinstance(content, list):
            msg["content"] = (
                self._flatten(content, index) if content_format == "string" else self._normalise(content, index)
            )
        return msg

    def _parts(self, content: list[Any], index: int) -> list[tuple[str, Any]]:
        """(kind, item) per content part: kind is "text", "image", "video" or "audio"."""
        out: list[tuple[str, Any]] = []
        for j, item in enumerate(content):
            if isinstance(item, str):
                out.append(("text", {"type": "text", "text": item}))
                continue
            if not isinstance(item, dict):
                raise InvalidRequest(f"messages[{index}].content[{j}] must be an object or a string",
                                     param=f"messages[{index}].content[{j}]")
            kind = item.get("type")
            if kind is None:  # transformers-style items without a type: {"image": ...}, {"text": ...}
                kind = next((k for k in ("text", *_MEDIA_KINDS) if k in item), None)
            if kind in _TEXT_TYPES:
                out.append(("text", item))
            elif kind in _MEDIA_KINDS:
                out.append((_MEDIA_KINDS[kind], item))
            else:
                raise InvalidRequest(f"messages[{index}].content[{j}] has unsupported type {kind!r}",
                                     param=f"messages[{index}].content[{j}].type")
        return out

    def _flatten(self, content: list[Any], index: int) -> str:
        placeholders: list[str] = []
        texts: list[str] = []
        for kind, item in self._parts(content, index):
            if kind == "text":
                text = item.get("text", "")
                texts.append(text if isinstance(text, str) else str(text))
            else:
                placeholders.append(self._placeholder(kind, index))
        return "".join(p + "\n" for p in placeholders) + "\n".join(texts)

    def _normalise(self, content: list[Any], index: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kind, item in self._parts(content, index):
            out.append({"type": "text", "text": item.get("text", "")} if kind == "text" else {"type": kind})
        return out

    def _placeholder(self, kind: str, index: int) -> str:
        placeholder = {"image": self.image_placeholder, "video": self.video_placeholder,
                       "audio": self.audio_placeholder}[kind]
        if placeholder is None:
            raise InvalidRequest(f"messages[{index}] has a {kind} part, but this model's chat template has no {kind} "
                                 "placeholder", param=f"messages[{index}].content")
        return placeholder

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, image_placeholder={self.image_placeholder!r})"


def _content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _find_hf_template(path: Path, cfg: Mapping[str, Any], template_name: str) -> str:
    jinja_file = path / "chat_template.jinja"
    if template_name != "default":
        named = path / "additional_chat_templates" / f"{template_name}.jinja"
        if named.is_file():
            return named.read_text(encoding="utf-8")
    elif jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    value = cfg.get("chat_template")
    if isinstance(value, str) and template_name == "default":
        return value
    if isinstance(value, list):
        named_templates = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named_templates.get(template_name)
        if isinstance(chosen, str):
            return chosen
        raise ConfigError(f"{path / 'tokenizer_config.json'} has no chat template named {template_name!r} "
                          f"(available: {sorted(str(k) for k in named_templates)})")
    json_file = path / "chat_template.json"
    if json_file.is_file() and template_name == "default":
        try:
            data = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{json_file} is not valid JSON: {e}") from e
        if isinstance(data, Mapping) and isinstance(data.get("chat_template"), str):
            return str(data["chat_template"])
        raise ConfigError(f"{json_file} has no string 'chat_template'")
    raise NoChatTemplate(f"no chat template {template_name!r} in {path} (looked for chat_template.jinja, "
                      "tokenizer_config.json 'chat_template', chat_template.json)")
