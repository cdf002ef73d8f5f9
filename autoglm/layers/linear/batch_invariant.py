"""Batch invariance for linear layers: a row's result must not depend on how many rows share the call.

GEMM libraries pick kernels and blockings by M (oneDNN/MKL on CPU: M = 1 and 2 take other paths than M >= 8 in
float32; bfloat16 M = 1 differs from M >= 2), so the same token gives other bits in a 1-row decode step, a 512-row
prefill and a mixed batch. Fixed tiles remove the M dependence: every call computes exactly `TILE_ROWS` rows (the
last tile zero-padded), so a row's value depends only on its own input (checked in
tests/engine/test_determinism_kernels.py, also across positions inside a tile). GGUF layers with a fused kernel do
not need tiles: the int8 GEMV computes each row alone at every M (`GGUFLinear.set_batch_invariant`).

`set_batch_invariant(module)` switches every layer of a model that supports it (duck-typed: no import of the layer
classes, so this file sits below them); the engine calls it once for `EngineConfig.deterministic`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

TILE_ROWS = 32  # rows per GEMM call in batch-invariant mode (the same shape every call)


def fixed_tiles(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn over x [..., K] in row tiles of exactly TILE_ROWS (zero-padded) -> [..., N]; fn maps [TILE_ROWS, K] rows."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    pad = (-m) % TILE_ROWS
    if pad or m == 0:
        x2 = torch.cat([x2, x2.new_zeros(pad or TILE_ROWS, x2.shape[1])])
    y = torch.cat([fn(x2[i : i + TILE_ROWS]) for i in range(0, x2.shape[0], TILE_ROWS)])[:m]
    return y.reshape(*lead, y.shape[-1])


def set_batch_invariant(model: nn.Module, enabled: bool = True) -> int:
    """Switch every submodule with a `set_batch_invariant(enabled)` method; returns how many were switched."""
    n = 0
    for mod in model.modules():
        fn = getattr(mod, "set_batch_invariant", None)
        if callable(fn):
            fn(enabled)
            n += 1
    return n
