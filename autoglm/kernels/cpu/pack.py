"""The 16-row interleaved layout of `csrc/pack.cpp` (llama.cpp's "repack" idea): which weights take it, and packing.

A packed weight holds the same bytes as the file's blocks, reordered so that one AVX512-VNNI `vpdpbusd` yields 16
outputs (`csrc/gemv_packed.cpp`; the avx2 variant reads the same bytes as two 8-row halves). Only `PACKED_TYPES`
with rows % 16 == 0 are packed, and only by an explicit
`autoglm.layers.linear.gguf.prepare_weights(model)` (never lazily behind a global): loading stays memory-honest
(nothing is read until then) and packing releases each chunk's file pages as its packed copy is written.
"""

from __future__ import annotations

from types import ModuleType

from gguf import GGMLQuantizationType
from torch import Tensor

from autoglm.kernels.base import GGUFBlockFormat
from autoglm.kernels.pages import release_pages

Q = GGMLQuantizationType
PACKED_TYPES: tuple[GGMLQuantizationType, ...] = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K)
GROUP_ROWS = 16
_CHUNK_ROWS = 4096  # rows packed (and their file pages released) at a time: bounded transient memory


def packable(fmt: GGUFBlockFormat) -> bool:
    """Whether `fmt` has a packed layout (type and row count; the caller checks its kernels have the packed tiles)."""
    return not fmt.packed and fmt.qtype in PACKED_TYPES and fmt.rows % GROUP_ROWS == 0


def pack(ext: ModuleType, raw: Tensor, fmt: GGUFBlockFormat) -> Tensor:
    """raw [rows, row_bytes] in file order -> a new packed tensor of the same shape, a chunk of rows at a time."""
    packed = ext.packed_buffer(*raw.shape)  # its own mapping on 2 MiB pages (Linux): a decode step streams it whole
    for s in range(0, fmt.rows, _CHUNK_ROWS):
        src = raw[s : s + _CHUNK_ROWS]
        ext.pack_out(src.contiguous(), int(fmt.qtype), fmt.cols, packed[s : s + src.shape[0]])  # no temporary
        release_pages(src)  # the file's pages of this chunk: the packed copy replaces them
    return packed
