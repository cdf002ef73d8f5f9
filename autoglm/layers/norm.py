"""RMS normalisation in the two flavours our models use."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """LLaMA/GLM RMSNorm: normalise in float32, cast back to the input dtype, then scale by `weight`.

    The cast-before-scale order is what transformers' Glm4RMSNorm does; it matters for bf16 parity.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., D]
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(self.variance_epsilon))  # in-place: fewer allocs
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GemmaRMSNorm(nn.Module):
    """Gemma RMSNorm: scale by (1 + weight), everything in float32, cast at the end."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))  # zero-centred: 0 is the identity scale
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., D]
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(self.eps))
        return torch.addcmul(h, h, self.weight.float()).type_as(x)  # h * (1 + w) in one op

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
