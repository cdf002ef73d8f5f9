"""Attention over a block-paged KV cache: the module, the per-step context, and the backends behind one seam."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autoglm.layers.attention.base import AttentionBackend, AttentionContext, AttentionGeometry
from autoglm.layers.attention.cpu_fused import CpuFusedBackend
from autoglm.layers.attention.layer import Attention
from autoglm.layers.attention.torch_ref import TorchRefBackend

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionContext",
    "AttentionGeometry",
    "CpuFusedBackend",
    "TorchRefBackend",
    "make_backend",
]


def make_backend(
    layers: Sequence[Attention],
    *,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    batch_invariant: bool = False,
) -> AttentionBackend:
    """The backend for a model's attention `layers`, with its KV cache allocated: the fused CPU backend when the
    loader bound the CPU kernels to the layers and the cache is on the CPU, else the torch reference.
    `batch_invariant`: every query attends alone by the decode arithmetic (`TorchRefBackend.per_query`)."""
    kernels = layers[0].kernels if layers else None
    if kernels is not None and kernels.fused_decode_attention and torch.device(device).type == "cpu":
        return CpuFusedBackend(
            layers,
            kernels,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=dtype,
            device=device,
            batch_invariant=batch_invariant,
        )
    return TorchRefBackend(
        layers,
        num_blocks=num_blocks,
        block_size=block_size,
        dtype=dtype,
        device=device,
        batch_invariant=batch_invariant,
    )
