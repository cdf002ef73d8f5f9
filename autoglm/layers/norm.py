"""RMS normalisation in the two flavours our models use, and the sandwich-norm residual step.

Each norm computes with the `Kernels` object it holds (`use_kernels`, called by `autoglm.kernels.bind_kernels` when
a loader binds a model; default the torch reference). With the CPU kernels, float32 CPU inputs go through one C++ call
per norm (or per residual + norm pair) instead of ~7 small torch ops; results equal the torch composition up to float32
summation order. Binding after construction (not a constructor argument) keeps `RMSNorm(hidden, eps)` the
signature the models call, while the loader — which alone knows the device and the chosen kernels — decides once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autoglm.kernels.base import Kernels
from autoglm.kernels.reference import REFERENCE


class RMSNorm(nn.Module):
    """LLaMA/GLM RMSNorm: normalise in float32, cast back to the input dtype, then scale by `weight`.

    The cast-before-scale order is what transformers' Glm4RMSNorm does; it matters for bf16 parity.
    """

    offset = 0.0  # scale = offset + weight

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.variance_epsilon = eps
        self.kernels: Kernels = REFERENCE

    def use_kernels(self, kernels: Kernels) -> None:
        self.kernels = kernels

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., D] -> [..., D]
        return self.kernels.rms_norm(x, self.weight, self.variance_epsilon, 0.0)

    def decode_operands(self, kernels: Kernels) -> tuple[Tensor, float] | None:
        """(weight, eps) for `kernels.decode_layers` when this norm computes with `kernels`, else None."""
        return (self._parameters["weight"], self.variance_epsilon) if self.kernels is kernels else None

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GemmaRMSNorm(nn.Module):
    """Gemma RMSNorm: scale by (1 + weight), everything in float32, cast at the end."""

    offset = 1.0

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))  # zero-centred: 0 is the identity scale
        self.eps = eps
        self.kernels: Kernels = REFERENCE

    def use_kernels(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., D] -> [..., D]
        return self.kernels.rms_norm(x, self.weight, self.eps, 1.0)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


Norm = RMSNorm | GemmaRMSNorm


def add_norm(h: Tensor, y: Tensor, post: Norm, pre: Norm | None = None) -> tuple[Tensor, Tensor | None]:
    """The sandwich-norm residual step: h' = h + post(y), and pre(h') (the next sub-block's input) when `pre` is given.

    h, y: [T, D] -> (h' [T, D], pre(h') [T, D] or None). `post` and `pre` must be the same flavour with the same eps;
    the step runs with `post`'s kernels.
    """
    return post.kernels.add_rms_norm(h, y, post.weight, None if pre is None else pre.weight, post.eps, post.offset)
