"""What a request asks the model to continue: token ids (placeholders expanded) and media items.

`build_text_prompt` tokenizes a raw prompt; `build_chat_prompt` renders OpenAI-style messages with the model's chat
template and hands the ids and the messages' media parts to `assemble_prompt`, the one place (server and `LLM`
alike) where media is routed to its encoder, preprocessed and each placeholder expanded to the item's slots.
Positions are not computed here: the engine asks the decoder (`prompt_positions(len(ids), prompt.spans)`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoglm.errors import ContextTooLong, InvalidRequest, MissingProjector, UnsupportedModality
from autoglm.models.loaded import LoadedModel
from autoglm.models.positions import MediaSpan
from autoglm.multimodal.encoder import Encoder, EncoderInputs
from autoglm.multimodal.media import MediaPolicy
from autoglm.tokenizer.literal import client_texts, encode_prompt

# Content-part types that carry text (the chat template renders them); every other type must have an encoder.
TEXT_PART_TYPES = frozenset({"text", "input_text"})


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

    @property
    def span(self) -> MediaSpan:
        return MediaSpan(self.offset, self.n_slots, self.inputs.slot_grid)


@dataclass
class PromptInputs:
    token_ids: list[int]
    media: list[MediaItem] = field(default_factory=list)
    text: str | None = None  # the rendered prompt, for logs and echo

    @property
    def spans(self) -> list[MediaSpan]:
        """Where each media item's slots sit (what `decoder.prompt_positions` takes)."""
        return [m.span for m in self.media]


@dataclass(frozen=True)
class MediaPart:
    """A media content part routed to the encoder that declared its type; `where` names it in errors."""

    encoder: Encoder
    part: Mapping[str, Any]
    where: str = "messages"
    message: int = 0  # index of the message it came from


def check_fits(model: LoadedModel, text: str, param: str, max_len: int | None = None) -> None:
    """ContextTooLong before tokenizing a text that cannot fit the context (`max_len`: the one served, default the
    model's) whatever its tokens are."""
    limit = max_len or model.max_model_len
    n_min = model.tokenizer.literal.min_tokens(text)
    if n_min >= limit:
        raise ContextTooLong(
            f"This model's maximum context length is {limit} tokens. However, your {param} "
            f"({len(text)} characters) would be at least {n_min} tokens. Please reduce the length of the {param}.",
            param=param,
        )


def build_text_prompt(model: LoadedModel, prompt: str | list[int], *, max_len: int | None = None) -> PromptInputs:
    """A raw completion prompt: text is tokenized with the tokenizer's special tokens (BOS if it adds one).
    max_len: the context served (for the early too-long check; default the model's)."""
    if isinstance(prompt, str):
        check_fits(model, prompt, "prompt", max_len)
        return PromptInputs(token_ids=model.tokenizer.encode(prompt, add_special_tokens=True), text=prompt)
    ids = [int(t) for t in prompt]
    if not ids:
        raise InvalidRequest("prompt is empty", param="prompt")
    return PromptInputs(token_ids=ids)


def build_chat_prompt(
    model: LoadedModel,
    messages: Sequence[Mapping[str, Any]],
    *,
    enable_thinking: bool | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    content_format: str = "string",
    media_policy: MediaPolicy | None = None,
    add_generation_prompt: bool = True,
    max_media: int | None = None,
    tools: Sequence[Any] | None = None,
    max_len: int | None = None,
) -> PromptInputs:
    """OpenAI-style messages -> PromptInputs (template rendered, media routed, preprocessed, placeholders expanded).

    enable_thinking (or chat_template_kwargs["enable_thinking"]): False asks the model not to think — through the
    template variable when the template has one, else by prefilling an empty `<think></think>`.
    media_policy: where media may come from (None: in-memory objects and data URLs only; the server passes its
    policy, the Python API allows local paths). max_media: at most this many items per modality.
    tools: OpenAI tool definitions, passed to the template (it decides how the model sees them).
    max_len: the context served (for the early too-long check; default the model's).
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

    parts = media_parts(model, messages)  # before rendering: an unservable part is a clean 400
    _check_counts(parts, max_media)
    text = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           content_format=content_format, **kwargs)  # type: ignore[arg-type]
    if enable_thinking is False and not template.supports_enable_thinking and add_generation_prompt:
        tok = model.tokenizer
        if tok.token_to_id("<think>") is not None and tok.token_to_id("</think>") is not None:
            text += "<think></think>"
    check_fits(model, text, "messages", max_len)
    # the template wrote the prefix tokens itself; client text is never parsed as control tokens
    ids = encode_prompt(model.tokenizer.backend, model.tokenizer.literal, text, client_texts(messages))
    _check_placed(ids, parts, messages)
    media = [(p.encoder, _load(p, media_policy)) for p in parts]
    return assemble_prompt(ids, media, text=text)


def _check_placed(ids: Sequence[int], parts: Sequence[MediaPart], messages: Sequence[Mapping[str, Any]]) -> None:
    """Every media part got its placeholder from the template; a template that leaves a message's content out
    (many have no branch for role "tool") would otherwise surface as a placeholder-count mismatch."""
    wanted = {p.encoder.placeholder_id for p in parts}
    placed = sum(1 for t in ids if t in wanted)
    if placed >= len(parts):
        return
    roles = sorted({str(messages[p.message].get("role")) for p in parts})
    odd = next((p for p in parts if messages[p.message].get("role") not in ("user", "system")), parts[0])
    raise InvalidRequest(
        f"the chat template placed {placed} of the {len(parts)} media item(s): it leaves out the content of some "
        f"messages (media sent in role(s) {', '.join(roles)}; {odd.where} is in a "
        f"{messages[odd.message].get('role')!r} message); send images and audio in user messages",
        param=odd.where,
    )


def assemble_prompt(
    token_ids: Sequence[int], media: Sequence[tuple[Encoder, Any]], *, text: str | None = None
) -> PromptInputs:
    """Ids with one placeholder token per media item + the items (encoder, decoded media) in prompt order ->
    PromptInputs: each item preprocessed by its encoder and its placeholder expanded to the item's slots."""
    ids = [int(t) for t in token_ids]
    if not media:
        return PromptInputs(token_ids=ids, text=text)
    inputs = [enc.preprocess(item) for enc, item in media]
    ids, spans = expand_placeholders(
        ids, [enc.placeholder_id for enc, _ in media], [i.n_slots for i in inputs], [i.slot_grid for i in inputs]
    )
    items = [MediaItem(inputs=i, offset=s.offset) for i, s in zip(inputs, spans, strict=True)]
    return PromptInputs(token_ids=ids, media=items, text=text)


