"""The one interface every media encoder (vision now, speech later) sits behind.

The decoder runs text-only when no encoder for a modality is loaded or it is disabled; each encoder may live on its
own device. The engine calls `preprocess` when a request arrives (cheap, CPU, validates and caps sizes), uses
`n_slots` to expand the placeholder, and calls `encode` once per media item when its slots are prefilled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class EncoderInputs:
    """Preprocessed media ready for `encode`. `data` holds tensors (e.g. pixel patches); `grid` the layout
    the decoder needs for positions (e.g. (t, h, w) patches for images); `content_hash` identifies the media content
    (for encoder caching and prefix caching)."""

    modality: str
    data: dict[str, Tensor]
    grid: tuple[int, ...]
    n_slots: int
    content_hash: str
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Encoder(Protocol):
    """modality: "image" | "audio"; placeholder: the string a chat template emits for one media item
    (e.g. "<|image|>"); placeholder_id: the token id that each of the item's slots carries in the prompt."""

    modality: str
    placeholder: str
    placeholder_id: int
    device: torch.device

    def preprocess(self, media: Any) -> EncoderInputs: ...

    def encode(self, inputs: EncoderInputs) -> Tensor:
        """-> [inputs.n_slots, decoder hidden size], in the decoder's dtype, on the encoder's device."""
        ...
