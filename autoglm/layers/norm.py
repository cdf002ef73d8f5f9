"""RMS normalisation in the two flavours our models use, and the sandwich-norm residual step.

Per-token path: while fused CPU kernels are installed (`set_fused_ops`, done by `autoglm.quant.gguf_kernels.install`)
float32 CPU inputs go through one C++ call per norm (or per residual + norm pair) instead of ~7 small torch ops; the
results equal the torch composition up to float32 summation order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# the extension module with rms_norm / add_rms_norm / norm_rope, or None (plain torch ops)
_FUSED: Any = None


def set_fused_ops(ops: Any) -> None:
    """Install (or with None remove) the fused float32 CPU kernels the norms and rotary layers use."""
    global _FUSED
    _FUSED = ops


def fused_ops(x: Tensor, weight: Tensor) -> Any:
    """The fused kernels when they apply to `x` and `weight` (float32, CPU), else None."""
    f = _FUSED
    if f is not None and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.is_cpu and weight.is_cpu:
        return f
    return None


class RMSNorm(nn.Module):
    """LLaMA/GLM RMSNorm: normalise in float32, cast back to the input dtype, then scale by `weight`.

    The cast-before-scale order is what transformers' Glm4RMSNorm does; it matters for bf16 parity.
    """

    offset = 0.0  # scale = offset + weight

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.variance_epsilon = eps

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., D]
        f = fused_ops(x, self.weight)
        if f is not None:
            return f.rms_norm(x.contiguous(), self.weight, self.variance_epsilon, 0.0)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(self.variance_epsilon))  # in-place: fewer allocs
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GemmaRMSNorm(nn.Module):
    """Gemma RMSNorm: scale by (1 + weight), everything in float32, cast at the end."""

    offset = 1.0

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))  # zero-centred: 0 is the identity scale
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., D]
        f = fused_ops(x, self.weight)
        if f is not None:
            return f.rms_norm(x.contiguous(), self.weight, self.eps, 1.0)
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(self.eps))
        return torch.addcmul(h, h, self.weight.float()).type_as(x)  # h * (1 + w) in one op

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


Norm = RMSNorm | GemmaRMSNorm


def add_norm(h: Tensor, y: Tensor, post: Norm, pre: Norm | None = None) -> tuple[Tensor, Tensor | None]:
    """The sandwich-norm residual step: h' = h + post(y), and pre(h') (the next sub-block's input) when `pre` is given.

    h, y: [T, D] -> (h' [T, D], pre(h') [T, D] or None). `post` and `pre` must be the same flavour with the same eps.
    """
    f = fused_ops(h, post.weight)
    if f is not None and y.dtype == torch.float32 and (pre is None or pre.weight.dtype == torch.float32):
        return f.add_rms_norm(
            h.contiguous(), y.contiguous(), post.weight, None if pre is None else pre.weight, post.eps, post.offset
        )
    h = h + post(y)
    return h, None if pre is None else pre(h)
