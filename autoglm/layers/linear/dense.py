"""The dense linear layer every model uses, so quantized formats can replace it instance by instance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.layers.linear.batch_invariant import fixed_tiles


class Linear(nn.Module):
    """y = x @ weight.T + bias, like `nn.Linear`, with `weight` [out_features, in_features].

    Quantized formats (GGUF blocks, int8, int4) are drop-in replacements: same `in_features`/`out_features`
    attributes and the same forward signature, so a model never knows which one it holds.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.batch_invariant = False  # fixed GEMM tiles (batch_invariant.py): rows independent of each other

    def set_batch_invariant(self, enabled: bool) -> None:
        self.batch_invariant = enabled

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        if self.batch_invariant:
            return fixed_tiles(lambda t: F.linear(t, self.weight, self.bias), x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
