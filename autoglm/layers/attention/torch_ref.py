"""The torch reference attention backend: SDPA for prefill, gathered blocks + masks for batched decode.

Works on any device and dtype; the numerics the other backends are tested against. Cache layout (shared by the
backends built on this one): per layer, K and V `[num_blocks, block_size, num_kv_heads, head_dim]`.

`batch_invariant=True`: every query token, prefill or decode, attends alone over the cached keys it sees, in cache
order, by the decode arithmetic (`per_query`): SDPA's result for a query depends on the chunk it is in (key/query
blocking), the batched decode's on the batch's longest context (padding). A token's output is then a function of its
own query and keys only: the same whether its prefix was cached, its prompt chunked, or its step shared.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from autoglm.kernels.reference import REFERENCE
from autoglm.layers.attention.base import AttentionBackend, AttentionContext, AttentionGeometry


def causal_attention(layer: AttentionGeometry, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q: [S, H, D], k/v: [C, KV, D] with C >= S; query j sees keys 0 .. C - S + j (and the sliding window)."""
    s, c = q.shape[0], k.shape[0]
    window = layer.sliding_window
    # 4-D [1, H, S, D]: torch's CPU flash kernel takes only batched inputs; 3-D ones fall to the math path, which
    # materializes H x S x C scores (measured at 2,048 tokens: 8x slower, +570 MiB; BENCHMARKS.md "Prefill attention")
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if s == c and (window is None or window >= c):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=layer.scale, enable_gqa=True)
    else:
        mask = torch.ones(s, c, dtype=torch.bool, device=q.device).tril(c - s)
        if window is not None:
            mask &= ~torch.ones(s, c, dtype=torch.bool, device=q.device).tril(c - s - window)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=layer.scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def uncached_attention(layer: AttentionGeometry, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
    """Each sequence attends causally over its own new tokens (no cache): q [T, H, D], k/v [T, KV, D]."""
    outs = []
    start = 0
    for ql in ctx.query_lens:
        sl = slice(start, start + ql)
        outs.append(causal_attention(layer, q[sl], k[sl], v[sl]))
        start += ql
    return torch.cat(outs, 0)


def prefill_segments(
    q: Tensor, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, ctx: AttentionContext, block_size: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Per sequence of a cached prefill step (its K/V already written to kc/vc): (its new queries [ql, H, D], the
    keys and values they attend over [cl, KV, D]). Nothing cached before (ql == cl): the step's own K/V; else the
    sequence's first cl slots gathered from its cache blocks (`ctx.block_tables`), in q's dtype. Shared by the
    torch reference and the CUDA backend (same paged layout)."""
    assert ctx.block_tables is not None
    start = 0
    for i, (ql, cl) in enumerate(zip(ctx.query_lens, ctx.context_lens, strict=True)):
        new = slice(start, start + ql)
        start += ql
        if ql == cl:
            yield q[new], k[new], v[new]
            continue
        blocks = ctx.block_tables[i, : (cl + block_size - 1) // block_size]
        ki = kc.index_select(0, blocks).flatten(0, 1)[:cl].to(q.dtype)  # index_select: ~10x aten::index
        vi = vc.index_select(0, blocks).flatten(0, 1)[:cl].to(q.dtype)
        yield q[new], ki, vi


class TorchRefBackend(AttentionBackend):
    """Paged KV cache for `layers` (index i = layers[i]) and torch attention over it.

    num_blocks x block_size slots per layer, `dtype` on `device` (the decoder's). Built once by the runner (or a
    test driving a model by hand) and passed to every step as `AttentionContext.backend`.
    """

    def __init__(
        self,
        layers: Sequence[AttentionGeometry],
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch_invariant: bool = False,
    ) -> None:
        self.block_size = block_size
        self.batch_invariant = batch_invariant
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        self.k_caches: list[Tensor] = []
        self.v_caches: list[Tensor] = []
        for layer in layers:
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            self.k_caches.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v_caches.append(torch.zeros(shape, dtype=dtype, device=device))

    def layer_index(self, layer: AttentionGeometry) -> int | None:
        return self._index.get(id(layer))

    def kv_cache(self, layer: AttentionGeometry) -> tuple[Tensor, Tensor]:
        """The layer's K and V cache tensors [num_blocks, block_size, KV, D]."""
        i = self._index[id(layer)]
        return self.k_caches[i], self.v_caches[i]

    def release(self) -> None:
        self.k_caches, self.v_caches = [], []
        self._index = {}

    def prepare(self, ctx: AttentionContext) -> None:
        if ctx.block_tables is not None:
            ctx.host_tables()  # one host copy of the block tables for every layer's span lookups

    def forward(self, q: Tensor, k: Tensor, v: Tensor, layer: AttentionGeometry, ctx: AttentionContext) -> Tensor:
        # q: [T, H, D]; k, v: [T, KV, D] -> [T, H, D]
        i = self._index.get(id(layer))
        if ctx.slot_mapping is None or i is None:
            return uncached_attention(layer, q, k, v, ctx)
        kc, vc = self.k_caches[i], self.v_caches[i]
        assert ctx.block_tables is not None
        kvh, d = layer.num_kv_heads, layer.head_dim
        kc.view(-1, kvh, d).index_copy_(0, ctx.slot_mapping, k.to(kc.dtype))
        vc.view(-1, kvh, d).index_copy_(0, ctx.slot_mapping, v.to(vc.dtype))
        if self.batch_invariant:
            return self.per_query(q, kc, vc, layer, ctx)
        if ctx.is_decode:
            return self.decode(q, kc, vc, layer, ctx)
        return self.prefill(q, k, v, kc, vc, layer, ctx)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext
    ) -> Tensor:
        """Chunks with more than one new token: new tokens attend over the cached prefix plus themselves."""
        segments = prefill_segments(q, k, v, kc, vc, ctx, self.block_size)
        return torch.cat([causal_attention(layer, qi, ki, vi) for qi, ki, vi in segments], 0)

    def decode(self, q: Tensor, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext) -> Tensor:
        """q [B, H, D], one new token per sequence -> [B, H, D]."""
        if len(ctx.query_lens) == 1:  # the common single-stream case: no gather, no mask
            k, v = self.cached_kv(kc, vc, layer, ctx, 0)
            return REFERENCE.attend_decode(q[0], k, v, layer.scale)[None]
        return self._decode_batched(q, kc, vc, layer, ctx)

    def cached_kv(
        self, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext, seq: int
    ) -> tuple[Tensor, Tensor]:
        """The keys/values the newest token of `seq` sees ([n, KV, D]): the whole context, or the sliding window's
        tail; a view of the cache when its blocks are consecutive, else only the needed blocks are gathered."""
        return self.span_kv(kc, vc, layer, ctx, seq, ctx.context_lens[seq])

    def span_kv(
        self, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext, seq: int, hi: int
    ) -> tuple[Tensor, Tensor]:
        """The keys/values a query of `seq` that sees positions < hi attends over (`cached_kv` for any hi)."""
        lo = 0 if layer.sliding_window is None else max(0, hi - layer.sliding_window)
        start, blocks = ctx.cache_span(seq, lo, hi, self.block_size)
        n = hi - lo
        kvh, d = layer.num_kv_heads, layer.head_dim
        if blocks is None:
            return kc.view(-1, kvh, d)[start : start + n], vc.view(-1, kvh, d)[start : start + n]
        k = kc.index_select(0, blocks).flatten(0, 1)[start : start + n]
        v = vc.index_select(0, blocks).flatten(0, 1)[start : start + n]
        return k, v

    def per_query(self, q: Tensor, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext) -> Tensor:
        """q [T, H, D] (all new tokens, already in the cache) -> [T, H, D]: token j of sequence i (query_lens[i] new
        tokens, context_lens[i] after the step) sees positions < context_lens[i] - query_lens[i] + j + 1, attended
        one query at a time by the decode arithmetic (batch invariant; see the module docstring)."""
        outs = []
        t = 0
        for i, (ql, cl) in enumerate(zip(ctx.query_lens, ctx.context_lens, strict=True)):
            for j in range(ql):
                k, v = self.span_kv(kc, vc, layer, ctx, i, cl - ql + j + 1)
                outs.append(REFERENCE.attend_decode(q[t], k.contiguous(), v.contiguous(), layer.scale))
                t += 1
        return torch.stack(outs)

    def _decode_batched(
        self, q: Tensor, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext
    ) -> Tensor:
        # Several sequences: gather their blocks at once and mask the tails (mask built once per step).
        assert ctx.block_tables is not None
        bsz, kvh, d, window = len(ctx.query_lens), layer.num_kv_heads, layer.head_dim, layer.sliding_window
        max_ctx = max(ctx.context_lens)
        nb = (max_ctx + self.block_size - 1) // self.block_size
        flat = ctx.block_tables[:, :nb].reshape(-1)
        k = kc.index_select(0, flat).view(bsz, -1, kvh, d)[:, :max_ctx].to(q.dtype)  # [B, L, KV, D]
        v = vc.index_select(0, flat).view(bsz, -1, kvh, d)[:, :max_ctx].to(q.dtype)
        key = ("mask", window, q.dtype)
        mask = ctx.memo.get(key)
        if mask is None:
            lens = torch.tensor(ctx.context_lens, device=q.device)
            idx = torch.arange(max_ctx, device=q.device)[None, :]
            seen = idx < lens[:, None]
            if window is not None:
                seen &= idx >= lens[:, None] - window
            mask = ctx.memo[key] = torch.zeros(seen.shape, dtype=torch.float32, device=q.device).masked_fill_(
                ~seen, float("-inf")
            )[:, None, None, :]  # [B, 1, 1, L] additive
        qg = q.view(bsz, kvh, layer.num_heads // kvh, d)  # [B, KV, G, D]
        s = torch.matmul(qg, k.permute(0, 2, 3, 1)).float().mul_(layer.scale).add_(mask)  # [B, KV, G, L]
        p = torch.softmax(s, dim=-1).to(q.dtype)
        o = torch.matmul(p, v.transpose(1, 2))  # [B, KV, G, D]
        return o.reshape(bsz, layer.num_heads, d)
