"""The fused CPU attention backend: decode attention by the C++ kernels of `CpuKernels`, the rest as the reference.

Decode reads K/V where they are, in the cache's dtype (float32/float16/bfloat16): one `attend_decode_paged` call for
the whole batch when the kernels have it, else one `attend_decode` per sequence over its cache span. With
`batch_invariant`, prefill tokens go through the same call, one row per query token with its own span (each
row's result depends only on its query and keys: scores per key, softmax and the value sum run in key order).
Prefill and any input the kernels do not take (non-float32 queries, other devices) use `TorchRefBackend`'s path.
Results equal the reference up to float32 summation order (tests/unit/test_decode_ops.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from autoglm.kernels.base import Kernels, PagedDecodeKV
from autoglm.layers.attention.base import AttentionContext, AttentionGeometry
from autoglm.layers.attention.torch_ref import TorchRefBackend

_FUSED_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CpuFusedBackend(TorchRefBackend):
    """`TorchRefBackend`'s cache and prefill, with decode attention run by `kernels` (a `CpuKernels`)."""

    def __init__(
        self,
        layers: Sequence[AttentionGeometry],
        kernels: Kernels,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch_invariant: bool = False,
    ) -> None:
        super().__init__(
            layers,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=dtype,
            device=device,
            batch_invariant=batch_invariant,
        )
        self.kernels = kernels

    def prepare(self, ctx: AttentionContext) -> None:
        super().prepare(ctx)
        if ctx.is_decode:
            ctx.memo["hi"] = torch.tensor(ctx.context_lens, dtype=torch.long)

    def decode_kv(
        self, layers: Sequence[AttentionGeometry], ctx: AttentionContext, kernels: Kernels
    ) -> PagedDecodeKV | None:
        """The caches of `layers` for `kernels.decode_layers` in a decode step, when `forward` would run this
        backend's `kernels.attend_decode_paged` on them (the same kernels, contiguous caches, one window); else
        None."""
        if kernels is not self.kernels or not ctx.is_decode or ctx.slot_mapping is None or ctx.block_tables is None:
            return None
        if not layers or len({layer.sliding_window for layer in layers}) != 1:
            return None
        ks, vs = [], []
        for layer in layers:
            i = self._index.get(id(layer))
            if i is None:
                return None
            kc = self.k_caches[i]
            if kc.dtype not in _FUSED_CACHE_DTYPES or not kc.is_contiguous() or not kc.is_cpu:
                return None
            ks.append(kc)
            vs.append(self.v_caches[i])
        lo, hi = self._spans(ctx, layers[0].sliding_window)
        return PagedDecodeKV(ks, vs, ctx.slot_mapping, ctx.block_tables, lo, hi)

    def decode(self, q: Tensor, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext) -> Tensor:
        # q: [B, H, D] -> [B, H, D]
        if q.dtype != torch.float32 or not q.is_cpu or kc.dtype not in _FUSED_CACHE_DTYPES:
            return super().decode(q, kc, vc, layer, ctx)
        if ctx.block_tables is not None:
            lo, hi = self._spans(ctx, layer.sliding_window)
            out = self.kernels.attend_decode_paged(q, kc, vc, ctx.block_tables, lo, hi, layer.scale)
            if out is not None:
                return out
        outs = []
        for i in range(len(ctx.query_lens)):
            k, v = self.cached_kv(kc, vc, layer, ctx, i)
            outs.append(self.kernels.attend_decode(q[i], k, v, layer.scale))  # [H, D]
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)

    def per_query(self, q: Tensor, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext) -> Tensor:
        # q: [T, H, D] -> [T, H, D]; one paged-kernel row per query token (see TorchRefBackend.per_query)
        if q.dtype != torch.float32 or not q.is_cpu or kc.dtype not in _FUSED_CACHE_DTYPES:
            return super().per_query(q, kc, vc, layer, ctx)
        if ctx.is_decode:  # one token per sequence: the rows are the sequences already
            tables, (lo, hi) = ctx.block_tables, self._spans(ctx, layer.sliding_window)
        else:
            tables, lo, hi = self._token_spans(ctx, layer.sliding_window)
        assert tables is not None
        out = self.kernels.attend_decode_paged(q, kc, vc, tables, lo, hi, layer.scale)
        return out if out is not None else super().per_query(q, kc, vc, layer, ctx)

    @staticmethod
    def _token_spans(ctx: AttentionContext, window: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per new token: its sequence's block table [T, max_blocks] and the positions it sees, lo [T], hi [T]."""
        key = ("token_spans", window)
        hit = ctx.memo.get(key)
        if hit is None:
            assert ctx.block_tables is not None
            counts = torch.tensor(ctx.query_lens, dtype=torch.long)
            tables = ctx.block_tables.repeat_interleave(counts, dim=0)
            spans = zip(ctx.query_lens, ctx.context_lens, strict=True)
            hi = torch.cat([torch.arange(cl - ql + 1, cl + 1) for ql, cl in spans])  # token j sees < cl - ql + j + 1
            lo = hi.sub(window).clamp_(min=0) if window is not None else torch.zeros_like(hi)
            hit = ctx.memo[key] = (tables, lo, hi)
        return hit

    @staticmethod
    def _spans(ctx: AttentionContext, window: int | None) -> tuple[Tensor, Tensor]:
        """Per sequence, the positions its newest token sees: lo [B], hi [B] int64 (memoized for the step)."""
        key = ("spans", window)
        hit = ctx.memo.get(key)
        if hit is None:
            hi = ctx.memo.get("hi")
            if hi is None:
                hi = ctx.memo["hi"] = torch.tensor(ctx.context_lens, dtype=torch.long)
            lo = hi.sub(window).clamp_(min=0) if window is not None else torch.zeros_like(hi)
            hit = ctx.memo[key] = (lo, hi)
        return hit
