"""Encoder outputs kept by media content hash, bounded in bytes, least recently used out first.

A phone agent sends the same screenshot again (a retry, the previous step in the history); a preempted request
recomputes its prompt; an image whose slots are only partly covered by a prefix-cache hit needs its rows again.
In all these cases the vision tower would run again on identical pixels: this cache hands back the rows instead.
Keys are `EncoderInputs.content_hash` plus the modality (the hash covers the decoded content and its size).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor


class EncoderCache:
    """LRU map (modality, content hash) -> embeddings [n_slots, D]. `max_bytes=0` disables it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, str], Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, modality: str, content_hash: str) -> Tensor | None:
        emb = self._items.get((modality, content_hash))
        if emb is None:
            self.misses += 1
            return None
        self._items.move_to_end((modality, content_hash))
        self.hits += 1
        return emb

    def put(self, modality: str, content_hash: str, emb: Tensor) -> None:
        size = emb.numel() * emb.element_size()
        key = (modality, content_hash)
        if size > self.max_bytes or key in self._items:  # one item larger than the whole cache is not kept
            return
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = emb
        self.bytes += size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
