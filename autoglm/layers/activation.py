"""Gated activations: over a fused [gate | up] projection, or over two separate ones."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.errors import ConfigError
from autoglm.kernels.base import Kernels
from autoglm.kernels.reference import REFERENCE


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """HF `hidden_act` name -> function; unknown names fail naming the value and the supported ones."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


class GatedActivation(nn.Module):
    """act(gate) * up, where the input is the fused projection [..., 2 * I] = [gate | up] (GLM's gate_up_proj)."""

    def __init__(self, hidden_act: str = "silu") -> None:
        super().__init__()
        self.hidden_act = hidden_act
        self.fn = get_activation(hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., 2I] -> [..., I]
        gate, up = x.chunk(2, dim=-1)
        return up * self.fn(gate)

    def extra_repr(self) -> str:
        return self.hidden_act


class GatedProduct(nn.Module):
    """act(gate) * up from two projections; silu runs through the bound kernels (`bind_kernels`: one pass over the
    data on CPU instead of three torch ops), any other activation in torch."""

    def __init__(self, hidden_act: str = "silu") -> None:
        super().__init__()
        self.hidden_act = hidden_act
        self.fn = get_activation(hidden_act)
        self.kernels: Kernels = REFERENCE

    def use_kernels(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        # gate, up: fresh projection outputs of the same shape (silu_mul may write into gate)
        if self.fn is F.silu:
            return self.kernels.silu_mul(gate, up)
        return self.fn(gate) * up

    def extra_repr(self) -> str:
        return self.hidden_act
