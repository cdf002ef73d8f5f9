"""Attention over a block-paged KV cache for a packed batch of sequences.

A step's batch is packed: all new tokens of all sequences are concatenated along one axis `T`. `AttentionContext`
describes how `T` splits into sequences and where each new token's K/V goes in the cache. It is the only metadata a
model's forward receives besides `input_ids`, `positions` and optional `inputs_embeds`; it is passed explicitly
(never a module global).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.layers.norm import fused_ops

_FUSED_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class AttentionContext:
    """Per-step attention metadata.

    query_lens[i]   new tokens of sequence i in this step (sum == T)
    context_lens[i] tokens of sequence i in the cache after this step (already cached + new)
    slot_mapping    [T] int64, flat cache slot (block * block_size + offset) of each new token's K/V
    block_tables    [B, max_blocks] int64, the cache blocks of each sequence in order (padding: any valid block id)
    With `slot_mapping is None` no cache is used: each sequence attends causally over its new tokens only
    (context_lens must equal query_lens); this is the path for one-shot scoring without an engine.
    `memo` holds what every layer of one step would otherwise recompute (cache spans, masks); a context lives for
    one step, so it is never stale.
    """

    query_lens: list[int]
    context_lens: list[int]
    slot_mapping: Tensor | None = None
    block_tables: Tensor | None = None
    is_decode: bool = field(init=False)
    memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.is_decode = all(q == 1 for q in self.query_lens)

    def cache_span(self, seq: int, lo: int, hi: int, block_size: int) -> tuple[int, Tensor | None]:
        """Where tokens lo..hi-1 of sequence `seq` live in the flat cache: (first slot, None) when their blocks are
        consecutive (the span is a view), else (offset into the gathered blocks, block ids [n] to gather)."""
        key = ("span", seq, lo, hi)
        hit = self.memo.get(key)
        if hit is None:
            assert self.block_tables is not None
            b0, b1 = lo // block_size, (hi - 1) // block_size + 1
            tables = self.memo.get("tables")
            if tables is None and self.block_tables.device.type == "cpu":
                tables = self.memo["tables"] = self.block_tables.tolist()  # host copy: no device sync on CPU
            if tables is not None and all(tables[seq][j + 1] == tables[seq][j] + 1 for j in range(b0, b1 - 1)):
                hit = (tables[seq][b0] * block_size + lo % block_size, None)
            else:
                hit = (lo % block_size, self.block_tables[seq, b0:b1])
            self.memo[key] = hit
        return hit

    @classmethod
    def no_cache(cls, lengths: list[int]) -> AttentionContext:
        return cls(query_lens=list(lengths), context_lens=list(lengths))


class Attention(nn.Module):
    """Scaled dot-product attention with GQA; owns this layer's K/V cache (set by the runner, not loaded).

    k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim] or None.
    """

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        self.sliding_window = sliding_window  # a query at position p sees keys p - window < j <= p
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        # q: [T, H, D]; k, v: [T, KV, D] -> [T, H, D]
        if ctx.slot_mapping is None or self.k_cache is None:
            return self._uncached(q, k, v, ctx)
        kc, vc = self.k_cache, self.v_cache
        assert vc is not None and ctx.block_tables is not None
        block_size = kc.shape[1]
        kc.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, k.to(kc.dtype))
        vc.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, v.to(vc.dtype))
        if ctx.is_decode:
            return self._decode(q, ctx, block_size)
        outs = []
        start = 0
        for i, (ql, cl) in enumerate(zip(ctx.query_lens, ctx.context_lens, strict=True)):
            qi = q[start : start + ql]
            start += ql
            if ql == cl:  # nothing cached before: attend over the new tokens directly
                ki, vi = k[start - ql : start], v[start - ql : start]
            else:
                nb = (cl + block_size - 1) // block_size
                blocks = ctx.block_tables[i, :nb]
                ki = kc.index_select(0, blocks).flatten(0, 1)[:cl].to(q.dtype)  # index_select: ~10x aten::index
                vi = vc.index_select(0, blocks).flatten(0, 1)[:cl].to(q.dtype)
            outs.append(self._causal(qi, ki, vi))
        return torch.cat(outs, 0)

    def _uncached(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        outs = []
        start = 0
        for ql in ctx.query_lens:
            sl = slice(start, start + ql)
            outs.append(self._causal(q[sl], k[sl], v[sl]))
            start += ql
        return torch.cat(outs, 0)

    def _causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: [S, H, D], k/v: [C, KV, D] with C >= S; query j sees keys 0 .. C - S + j
        s, c = q.shape[0], k.shape[0]
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if s == c and (self.sliding_window is None or self.sliding_window >= c):
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            mask = torch.ones(s, c, dtype=torch.bool, device=q.device).tril(c - s)
            if self.sliding_window is not None:
                mask &= ~torch.ones(s, c, dtype=torch.bool, device=q.device).tril(c - s - self.sliding_window)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out.transpose(0, 1)

    def _decode(self, q: Tensor, ctx: AttentionContext, block_size: int) -> Tensor:
        # q: [B, H, D], one new token per sequence -> [B, H, D]
        assert self.k_cache is not None
        f = fused_ops(q, q)
        if f is not None and self.k_cache.dtype in _FUSED_CACHE_DTYPES:
            paged = getattr(f, "attend_decode_paged", None)
            if paged is not None and ctx.block_tables is not None and self.k_cache.is_contiguous():
                # one call for the whole batch, reading each sequence's blocks where they are (no gather)
                lo, hi = self._spans(ctx)
                return paged(q.contiguous(), self.k_cache, self.v_cache, ctx.block_tables, lo, hi, self.scale)
            # fused kernel per sequence over its cache span: K/V read once, in the cache's dtype (no gather, no mask)
            outs = []
            for i in range(len(ctx.query_lens)):
                k, v = self._cached_kv(ctx, i, block_size)
                outs.append(f.attend_decode(q[i].contiguous(), k, v, self.scale))  # [H, D]
            return outs[0][None] if len(outs) == 1 else torch.stack(outs)
        if len(ctx.query_lens) == 1:  # the common single-stream case: no gather, no mask
            k, v = self._cached_kv(ctx, 0, block_size)
            return self._attend_last(q, k, v)
        return self._decode_batched(q, ctx, block_size)

    def _spans(self, ctx: AttentionContext) -> tuple[Tensor, Tensor]:
        """Per sequence, the positions its newest token sees: lo [B], hi [B] int64 (memoized for the step)."""
        key = ("spans", self.sliding_window)
        hit = ctx.memo.get(key)
        if hit is None:
            hi = torch.tensor(ctx.context_lens, dtype=torch.long)
            lo = hi.sub(self.sliding_window).clamp_(min=0) if self.sliding_window is not None else torch.zeros_like(hi)
            hit = ctx.memo[key] = (lo, hi)
        return hit

    def _cached_kv(self, ctx: AttentionContext, seq: int, block_size: int) -> tuple[Tensor, Tensor]:
        """The keys/values the newest token of `seq` sees ([n, KV, D]): the whole context, or the sliding window's
        tail; a view of the cache when its blocks are consecutive, else only the needed blocks are gathered."""
        assert self.k_cache is not None and self.v_cache is not None
        hi = ctx.context_lens[seq]
        lo = 0 if self.sliding_window is None else max(0, hi - self.sliding_window)
        start, blocks = ctx.cache_span(seq, lo, hi, block_size)
        n = hi - lo
        if blocks is None:
            k = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)[start : start + n]
            v = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)[start : start + n]
        else:
            k = self.k_cache.index_select(0, blocks).flatten(0, 1)[start : start + n]
            v = self.v_cache.index_select(0, blocks).flatten(0, 1)[start : start + n]
        return k, v

    def _attend_last(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: [1, H, D]; k, v: [n, KV, D], every key visible -> [1, H, D]. Plain matmuls: CPU SDPA's flash kernel
        # costs ~2.5x more for a single query. Head h uses KV head h // (H / KV), as in HF's repeat_kv.
        kvh = self.num_kv_heads
        qg = q.view(kvh, self.num_heads // kvh, self.head_dim)  # [KV, G, D]
        s = torch.matmul(qg, k.to(q.dtype).permute(1, 2, 0))  # [KV, G, n]
        p = torch.softmax(s.mul_(self.scale), dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(p, v.to(q.dtype).transpose(0, 1))  # [KV, G, D]
        return o.view(1, self.num_heads, self.head_dim)

    def _decode_batched(self, q: Tensor, ctx: AttentionContext, block_size: int) -> Tensor:
        # Several sequences: gather their blocks at once and mask the tails (mask built once per step).
        assert self.k_cache is not None and self.v_cache is not None and ctx.block_tables is not None
        bsz, kvh = len(ctx.query_lens), self.num_kv_heads
        max_ctx = max(ctx.context_lens)
        nb = (max_ctx + block_size - 1) // block_size
        tables = ctx.block_tables[:, :nb]
        flat = tables.reshape(-1)
        k = self.k_cache.index_select(0, flat).view(bsz, -1, kvh, self.head_dim)[:, :max_ctx].to(q.dtype)  # [B,L,KV,D]
        v = self.v_cache.index_select(0, flat).view(bsz, -1, kvh, self.head_dim)[:, :max_ctx].to(q.dtype)
        key = ("mask", self.sliding_window, q.dtype)
        mask = ctx.memo.get(key)
        if mask is None:
            lens = torch.tensor(ctx.context_lens, device=q.device)
            idx = torch.arange(max_ctx, device=q.device)[None, :]
            seen = idx < lens[:, None]
            if self.sliding_window is not None:
                seen &= idx >= lens[:, None] - self.sliding_window
            mask = ctx.memo[key] = torch.zeros(seen.shape, dtype=torch.float32, device=q.device).masked_fill_(
                ~seen, float("-inf")
            )[:, None, None, :]  # [B, 1, 1, L] additive
        qg = q.view(bsz, kvh, self.num_heads // kvh, self.head_dim)  # [B, KV, G, D]
        s = torch.matmul(qg, k.permute(0, 2, 3, 1)).float().mul_(self.scale).add_(mask)  # [B, KV, G, L]
        p = torch.softmax(s, dim=-1).to(q.dtype)
        o = torch.matmul(p, v.transpose(1, 2))  # [B, KV, G, D]
        return o.reshape(bsz, self.num_heads, self.head_dim)
