"""Placeholder expansion and GLM-4.1V 3-D M-RoPE positions. Pure functions on token-id lists.

A chat template emits one `<|image|>` token per image (between `<|begin_of_image|>` and `<|end_of_image|>`); the
prompt the decoder sees carries `n_slots` copies of the image token id there, one per merged vision patch.

M-RoPE positions (rows t, h, w), as transformers' `Glm4vModel.get_rope_index`:
- text token: the same value p on all three rows; p counts on from the previous token;
- image of merged grid (t, h', w') starting when the running position is s: row 0 = s + frame, row 1 = s + row,
  row 2 = s + column, for the patches in raster order; the next token continues at s + max(h', w')
  (for t == 1, which still images always are, that is max + 1 over the image's positions);
- generated token at sequence index i: i + delta on all rows, delta = (max position + 1) - prompt length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from autoglm.errors import InvalidRequest


@dataclass(frozen=True)
class MediaSpan:
    """Where one media item's slots sit in the expanded prompt: tokens [offset, offset + length)."""

    offset: int
    length: int
    grid: tuple[int, ...]


def expand_placeholders(
    token_ids: Sequence[int],
    placeholder_id: int,
    n_slots: Sequence[int],
    grids: Sequence[tuple[int, ...]] | None = None,
    *,
    slot_id: int | None = None,
) -> tuple[list[int], list[MediaSpan]]:
    """Replace the k-th `placeholder_id` token with `n_slots[k]` copies of `slot_id` (default: `placeholder_id`).

    Returns the expanded ids and one `MediaSpan` per media item, in prompt order. Tokens around the placeholder
    (begin/end-of-image) are kept. The number of placeholders must equal the number of media items."""
    slot = placeholder_id if slot_id is None else slot_id
    n_placeholders = sum(1 for t in token_ids if t == placeholder_id)
    if n_placeholders != len(n_slots):
        raise InvalidRequest(
            f"prompt has {n_placeholders} media placeholder token(s) (id {placeholder_id}) "
            f"but {len(n_slots)} media item(s) were given"
        )
    if grids is not None and len(grids) != len(n_slots):
        raise ValueError(f"{len(grids)} grids for {len(n_slots)} media items")
    out: list[int] = []
    spans: list[MediaSpan] = []
    k = 0
    for t in token_ids:
        if t != placeholder_id:
            out.append(int(t))
            continue
        n = int(n_slots[k])
        if n <= 0:
            raise InvalidRequest(f"media item {k} fills {n} slots; expected a positive count")
        spans.append(MediaSpan(len(out), n, tuple(grids[k]) if grids is not None else ()))
        out.extend([slot] * n)
        k += 1
    return out, spans


def merged_grid(grid: Sequence[int], spatial_merge_size: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid -> the grid of decoder tokens after the spatial merge."""
    t, h, w = (int(v) for v in grid)
    if h % spatial_merge_size or w % spatial_merge_size:
        raise ValueError(f"grid {tuple(grid)} is not divisible by spatial merge size {spatial_merge_size}")
    return t, h // spatial_merge_size, w // spatial_merge_size


def image_positions(start: int, grid: Sequence[int], spatial_merge_size: int) -> Tensor:
    """M-RoPE positions [3, t*h'*w'] of one image's slots whose first slot follows running position `start`."""
    t, h, w = merged_grid(grid, spatial_merge_size)
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def mrope_positions(num_tokens: int, spans: Sequence[MediaSpan], spatial_merge_size: int) -> tuple[Tensor, int]:
    """Positions [3, num_tokens] int64 for an expanded prompt with media at `spans`, and the decode `delta`."""
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
        img = image_positions(pos, span.grid, spatial_merge_size)
        if img.shape[1] != span.length:
            raise ValueError(
                f"media span of {span.length} slots does not match grid {span.grid} "
                f"(merge {spatial_merge_size}: {img.shape[1]} slots)"
            )
        chunks.append(img)
        _, h, w = merged_grid(span.grid, spatial_merge_size)
        pos += max(h, w)
        cursor = span.offset + span.length
    n_text = num_tokens - cursor
    if n_text:
        chunks.append(torch.arange(pos, pos + n_text).expand(3, n_text))
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long), 0
    positions = torch.cat(chunks, dim=1).to(torch.long)
    delta = int(positions.max()) + 1 - num_tokens
    return positions.contiguous(), delta


def mrope_positions_for_ids(
    token_ids: Sequence[int],
    image_token_id: int,
    grids: Sequence[Sequence[int]],
    spatial_merge_size: int,
) -> tuple[Tensor, int]:
    """Positions [3, L] and delta for an already expanded prompt: runs of `image_token_id` are the images, in
    order, each taking t*h*w/merge² slots of its grid (so images placed back to back are still told apart)."""
    ids = [int(t) for t in token_ids]
    spans: list[MediaSpan] = []
    k = 0
    i = 0
    n = len(ids)
    while i < n:
        if ids[i] != image_token_id:
            i += 1
            continue
        if k >= len(grids):
            raise InvalidRequest(f"prompt has more image slots (id {image_token_id}) than the {len(grids)} images")
        t, h, w = merged_grid(grids[k], spatial_merge_size)
        length = t * h * w
        if i + length > n or any(ids[j] != image_token_id for j in range(i, i + length)):
            raise InvalidRequest(
                f"image {k} with grid {tuple(grids[k])} needs {length} consecutive slots "
                f"(id {image_token_id}) at token {i}"
            )
        spans.append(MediaSpan(i, length, tuple(int(v) for v in grids[k])))
        i += length
        k += 1
    if k != len(grids):
        raise InvalidRequest(f"prompt has slots for {k} image(s) but {len(grids)} were given")
    return mrope_positions(n, spans, spatial_merge_size)


def decode_positions(start: int, count: int, delta: int) -> Tensor:
    """M-RoPE positions [3, count] of tokens at sequence indices start..start+count-1 after the prompt."""
    return (torch.arange(start, start + count) + delta).expand(3, count).contiguous()
