"""What a request asks the model to continue: token ids (placeholders expanded), media items, M-RoPE positions.

`build_text_prompt` tokenizes a raw prompt; `build_chat_prompt` renders OpenAI-style messages with the model's chat
template, loads and preprocesses the images, expands each image placeholder to its slots and computes positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from autoglm.errors import ContextTooLong, InvalidRequest, MissingProjector, UnsupportedModality
from autoglm.models.loaded import LoadedModel
from autoglm.multimodal.encoder import EncoderInputs
from autoglm.multimodal.placeholders import expand_placeholders, mrope_positions
from autoglm.tokenizer.literal import client_texts, encode_prompt


@dataclass
class MediaItem:
    """One preprocessed media item whose `n_slots` embeddings go at token_ids[offset : offset + n_slots]."""

    inputs: EncoderInputs
    offset: int

    @property
    def n_slots(self) -> int:
        return self.inputs.n_slots

    @property
    def modality(self) -> str:
        return self.inputs.modality


@dataclass
class PromptInputs:
    token_ids: list[int]
    media: list[MediaItem] = field(default_factory=list)
    text: str | None = None  # the rendered prompt, for logs and echo
    positions: Tensor | None = None  # [3, L] M-RoPE positions; None: 1-D positions 0..L-1 (or text-only M-RoPE)
    mrope_delta: int = 0  # generated token at sequence index i has position i + delta (M-RoPE)


def check_fits(model: LoadedModel, text: str, param: str) -> None:
    """ContextTooLong before tokenizing a text that cannot fit the model's context whatever its tokens are."""
    n_min = model.tokenizer.literal.min_tokens(text)
    if n_min >= model.max_model_len:
        raise ContextTooLong(
            f"This model's maximum context length is {model.max_model_len} tokens. However, your {param} "
            f"({len(text)} characters) would be at least {n_min} tokens. Please reduce the length of the {param}.",
            param=param,
        )


def build_text_prompt(model: LoadedModel, prompt: str | list[int]) -> PromptInputs:
    """A raw completion prompt: text is tokenized with the tokenizer's special tokens (BOS if it adds one)."""
    if isinstance(prompt, str):
        check_fits(model, prompt, "prompt")
        return PromptInputs(token_ids=model.tokenizer.encode(prompt, add_special_tokens=True), text=prompt)
    ids = [int(t) for t in prompt]
    if not ids:
        raise InvalidRequest("prompt is empty", param="prompt")
    return PromptInputs(token_ids=ids)


ImageLoader = Callable[[Any], Any]  # image source (URL / path / bytes / PIL) -> PIL.Image; raises MediaError

_IMAGE_TYPES = ("image_url", "image", "input_image", "image_pil")


def build_chat_prompt(
    model: LoadedModel,
    messages: Sequence[Mapping[str, Any]],
    *,
    enable_thinking: bool | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    content_format: str = "string",
    image_loader: ImageLoader | None = None,
    add_generation_prompt: bool = True,
    max_images: int | None = None,
) -> PromptInputs:
    """OpenAI-style messages -> PromptInputs (template rendered, images preprocessed, placeholders expanded).

    enable_thinking (or chat_template_kwargs["enable_thinking"]): False asks the model not to think — through the
    template variable when the template has one, else by prefilling an empty `<think></think>`.
    image_loader: resolves image sources; the default accepts PIL images, bytes and data URLs only (the server
    passes its media policy; the Python API also allows local paths).
    """
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    template = model.chat_template
    if template is None:
        raise InvalidRequest(f"model {model.name!r} has no chat template; use a completion prompt", param="messages")
    kwargs = dict(chat_template_kwargs or {})
    if enable_thinking is None:
        enable_thinking = kwargs.get("enable_thinking")
    if enable_thinking is not None and template.supports_enable_thinking:
        kwargs["enable_thinking"] = bool(enable_thinking)
    else:
        kwargs.pop("enable_thinking", None)

    sources = _image_sources(messages)
    if max_images is not None and len(sources) > max_images:
        raise InvalidRequest(f"At most {max_images} image(s) may be provided in one prompt.", param="messages")
    encoder = None
    if sources:
        encoder = model.encoders.get("image")
        if encoder is None:
            if model.missing_projector:
                raise MissingProjector(model.missing_projector, param="messages")
            raise UnsupportedModality(
                f"model {model.name!r} has no vision encoder loaded (text-only, or started with --no-vision); "
                "remove the image parts",
                param="messages",
            )

    text = template.render(messages, add_generation_prompt=add_generation_prompt,
                           content_format=content_format, **kwargs)  # type: ignore[arg-type]
    if enable_thinking is False and not template.supports_enable_thinking and add_generation_prompt:
        tok = model.tokenizer
        if tok.token_to_id("<think>") is not None and tok.token_to_id("</think>") is not None:
            text += "<think></think>"
    check_fits(model, text, "messages")
    # the template wrote the prefix tokens itself; client text is never parsed as control tokens
    ids = encode_prompt(model.tokenizer.backend, model.tokenizer.literal, text, client_texts(messages))
    if encoder is None:
        return PromptInputs(token_ids=ids, text=text)

    load = image_loader or _default_image_loader
    inputs = [encoder.preprocess(load(src)) for src in sources]
    ids, spans = expand_placeholders(ids, encoder.placeholder_id, [i.n_slots for i in inputs],
                                     [i.grid for i in inputs])
    media = [MediaItem(inputs=i, offset=s.offset) for i, s in zip(inputs, spans, strict=True)]
    prompt = PromptInputs(token_ids=ids, media=media, text=text)
    if getattr(model.decoder, "uses_mrope", False):
        merge = _merge_size(inputs[0])
        prompt.positions, prompt.mrope_delta = mrope_positions(len(ids), spans, merge)
    return prompt


def _image_sources(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Every image part's source, in prompt order (same order the template emits placeholders)."""
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type") or next((k for k in _IMAGE_TYPES if k in part), None)
            if kind not in _IMAGE_TYPES:
                continue
            src = part.get(kind, part.get("image_url", part.get("image")))
            if isinstance(src, Mapping):
                src = src.get("url")
            if src is None:
                raise InvalidRequest(f"messages[{i}].content[{j}] has no image", param=f"messages[{i}].content[{j}]")
            out.append(src)
    return out


def _default_image_loader(source: Any) -> Any:
    from autoglm.multimodal.media import load_image

    return load_image(source)


def _merge_size(inputs: EncoderInputs) -> int:
    # n_slots = t*h*w / merge^2 for GLM-4.1V-style encoders
    t, h, w = (int(v) for v in inputs.grid)
    return int(round((t * h * w / inputs.n_slots) ** 0.5))
