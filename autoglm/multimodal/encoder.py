"""The one interface every media encoder (vision now, speech later) sits behind.

The decoder runs text-only when no encoder is loaded for a content part's type (or it is disabled); each encoder may
live on its own device. Prompt assembly (`engine/prompt.py`) routes each content part to the encoder whose
`part_types` contains the part's `type`, calls `load` then `preprocess` when the request arrives (cheap, CPU,
validates and caps sizes), and expands that encoder's placeholder to `EncoderInputs.n_slots` slots laid out as
`EncoderInputs.slot_grid` (decoder-slot units, so a decoder's positions need no knowledge of the encoder). The runner
calls `encode` once per media item when its slots are prefilled. Health checks encode `sample()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from autoglm.multimodal.media import MediaPolicy


@dataclass
class EncoderInputs:
    """Preprocessed media ready for `encode`.

    data: tensors (e.g. pixel patches); grid: the encoder's own layout of them (e.g. (t, h, w) patches);
    n_slots: decoder slots the item fills; slot_grid: those slots' layout in decoder-slot units ((t, h, w) after a
    spatial merge; () for media without a spatial layout); content_hash: identifies the content (encoder and prefix
    caching)."""

    modality: str
    data: dict[str, Tensor]
    grid: tuple[int, ...]
    n_slots: int
    content_hash: str
    meta: dict[str, Any] = field(default_factory=dict)
    slot_grid: tuple[int, ...] = ()


@runtime_checkable
class Encoder(Protocol):
    """modality: a label ("image", "audio", ...) for logs, limits and cache keys; module_name: the `ModuleInfo.name`
    health reports it under; part_types: the content-part `type`s it accepts (e.g. "image_url"); placeholder: the
    string a chat template emits for one media item (e.g. "<|image|>"); placeholder_id: the token id that each of
    the item's slots carries in the prompt."""

    modality: str
    module_name: str
    part_types: tuple[str, ...]
    placeholder: str
    placeholder_id: int

    @property
    def device(self) -> torch.device: ...

    def load(self, part: Mapping[str, Any], policy: MediaPolicy | None) -> Any:
        """The media a content part carries, fetched and decoded under `policy` (None: in-memory or inline data
        only); None when the part holds no media. Raises MediaError for unusable media."""
        ...

    def preprocess(self, media: Any) -> EncoderInputs: ...

    def encode(self, inputs: EncoderInputs) -> Tensor:
        """-> [inputs.n_slots, decoder hidden size], in the decoder's dtype, on the encoder's device."""
        ...

    def sample(self) -> Any:
        """A tiny valid media item for health checks (`encode(preprocess(sample()))` must succeed)."""
        ...
