"""The `Attention` module every decoder layer holds: geometry only; the step's backend owns the cache and the math."""

from __future__ import annotations

from torch import Tensor, nn

from autoglm.kernels.base import Kernels
from autoglm.kernels.reference import REFERENCE
from autoglm.layers.attention.base import AttentionContext
from autoglm.layers.attention.torch_ref import uncached_attention


class Attention(nn.Module):
    """Scaled dot-product attention with GQA over `ctx.backend`'s paged KV cache (`layers/attention/base.py`).

    Holds no cache. `kernels` (bound by the loader, `autoglm.kernels.bind_kernels`) records which kernels the
    model runs with, so that `make_backend` builds the matching backend for it.
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
        self.kernels: Kernels = REFERENCE

    def use_kernels(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        # q: [T, H, D]; k, v: [T, KV, D] -> [T, H, D]
        if ctx.backend is not None:
            return ctx.backend.forward(q, k, v, self, ctx)
        if ctx.slot_mapping is not None:
            raise ValueError("an AttentionContext with a slot_mapping needs the backend that owns the KV cache")
        return uncached_attention(self, q, k, v, ctx)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"sliding_window={self.sliding_window}"
        )
