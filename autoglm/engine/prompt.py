"""What a request asks the model to continue: token ids (placeholders expanded), media items, M-RoPE positions.

`build_text_prompt` tokenizes a raw prompt; `build_chat_prompt` renders OpenAI-style messages with the model's chat
template, loads and preprocesses the images, expands each image placeholder to its slots and computes positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from autoglm.errors import InvalidRequest
from autoglm.models.loaded import LoadedModel
from autoglm.multimodal.encoder import EncoderInputs


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


def build_text_prompt(model: LoadedModel, prompt: str | list[int]) -> PromptInputs:
    """A raw completion prompt: text is tokenized with the tokenizer's special tokens (BOS if it adds one)."""
    if isinstance(prompt, str):
        return PromptInputs(token_ids=model.tokenizer.encode(prompt, add_special_tokens=True), text=prompt)
    ids = [int(t) for t in prompt]
    if not ids:
        raise InvalidRequest("prompt is empty", param="prompt")
    return PromptInputs(token_ids=ids)
