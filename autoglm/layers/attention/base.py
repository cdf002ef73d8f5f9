"""The attention backend seam (after mini-sglang's `attention/base.py`): the per-step `AttentionContext` and one
small ABC, one file per backend.

A step's batch is packed: all new tokens of all sequences are concatenated along one axis `T`. `AttentionContext`
describes how `T` splits into sequences and where each new token's K/V goes in the cache. It is the only metadata a
model's forward receives besides `input_ids`, `positions` and optional `inputs_embeds`; it is passed explicitly
(never a module global).

A backend owns the paged KV cache of every `Attention` layer of one model (by layer index: the order of the layers
it was built with; no cache is stored on the modules) and computes attention for them:
- `prepare(ctx)` once per step, before the forward: per-step metadata shared by all layers (host block tables,
  sequence spans), memoized in `ctx.memo`;
- `forward(q, k, v, layer, ctx)` per layer: write the step's K/V into the cache (`ctx.slot_mapping`), attend, and
  return [T, H, D]; `layer` supplies the geometry (`num_heads`, `num_kv_heads`, `head_dim`, `scale`,
  `sliding_window`) and `layer_index(layer)` its cache;
- `release()` drops the cache tensors.
Backends: `torch_ref.TorchRefBackend` (SDPA / gather + mask, any device and dtype) and `cpu_fused.CpuFusedBackend`
(the C++ decode attention of `CpuKernels`, float32 CPU). `make_backend` picks one from the kernels the loader bound
to the layers.

How to add a backend (e.g. CUDA): write `layers/attention/cuda.py` with a subclass of `TorchRefBackend` (keep its
cache layout and prefill) or of `AttentionBackend` (own layout: allocate in `__init__`, implement the three methods
above); override what the device does faster (decode with paged kernels, FlashAttention prefill); add one line to
`make_backend` choosing it (e.g. when the layers' device is CUDA). Nothing in the models or the runner changes; the
torch reference stays the oracle in its tests (same tokens, logits within the kernel's documented tolerance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from autoglm.kernels.base import Kernels, PagedDecodeKV


class AttentionGeometry(Protocol):
    """What a backend reads from an attention layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None  # a query at position p sees keys p - window < j <= p


@dataclass
class AttentionContext:
    """Per-step attention metadata.

    query_lens[i]   new tokens of sequence i in this step (sum == T)
    context_lens[i] tokens of sequence i in the cache after this step (already cached + new)
    slot_mapping    [T] int64, flat cache slot (block * block_size + offset) of each new token's K/V
    block_tables    [B, max_blocks] int64, the cache blocks of each sequence in order (padding: any valid block id)
    backend         the `AttentionBackend` that owns the KV cache and computes attention (needed with a cache)
    With `slot_mapping is None` no cache is used: each sequence attends causally over its new tokens only
    (context_lens must equal query_lens); this is the path for one-shot scoring without an engine.
    `memo` holds what every layer of one step would otherwise recompute (cache spans, masks; filled by
    `backend.prepare` and lazily); a context lives for one step, so it is never stale.
    """

    query_lens: list[int]
    context_lens: list[int]
    slot_mapping: Tensor | None = None
    block_tables: Tensor | None = None
    backend: AttentionBackend | None = field(default=None, repr=False, compare=False)
    is_decode: bool = field(init=False)
    memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.is_decode = all(q == 1 for q in self.query_lens)

    def host_tables(self) -> list[list[int]] | None:
        """The block tables as Python lists when they live on the CPU (no device sync), else None (memoized)."""
        if "tables" not in self.memo:
            bt = self.block_tables
            self.memo["tables"] = bt.tolist() if bt is not None and bt.device.type == "cpu" else None
        return self.memo["tables"]

    def cache_span(self, seq: int, lo: int, hi: int, block_size: int) -> tuple[int, Tensor | None]:
        """Where tokens lo..hi-1 of sequence `seq` live in the flat cache: (first slot, None) when their blocks are
        consecutive (the span is a view), else (offset into the gathered blocks, block ids [n] to gather)."""
        key = ("span", seq, lo, hi)
        hit = self.memo.get(key)
        if hit is None:
            assert self.block_tables is not None
            b0, b1 = lo // block_size, (hi - 1) // block_size + 1
            tables = self.host_tables()
            if tables is not None and all(tables[seq][j + 1] == tables[seq][j] + 1 for j in range(b0, b1 - 1)):
                hit = (tables[seq][b0] * block_size + lo % block_size, None)
            else:
                hit = (lo % block_size, self.block_tables[seq, b0:b1])
            self.memo[key] = hit
        return hit

    @classmethod
    def no_cache(cls, lengths: list[int]) -> AttentionContext:
        return cls(query_lens=list(lengths), context_lens=list(lengths))


class AttentionBackend(ABC):
    """Owns the KV cache of one model's attention layers and computes their attention (see the module docstring)."""

    @abstractmethod
    def prepare(self, ctx: AttentionContext) -> None:
        """Compute the step's shared metadata into `ctx.memo` (called once per step, before the forward)."""

    @abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, layer: AttentionGeometry, ctx: AttentionContext) -> Tensor:
        """q [T, H, D], k/v [T, KV, D] of `layer` -> [T, H, D]; stores k/v at `ctx.slot_mapping` first."""

    @abstractmethod
    def release(self) -> None:
        """Free the cache tensors (the backend is unusable for cached steps afterwards)."""

    def decode_kv(
        self, layers: Sequence[AttentionGeometry], ctx: AttentionContext, kernels: Kernels
    ) -> PagedDecodeKV | None:
        """The paged caches of `layers` for `kernels.decode_layers` (a stack of decoder layers in one kernel call)
        in a decode step, or None: the layers then run module by module through `forward`."""
        return None