def expand_placeholders(
    token_ids: Sequence[int],
    placeholder_ids: Sequence[int],
    n_slots: Sequence[int],
    slot_grids: Sequence[tuple[int, ...]] | None = None,
) -> tuple[list[int], list[MediaSpan]]:
    """Replace the placeholder token of media item k (`placeholder_ids[k]`, items in prompt order) with
    `n_slots[k]` copies of it.

    Returns the expanded ids and one `MediaSpan` per item (grid: `slot_grids[k]`). Tokens around a placeholder
    (begin/end-of-image) are kept. The placeholders in the prompt must be the items', in the same order."""
    if len(placeholder_ids) != len(n_slots) or (slot_grids is not None and len(slot_grids) != len(n_slots)):
        raise ValueError(f"{len(placeholder_ids)} placeholder ids, {len(n_slots)} slot counts and "
                         f"{len(slot_grids or ())} grids for the media items")
    wanted = set(placeholder_ids)
    found = [int(t) for t in token_ids if t in wanted]
    if found != [int(p) for p in placeholder_ids]:
        ids = ", ".join(str(i) for i in sorted(wanted))
        raise InvalidRequest(
            f"prompt has {len(found)} media placeholder token(s) (id {ids}) "
            f"but {len(n_slots)} media item(s) were given"
        )
    out: list[int] = []
    spans: list[MediaSpan] = []
    k = 0
    for t in token_ids:
        if t not in wanted:
            out.append(int(t))
            continue
        n = int(n_slots[k])
        if n <= 0:
            raise InvalidRequest(f"media item {k} fills {n} slots; expected a positive count")
        spans.append(MediaSpan(len(out), n, tuple(slot_grids[k]) if slot_grids is not None else ()))
        out.extend([int(t)] * n)
        k += 1
    return out, spans


def media_parts(model: LoadedModel, messages: Sequence[Mapping[str, Any]]) -> list[MediaPart]:
    """Every media content part, in prompt order (the order the template emits placeholders), with its encoder."""
    by_type = {t: enc for enc in model.encoders.values() for t in enc.part_types}
    out: list[MediaPart] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                continue
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") or next((k for k in by_type if k in part), None)
            if kind is None or kind in TEXT_PART_TYPES:
                continue
            encoder = by_type.get(kind)
            if encoder is None:
                raise _no_encoder(model, str(kind), where)
            out.append(MediaPart(encoder, part, where, i))
    return out


def _no_encoder(model: LoadedModel, kind: str, where: str) -> InvalidRequest:
    if model.missing_projector:  # a GGUF loaded without the projector its model needs
        return MissingProjector(model.missing_projector, param="messages")
    accepted = sorted(t for enc in model.encoders.values() for t in enc.part_types)
    return UnsupportedModality(
        f"{where} is a {kind!r} part, but model {model.name!r} has no encoder loaded for it "
        f"(accepted media part types: {', '.join(accepted) or 'none: text only'}); remove that part",
        param="messages",
    )


def _check_counts(parts: Sequence[MediaPart], limit: int | None) -> None:
    if limit is None:
        return
    counts: dict[str, int] = {}
    for p in parts:
        counts[p.encoder.modality] = counts.get(p.encoder.modality, 0) + 1
    for modality, n in counts.items():
        if n > limit:
            raise InvalidRequest(f"At most {limit} {modality}(s) may be provided in one prompt.", param="messages")


def _load(part: MediaPart, policy: MediaPolicy | None) -> Any:
    media = part.encoder.load(part.part, policy)
    if media is None:
        raise InvalidRequest(f"{part.where} has no {part.encoder.modality}", param=part.where)
    return media
