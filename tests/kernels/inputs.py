"""Edge-case GEMV inputs shared by the per-ISA kernel tests: random weights quantized with `gguf.quants`, and
activations with the blocks that stress int8 activation quantization."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import Tensor

from autoglm.gguf.quants import dequantize, quantize


def quantized_weights(
    qtype: GGMLQuantizationType, rows: int, cols: int, seed: int, large_row: int = 1
) -> tuple[Tensor, Tensor]:
    """(raw blocks, their float values): N(0, 0.05) with a zero-scale block in row 0 and a 40x row `large_row`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :16] = 0.0  # zero scales
    w[large_row] *= 40.0  # large scales
    return quantize_rows(w, qtype)


def quantize_rows(w: Tensor, qtype: GGMLQuantizationType) -> tuple[Tensor, Tensor]:
    raw = torch.from_numpy(quantize(w, qtype))
    return raw, dequantize(raw, qtype, tuple(w.shape))


def activations(m: int, cols: int, seed: int) -> Tensor:
    """N(0, 1) rows; row 0 starts with an all-zero block, row 1 has a 1e4x block next to ordinary ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, cols, generator=g)
    x[0, :32] = 0.0  # an all-zero activation block
    if m > 1:
        x[1, 32:64] *= 1e4  # a large block next to ordinary ones
    return x
