"""Built-in chat templates per model family, for checkpoints that ship none (like llama.cpp's `llm_chat_template`).

`choose_chat_template` is the one place that decides which template a loaded model chats with — the loader (and so
the server and `autoglm chat`) and `autoglm inspect` both call it, so what inspect prints is what the server uses:

1. `--chat-template` (file or text)                       -> origin "override"
2. the checkpoint's own template (GGUF metadata, HF files) -> origin "embedded"
3. a built-in for the model's family                       -> origin "builtin"
   (GLM-4.1V, GLM-4, Gemma, Llama 3, ChatML for Qwen), chosen from the architecture, an attached vision encoder
   and the tokenizer's control tokens — never ChatML for a GLM
4. ChatML, as llama-server does                            -> origin "fallback"

The built-in texts are written for this project from the families' prompt formats; the GLM-4.1V one renders
byte-identically to the released checkpoint's template (tests/test_builtin_templates.py compares them), so a GGUF
converted without its template still gets image placeholders and the same `<think>` behaviour (none in the
template: GLM-4.1V always thinks; `enable_thinking=false` is the engine's empty `<think></think>` prefill).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from autoglm.tokenizer.chat_template import CHATML_TEMPLATE, ChatTemplate

if TYPE_CHECKING:
    from autoglm.models.loaded import LoadedModel

log = logging.getLogger("autoglm.tokenizer.builtin_templates")

Origin = Literal["override", "embedded", "builtin", "fallback"]
FALLBACK_NAME = "chatml (fallback)"

_NL = "{{ '\\n' }}"  # newlines as expressions: trim_blocks would eat a literal one after a tag

# GLM-4.1V / AutoGLM-Phone: [gMASK]<sop>, role tags, media placeholders inside user turns, assistant metadata
# (the tool name) after its tag; other roles (tool) are not shown, exactly as the released template does.
GLM4V_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}<|system|>" + _NL + "{{ m.content }}"
    "{% elif m.role == 'user' %}<|user|>" + _NL +
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'video' or 'video' in p %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif p.type == 'image' or 'image' in p %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif p.type == 'text' %}{{ p.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif m.role == 'assistant' %}<|assistant|>{{ m.metadata if m.metadata else '' }}" + _NL + "{{ m.content }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>" + _NL + "{% endif %}"
)

# GLM-4 (chatglm4 in llama.cpp): [gMASK]<sop><|role|>\ncontent...; tool results are GLM's <|observation|> turn.
GLM4_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for m in messages %}"
    "<|{{ 'observation' if m.role == 'tool' else m.role }}|>" + _NL +
    "{% if m.content is string %}{{ m.content }}"
    "{% elif m.content %}{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>" + _NL + "{% endif %}"
)

# Gemma: no system role (merged into the first user turn), "assistant" is "model", contents trimmed.
GEMMA_TEMPLATE = (
    "{{ bos_token if bos_token is defined else '' }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{% set ns.system = ns.system + (m.content | string | trim) %}"
    "{% else %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}" + _NL +
    "{% if ns.system and m.role != 'assistant' %}{{ ns.system }}" + _NL + _NL + "{% set ns.system = '' %}{% endif %}"
    "{{ (m.content if m.content is string else '') | trim }}<end_of_turn>" + _NL +
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model" + _NL + "{% endif %}"
)

# Llama 3: header per turn, contents trimmed, <|eot_id|> after each.
LLAMA3_TEMPLATE = (
    "{{ bos_token if bos_token is defined else '' }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m.role }}<|end_header_id|>" + _NL + _NL +
    "{{ (m.content if m.content is string else '') | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>" + _NL + _NL + "{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "glm4v": GLM4V_TEMPLATE,
    "glm4": GLM4_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
}

_GLM_ARCHS = ("glm4", "glm4v", "chatglm", "glm4moe", "glm4v_moe")


@dataclass(frozen=True)
class TemplateChoice:
    """Which template a model chats with, and why (`describe()` is the line inspect and the server log print)."""

    template: ChatTemplate
    origin: Origin
    family: str  # built-in name ("glm4v", ...) or "" for embedded/override
    reason: str

    def describe(self) -> str:
        if self.origin == "embedded":
            return f"embedded ({len(self.template.source)} chars)"
        if self.origin == "override":
            return f"--chat-template ({len(self.template.source)} chars)"
        if self.origin == "builtin":
            return f"built-in {self.family} (file has none; {self.reason})"
        return f"none: ChatML fallback ({self.reason})"


def builtin_family(architecture: str, vocab: Mapping[str, int], *, has_vision: bool = False) -> tuple[str, str] | None:
    """(built-in name, why) for a model of `architecture` (GGUF `general.architecture` or HF `architectures[0]`)
    whose tokenizer has `vocab`; None when no family matches (the caller falls back to ChatML)."""
    arch = architecture.lower()
    is_glm = arch.startswith(_GLM_ARCHS) or "[gMASK]" in vocab or ("<sop>" in vocab and "<|user|>" in vocab)
    if is_glm:
        glm_v = "glm4v" in arch or has_vision
        if glm_v and "<|begin_of_image|>" in vocab:
            why = "architecture " + architecture if "glm4v" in arch else "GLM with a vision encoder"
            return "glm4v", why
        return "glm4", f"architecture {architecture}" if arch.startswith(_GLM_ARCHS) else "GLM control tokens"
    if arch.startswith("gemma") or "<start_of_turn>" in vocab:
        return "gemma", f"architecture {architecture}" if arch.startswith("gemma") else "<start_of_turn> in vocab"
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3", "<|start_header_id|>/<|eot_id|> in vocab"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml", f"<|im_start|>/<|im_end|> in vocab ({architecture or 'unknown architecture'})"
    return None


def choose_chat_template(model: LoadedModel, override_source: str | None = None,
                         override_name: str = "--chat-template") -> TemplateChoice:
    """The template `model` will chat with (see the module docstring for the order). Pure: `model` is not changed."""
    tok = model.tokenizer
    specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
    if override_source is not None:
        template = ChatTemplate.from_string(override_source, special_tokens=specials, name=override_name)
        return TemplateChoice(template, "override", "", "given on the command line")
    current = model.chat_template
    if current is not None and getattr(current, "origin", "embedded") == "embedded":
        return TemplateChoice(current, "embedded", "", "the checkpoint's own")
    if current is not None:  # already chosen once (a loaded model passed through again): same answer
        return TemplateChoice(current, current.origin, current.family, current.reason)
    vocab = tok.get_vocab()
    found = builtin_family(model.architecture, vocab, has_vision="image" in model.encoders
                           or model.missing_projector is not None)
    if found is not None:
        family, why = found
        template = ChatTemplate.from_string(BUILTIN_TEMPLATES[family], special_tokens=specials, vocab=vocab,
                                            name=f"{family} (built-in)")
        return _tag(TemplateChoice(template, "builtin", family, why))
    template = ChatTemplate.from_string(CHATML_TEMPLATE, special_tokens=specials, name=FALLBACK_NAME)
    why = f"no built-in for architecture {model.architecture or 'unknown'}"
    return _tag(TemplateChoice(template, "fallback", "chatml", why))


def _tag(choice: TemplateChoice) -> TemplateChoice:
    # the template remembers how it was chosen, so a second call (inspect after load) reports the same
    choice.template.origin = choice.origin
    choice.template.family = choice.family
    choice.template.reason = choice.reason
    return choice


def apply_chat_template(model: LoadedModel, override_source: str | None = None,
                        override_name: str = "--chat-template") -> TemplateChoice:
    """`choose_chat_template` + set it on the model + log which one and why (what the loader calls)."""
    choice = choose_chat_template(model, override_source, override_name)
    if choice.origin == "override":
        _tag(choice)
    model.chat_template = choice.template
    level = logging.WARNING if choice.origin == "fallback" else logging.INFO
    hint = "; pass --chat-template to use another" if choice.origin == "fallback" else ""
    log.log(level, "%s: chat template: %s%s", model.path or model.name, choice.describe(), hint)
    return choice
