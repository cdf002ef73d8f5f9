"""A fast, mmap-backed GGUF header reader: metadata as Python values, tensors as zero-copy byte views.

Why not `gguf.GGUFReader`: it builds numpy views for every element of every array field, which takes ~17 s on the
2-core CI machine for Gemma 3's 262k-token vocabulary (three arrays of 262k items). This reader parses the same
format (the `gguf` package's constants: value types, magic, alignment, block sizes) in well under a second and
hands out the same bytes; `tests/unit/test_gguf_loader.py` checks it against `GGUFReader` field by field.
Malformed or truncated files raise `CorruptFile` naming the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

from autoglm.errors import CorruptFile, UnsupportedQuantType

_SCALARS: dict[GGUFValueType, tuple[str, str]] = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<?", "?"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
_MAX_DIMS = 8
_MAX_NESTING = 8  # array-of-array levels accepted in metadata


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. `shape` is in PyTorch order (GGUF stores dims innermost first)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise CorruptFile(f"{self.path}: truncated GGUF header (needs byte {self.pos + size}, file ends)")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise CorruptFile(f"{self.path}: truncated GGUF header (string of {n} bytes at {self.pos})")
        raw = self.buf[self.pos : end]
        self.pos = end
        # llama.cpp's vocabularies may hold invalid UTF-8 pieces; keep them round-trippable
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if depth > _MAX_NESTING:  # llama.cpp's own files nest one level (arrays of strings)
            raise CorruptFile(f"{self.path}: GGUF arrays nested over {_MAX_NESTING} levels deep at byte {self.pos}")
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            raise CorruptFile(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}") from None
        if vt == GGUFValueType.STRING:
            return self.string()
        if vt == GGUFValueType.ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            try:
                et = GGUFValueType(etype)
            except ValueError:
                raise CorruptFile(f"{self.path}: unknown GGUF array type {etype} at byte {self.pos}") from None
            if et in _SCALARS:
                dtype = np.dtype(_SCALARS[et][1])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise CorruptFile(f"{self.path}: truncated GGUF header (array of {count} at {self.pos})")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos = end
                return arr
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                raise CorruptFile(f"{self.path}: truncated GGUF header (array of {count} at {self.pos})")
            return [self.value(etype, depth + 1) for _ in range(count)]
        return self.unpack(_SCALARS[vt][0])


class GGUFFile:
    """Metadata and tensor table of one GGUF file, kept open as a read-only mmap.

    metadata: key -> value (int/float/bool/str, numpy array for numeric arrays, list for string arrays)
    tensors:  name -> TensorInfo, in file order
    `raw(info)` returns the tensor's bytes as a uint8 numpy view of the mapping (no copy).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise CorruptFile(f"{self.path}: not a GGUF file (only {size} bytes)")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CorruptFile(f"{self.path}: cannot open GGUF file: {e}") from e
        self.size = size
        cur = _Cursor(self._mmap, self.path)
        magic = cur.unpack("<I")
        if magic != GGUF_MAGIC:
            raise CorruptFile(f"{self.path}: not a GGUF file (magic {self._mmap[:4]!r}, expected b'GGUF')")
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise CorruptFile(f"{self.path}: unsupported GGUF version {self.version} (big-endian or corrupt?)")
        n_tensors = cur.unpack("<Q")
        n_kv = cur.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            self.value_types[key] = vtype
            self.metadata[key] = cur.value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > _MAX_DIMS:
                raise CorruptFile(f"{self.path}: tensor {name!r} claims {n_dims} dimensions")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            qtype_id = cur.unpack("<I")
            offset = cur.unpack("<Q")
            infos.append((name, dims, qtype_id, offset))
        alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, (int, np.integer)) or alignment < 1 or (
                alignment & (alignment - 1)):  # llama.cpp: a power of two
            raise CorruptFile(f"{self.path}: general.alignment must be a positive power of two, got {alignment!r}")
        alignment = int(alignment)
        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(qtype_id)
            except ValueError:
                raise UnsupportedQuantType(
                    f"{self.path}: tensor {name!r} has unknown GGML type id {qtype_id}", param=name
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            shape = tuple(int(d) for d in reversed(dims))
            n = 1
            for d in shape:
                n *= d
            if shape and shape[-1] % block:
                raise CorruptFile(f"{self.path}: tensor {name!r} row of {shape[-1]} is not whole {qtype.name} blocks")
            nbytes = n // block * type_size
            start = self.data_offset + offset
            if start + nbytes > size:
                raise CorruptFile(
                    f"{self.path}: truncated GGUF file: tensor {name!r} needs bytes {start}..{start + nbytes} "
                    f"but the file has {size}"
                )
            if name in self.tensors:
                raise CorruptFile(f"{self.path}: duplicate tensor {name!r}")
            self.tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes, a uint8 view of the (copy-on-write) mapping: pages load lazily, nothing is copied."""
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CorruptFile(f"{self.path}: GGUF metadata has no general.architecture")
        return arch
