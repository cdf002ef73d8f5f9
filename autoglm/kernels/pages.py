"""Give back the resident pages of a weight that was just replaced by a repacked copy.

Checkpoint tensors are views of the safetensors mmap. When a quantized layer repacks one at load (int4 into the
kernel layout, an unaligned int8 weight into an aligned copy), reading it pulls its file pages into RSS, and they
stay counted while any other tensor keeps the mapping alive — peak memory would be twice the quantized weights.
`release_pages` drops the pages lying wholly inside the tensor's bytes (madvise MADV_DONTNEED): file-backed pages
are simply re-read from the file if ever touched again, so this is done only for file-backed memory (never for
anonymous memory, whose contents would be lost for any other view of it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

from torch import Tensor

_MADV_DONTNEED = 4
_libc: ctypes.CDLL | None = None


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def _file_backed(lo: int, hi: int) -> bool:
    """[lo, hi) lies inside one mapping of a regular file (per /proc/self/maps)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                a, _, b = parts[0].partition("-")
                if int(a, 16) <= lo and hi <= int(b, 16):
                    path = parts[5].strip() if len(parts) > 5 else ""
                    return path.startswith("/") and int(parts[4]) != 0  # a file with an inode, not [heap]/anon
    except OSError:
        return False
    return False


def release_pages(t: Tensor) -> int:
    """Drop the whole pages inside `t`'s bytes from this process's resident set when they are file-backed; returns
    bytes released (0 when not applicable: anonymous memory, not CPU, under a page, not Linux)."""
    if t.device.type != "cpu" or t.is_meta or not t.is_contiguous():
        return 0
    fn = _madvise()
    if fn is None:
        return 0
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    lo, hi = -(-start // page) * page, end // page * page  # whole pages only: neighbours keep theirs
    if hi <= lo or not _file_backed(lo, hi):
        return 0
    if fn(lo, hi - lo, _MADV_DONTNEED) != 0:
        return 0
    return hi - lo
