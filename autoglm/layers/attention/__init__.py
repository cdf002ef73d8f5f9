"""Attention over a block-paged KV cache: the module, the per-step context, and the backends behind one seam."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autoglm.layers.attention.base import AttentionBackend, AttentionContext, AttentionGeometry
from autoglm.layers.attention.cpu_fused import CpuFusedBackend
from autoglm.layers.attention.cuda_sdpa import CudaSdpaBackend
from autoglm.layers.attention.layer import Attention
from autoglm.layers.attention.torch_ref import TorchRefBackend

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionContext",
    "AttentionGeometry",
    "CpuFusedBackend",
    "CudaSdpaBackend",
    "TorchRefBackend",
    "make_backend",
]

BACKEND_KINDS = ("auto", "cuda_sdpa", "torch")


def make_backend(
    layers: Sequence[Attention],
    *,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    kind: str = "auto",
    batch_invariant: bool = False,
) -> AttentionBackend:
    """The backend for a model's attention `layers`, with its KV cache allocated. kind "auto": SDPA on CUDA
    (`cuda_sdpa.py`), the fused CPU backend when the loader bound the CPU kernels to the layers and the cache is on
    the CPU, else the torch reference; "cuda_sdpa" / "torch" force one (any device; tests run SDPA on the CPU).
    `batch_invariant`: every query attends alone by the decode arithmetic (`TorchRefBackend.per_query`; not
    implemented by the CUDA backend, which refuses it)."""
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown attention backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")
    if kind == "cuda_sdpa" or (kind == "auto" and torch.device(device).type == "cuda"):
        if batch_invariant:
            raise ValueError("deterministic (batch-invariant) attention is CPU-only for now; drop --deterministic")
        return CudaSdpaBackend(layers, num_blocks=num_blocks, block_size=block_size, dtype=dtype, device=device)
    kernels = layers[0].kernels if layers and kind == "auto" else None
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
