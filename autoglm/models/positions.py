"""Rotary positions of a prompt, per position scheme: 1-D (position = token index) and GLM-4.1V's 3-row M-RoPE.

A decoder answers `prompt_positions(num_tokens, spans)` with one of these; the engine never computes positions
itself. `MediaSpan.grid` is the item's grid in *decoder slots* (t, h, w after any spatial merge), as its encoder
reports it, so no scheme has to guess a merge size.

M-RoPE (rows t, h, w), as transformers' `Glm4vModel.get_rope_index`:
- text token: the same value p on all three rows; p counts on from the previous token;
- media item of slot grid (t, h, w) whose first slot follows running position s: row 0 = s + frame, row 1 = s + row,
  row 2 = s + column, in raster order; the next token continues at s + max(h, w) (t == 1 for still images);
- token at sequence index i past the prompt: i + delta on all rows, delta = (max position + 1) - prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MediaSpan:
    """Where one media item's slots sit in the expanded prompt: tokens [offset, offset + length), laid out as `grid`
    (t, h, w) decoder slots (empty for media without a spatial layout, e.g. audio)."""

    offset: int
    length: int
    grid: tuple[int, ...] = ()


@dataclass(frozen=True)
class PromptPositions:
    """positions: [rows, L] int64, or None for plain 1-D positions 0..L-1. A token at sequence index i >= L has
    position i + delta (on every row)."""

    positions: Tensor | None = None
    delta: int = 0

    def span(self, start: int, end: int) -> Tensor:
        """Positions of tokens [start, end): [end - start] for 1-D, [rows, end - start] otherwise."""
        if self.positions is None:
            return torch.arange(start, end)
        n_prompt = self.positions.shape[1]
        parts = []
        if start < n_prompt:
            parts.append(self.positions[:, start : min(end, n_prompt)])
        if end > n_prompt:
            lo = max(start, n_prompt)
            parts.append((torch.arange(lo, end) + self.delta).expand(self.positions.shape[0], end - lo))
        return torch.cat(parts, 1)


def rope_positions(num_tokens: int, spans: Sequence[MediaSpan] = ()) -> PromptPositions:
    """1-D RoPE: every token (media slots included) takes its index."""
    return PromptPositions()


def _grid_positions(start: int, grid: Sequence[int]) -> Tensor:
    t, h, w = (int(v) for v in grid)
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def mrope_positions(num_tokens: int, spans: Sequence[MediaSpan] = ()) -> PromptPositions:
    """3-row M-RoPE positions [3, num_tokens] of a prompt with media at `spans` (text-only: None, delta 0)."""
    if not spans:
        return PromptPositions()
    chunks: list[Tensor] = []
    pos = 0  # next position value
    cursor = 0  # next token index
    for span in sorted(spans, key=lambda s: s.offset):
        if span.offset < cursor or span.offset + span.length > num_tokens:
            raise ValueError(f"media span {span} overlaps another or runs past {num_tokens} tokens")
        n_text = span.offset - cursor
        if n_text:
            chunks.append(torch.arange(pos, pos + n_text).expand(3, n_text))
            pos += n_text
        if len(span.grid) == 3:
            grid = _grid_positions(pos, span.grid)
            if grid.shape[1] != span.length:
                raise ValueError(f"media span of {span.length} slots does not match its slot grid {span.grid}")
            chunks.append(grid)
            pos += max(int(span.grid[1]), int(span.grid[2]))
        else:  # no spatial layout: slots advance like text
            chunks.append(torch.arange(pos, pos + span.length).expand(3, span.length))
            pos += span.length
        cursor = span.offset + span.length
    n_text = num_tokens - cursor
    if n_text:
        chunks.append(torch.arange(pos, pos + n_text).expand(3, n_text))
    positions = torch.cat(chunks, dim=1).to(torch.long).contiguous()
    return PromptPositions(positions, int(positions.max()) + 1 - num_tokens)
