"""Rotary position embeddings: 1-D, partial, interleaved or half-split, and GLM-4.1V's 3-row M-RoPE.

Angles are computed on the fly from the positions (float32, like transformers), so there is no position-length
cache to size and M-RoPE positions past `max_position_embeddings` still work.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor, nn

from autoglm.errors import ConfigError
from autoglm.kernels.base import Kernels
from autoglm.kernels.reference import REFERENCE
from autoglm.layers.norm import Norm


def rotate_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-J / GLM style: dims (0,1), (2,3), ... are rotated as pairs. x: [..., R]; cos/sin: [..., R/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rotate_half_split(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-NeoX / LLaMA style: dim i is paired with dim i + R/2. x: [..., R]; cos/sin: [..., R/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RopeTables(NamedTuple):
    """Whole-head rotation tables for one step, built once and shared by every layer with the same rope.

    Any style (interleaved or half-split, partial or full) is out = x * cos + x[..., perm] * sin: `perm` names each
    dim's rotation partner, `sin` carries the sign, and dims past the rotary part have cos 1, sin 0 (left as is).
    """

    cos: Tensor  # [T, 1, D]
    sin: Tensor  # [T, 1, D]
    perm: Tensor  # [D] int64
    rotary_dim: int = 0  # R: dims [R, D) are passed through (0: the whole head)
    interleaved: bool = False
    kernels: Kernels = REFERENCE  # those of the rope module that built the tables (`apply_rope` without a norm)


@lru_cache(maxsize=64)
def _partner(rotary_dim: int, head_dim: int, interleaved: bool, device: torch.device) -> Tensor:
    j = torch.arange(head_dim, device=device)
    r = torch.arange(rotary_dim, device=device)
    j[:rotary_dim] = r ^ 1 if interleaved else (r + rotary_dim // 2) % rotary_dim
    return j


def rope_tables(cos: Tensor, sin: Tensor, head_dim: int, interleaved: bool, kernels: Kernels = REFERENCE) -> RopeTables:
    """cos, sin [T, R/2] (frequency i rotates pair i) -> `RopeTables` over heads of `head_dim` dims."""
    t, half = cos.shape
    if interleaved:  # pairs (2i, 2i+1)
        c = cos.repeat_interleave(2, dim=-1)  # [T, R]
        s = torch.stack((-sin, sin), dim=-1).flatten(-2)
    else:  # pairs (i, i + R/2)
        c = torch.cat((cos, cos), dim=-1)
        s = torch.cat((-sin, sin), dim=-1)
    if head_dim > 2 * half:
        rest = head_dim - 2 * half
        c = torch.cat((c, c.new_ones(t, rest)), dim=-1)
        s = torch.cat((s, s.new_zeros(t, rest)), dim=-1)
    perm = _partner(2 * half, head_dim, interleaved, cos.device)
    return RopeTables(c[:, None, :], s[:, None, :], perm, 2 * half, interleaved, kernels)


def apply_rope(x: Tensor, tables: RopeTables, norm: Norm | None = None) -> Tensor:
    """x [T, H, D] -> norm(x) (per head, if given: Gemma's q/k norms) rotated by `tables`.

    Runs with the norm's kernels when a norm is given, else the tables' (one fused call on float32 CPU with the CPU
    kernels, else three torch ops whatever the style).
    """
    r = tables.rotary_dim or x.shape[-1]
    if norm is None:
        return tables.kernels.norm_rope(x, None, 0.0, 0.0, tables.cos, tables.sin, tables.perm, r, tables.interleaved)
    return norm.kernels.norm_rope(
        x, norm.weight, norm.eps, norm.offset, tables.cos, tables.sin, tables.perm, r, tables.interleaved
    )


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the first `rotary_dim` dims of each head of q and k.

    positions: [T] (1-D), or [3, T] with `mrope_section` (M-RoPE: frequency j takes its position from row
    r(j), where the frequency axis is split into consecutive chunks of `mrope_section` sizes -> rows 0, 1, 2).
    """

    def __init__(
        self,
        rotary_dim: int,
        base: float,
        *,
        interleaved: bool,
        mrope_section: list[int] | None = None,
        scaling: float = 1.0,
    ) -> None:
        super().__init__()
        if rotary_dim % 2:
            raise ConfigError(f"rotary dimension must be even, got {rotary_dim}")
        if mrope_section is not None and 2 * sum(mrope_section) != rotary_dim:
            raise ConfigError(
                f"mrope_section {mrope_section} must sum to rotary_dim / 2 = {rotary_dim // 2}", param="mrope_section"
            )
        self.rotary_dim = rotary_dim
        self.base = base
        self.interleaved = interleaved
        self.mrope_section = list(mrope_section) if mrope_section is not None else None
        self.scaling = scaling  # position scaling factor (linear rope scaling); 1.0 for GLM
        # Derived, never loaded: kept out of the state dict (and off `meta`) in a per-device cache.
        self._tables: dict[torch.device, tuple[Tensor, Tensor | None]] = {}
        self.kernels: Kernels = REFERENCE  # handed to the tables it builds (`apply_rope`)

    def use_kernels(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """-> (inv_freq [R/2] float32, M-RoPE row of each frequency [R/2] or None) on `device`."""
        if device not in self._tables:
            exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).float() / self.rotary_dim
            inv_freq = 1.0 / (self.base**exps)
            rows = None
            if self.mrope_section is not None:
                rows = torch.tensor(
                    [i % 3 for i, n in enumerate(self.mrope_section) for _ in range(n)], dtype=torch.long, device=device
                )
            self._tables[device] = (inv_freq, rows)
        return self._tables[device]

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [T] or [3, T] -> cos, sin [T, R/2] in `dtype` (rounded like transformers does)."""
        inv_freq, rows = self._table(positions.device)
        pos = positions.float()
        if self.scaling != 1.0:
            pos = pos / self.scaling
        if rows is None:
            if pos.dim() != 1:
                raise ValueError(f"expected 1-D positions [T], got shape {tuple(positions.shape)}")
            freqs = pos[:, None] * inv_freq  # [T, R/2]
        else:
            if pos.dim() == 1:  # text-only: the same position on all three rows
                pos = pos.expand(3, -1)
            if pos.dim() != 2 or pos.shape[0] != 3:
                raise ValueError(f"expected M-RoPE positions [3, T], got shape {tuple(positions.shape)}")
            # Frequency j takes its angle from position row rows[j].
            freqs = pos[rows].transpose(0, 1) * inv_freq  # [T, R/2]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def tables(self, positions: Tensor, dtype: torch.dtype, head_dim: int) -> RopeTables:
        """positions [T] or [3, T] -> whole-head `RopeTables` for `apply_rope` (compute once per forward)."""
        cos, sin = self.cos_sin(positions, dtype)
        return rope_tables(cos, sin, head_dim, self.interleaved, self.kernels)

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: [T, H, D] with D >= rotary_dim; cos/sin: [T, R/2] -> [T, H, D]."""
        r = self.rotary_dim
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        rotate = rotate_interleaved if self.interleaved else rotate_half_split
        if r == x.shape[-1]:
            return rotate(x, cos, sin)
        return torch.cat((rotate(x[..., :r], cos, sin), x[..., r:]), dim=-1)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        # q: [T, H, D], k: [T, KV, D]
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)

    def extra_repr(self) -> str:
        return (
            f"rotary_dim={self.rotary_dim}, base={self.base}, interleaved={self.interleaved}, "
            f"mrope_section={self.mrope_section}"
        )
