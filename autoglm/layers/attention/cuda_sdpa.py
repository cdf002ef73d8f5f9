"""The CUDA attention backend: torch SDPA (flash / memory-efficient kernels on CUDA) over the paged KV cache, with a
decode path whose tensors' shapes depend only on the batch size and the block-table width (CUDA-graph safe).

Cache layout: the torch reference's, per layer K and V `[num_blocks, block_size, num_kv_heads, head_dim]` (so
`engine/memory.py` sizes it the same way and the runner's slot mapping / block tables are unchanged).

- prefill: per sequence, SDPA over [cached prefix + new tokens]; the causal mask is `causal_lower_right` (query j of
  S sees keys 0 .. C - S + j), which torch dispatches to the flash kernel on CUDA without materialising a mask; GQA
  by `enable_gqa`. A sliding window needs an explicit mask: K/V heads are then repeated so that the
  memory-efficient kernel (masks, no GQA) still applies instead of the math fallback.
- decode: one SDPA call for the whole batch: the blocks of `ctx.block_tables` ([B, W], padded with valid block ids)
  are gathered to [B, KV, W * block_size, D] and masked by the context lengths, which `prepare` puts on the device
  once per step (`ctx.memo["lens"]`). Grouped heads are queries: q [B, KV, G, D] against k [B, KV, L, D], so GQA
  needs no repeat. Nothing reads a Python-side length, so `engine/cuda_graphs.py` can capture it with static
  buffers (it supplies `memo["lens"]` itself).
The same code runs on the CPU (SDPA's CPU kernels): its tests drive it there against `TorchRefBackend`
(tests/unit/test_cuda_sdpa.py). Tolerance: float32 summation order only (greedy tokens equal, logits within 1e-5 of
max|logit| on the tiny models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from autoglm.layers.attention.base import AttentionBackend, AttentionContext, AttentionGeometry
from autoglm.layers.attention.torch_ref import prefill_segments, uncached_attention

LENS = "lens"  # ctx.memo key: [B] int64 context lengths on the cache's device (decode steps)


class CudaSdpaBackend(AttentionBackend):
    """Paged KV cache for `layers` (index i = layers[i]) and SDPA attention over it, on `device` (CUDA or CPU)."""

    graph_safe_decode = True  # decode reads only tensors (engine/cuda_graphs.py checks this)

    def __init__(
        self,
        layers: Sequence[AttentionGeometry],
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cuda",
    ) -> None:
        self.block_size = block_size
        self.device = torch.device(device)
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        self.k_caches: list[Tensor] = []
        self.v_caches: list[Tensor] = []
        for layer in layers:
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            self.k_caches.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.v_caches.append(torch.zeros(shape, dtype=dtype, device=self.device))

    def layer_index(self, layer: AttentionGeometry) -> int | None:
        return self._index.get(id(layer))

    def kv_cache(self, layer: AttentionGeometry) -> tuple[Tensor, Tensor]:
        i = self._index[id(layer)]
        return self.k_caches[i], self.v_caches[i]

    def release(self) -> None:
        self.k_caches, self.v_caches = [], []
        self._index = {}

    def prepare(self, ctx: AttentionContext) -> None:
        # one host->device copy of the lengths per step; a graph replay brings its own static buffer
        if ctx.is_decode and ctx.block_tables is not None and LENS not in ctx.memo:
            lens = torch.tensor(ctx.context_lens, dtype=torch.long)
            ctx.memo[LENS] = lens.to(self.device, non_blocking=True) if self.device.type == "cuda" else lens

    def forward(self, q: Tensor, k: Tensor, v: Tensor, layer: AttentionGeometry, ctx: AttentionContext) -> Tensor:
        # q: [T, H, D]; k, v: [T, KV, D] -> [T, H, D]
        i = self._index.get(id(layer))
        if ctx.slot_mapping is None or i is None:
            return uncached_attention(layer, q, k, v, ctx)
        if ctx.block_tables is None:
            raise ValueError("a cached attention step needs ctx.block_tables")
        kc, vc = self.k_caches[i], self.v_caches[i]
        kvh, d = layer.num_kv_heads, layer.head_dim
        kc.view(-1, kvh, d).index_copy_(0, ctx.slot_mapping, k.to(kc.dtype))
        vc.view(-1, kvh, d).index_copy_(0, ctx.slot_mapping, v.to(vc.dtype))
        if ctx.is_decode:
            return self.decode(q, kc, vc, layer, ctx)
        return self.prefill(q, k, v, kc, vc, layer, ctx)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext
    ) -> Tensor:
        """Each sequence's new tokens attend over its cached prefix plus themselves (causal, lower-right)."""
        segments = prefill_segments(q, k, v, kc, vc, ctx, self.block_size)  # the torch reference's paged gather
        outs = [sdpa_causal(layer, qi, ki, vi) for qi, ki, vi in segments]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def decode(self, q: Tensor, kc: Tensor, vc: Tensor, layer: AttentionGeometry, ctx: AttentionContext) -> Tensor:
        """q [B, H, D], one new token per sequence -> [B, H, D]; shapes from B and the block-table width only."""
        assert ctx.block_tables is not None
        tables = ctx.block_tables  # [B, W]
        bsz, width = tables.shape
        kvh, d, heads = layer.num_kv_heads, layer.head_dim, layer.num_heads
        n = width * self.block_size
        flat = tables.reshape(-1)
        kk = kc.index_select(0, flat).view(bsz, n, kvh, d).transpose(1, 2).to(q.dtype)  # [B, KV, L, D]
        vv = vc.index_select(0, flat).view(bsz, n, kvh, d).transpose(1, 2).to(q.dtype)
        mask = self._decode_mask(ctx, layer.sliding_window, n)  # [B, 1, 1, L] bool
        qg = q.reshape(bsz, kvh, heads // kvh, d)  # the G query heads of one KV head act as G queries
        out = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, scale=layer.scale)  # [B, KV, G, D]
        return out.reshape(bsz, heads, d)

    @staticmethod
    def _decode_mask(ctx: AttentionContext, window: int | None, n: int) -> Tensor:
        """Key j of sequence b is seen when j < lens[b] (and j >= lens[b] - window); built once per step."""
        key = ("cuda_sdpa_mask", window, n)
        mask = ctx.memo.get(key)
        if mask is None:
            lens = ctx.memo.get(LENS)
            if lens is None:
                raise ValueError("decode needs ctx.memo['lens'] (call backend.prepare(ctx) first)")
            idx = torch.arange(n, device=lens.device)[None, :]
            seen = idx < lens[:, None]
            if window is not None:
                seen &= idx >= lens[:, None] - window
            mask = ctx.memo[key] = seen[:, None, None, :]
        return mask


def sdpa_causal(layer: AttentionGeometry, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q [S, H, D], k/v [C, KV, D] with C >= S -> [S, H, D]; query j sees keys 0 .. C - S + j (and the window).
    4-D inputs: the fused CUDA kernels take no other rank."""
    s, c = q.shape[0], k.shape[0]
    window = layer.sliding_window
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, len, D]
    if window is None or window >= c:
        if s == c:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=layer.scale, enable_gqa=True)
        else:
            bias = causal_lower_right(s, c)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=layer.scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    mask = torch.ones(s, c, dtype=torch.bool, device=q.device).tril(c - s)
    mask &= ~torch.ones(s, c, dtype=torch.bool, device=q.device).tril(c - s - window)
    group = layer.num_heads // layer.num_kv_heads
    if group > 1:  # masks + GQA have no fused kernel: repeat the K/V heads (HF's repeat_kv order)
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=layer.scale)
    return out[0].transpose(0, 1)
