"""Reading CTranslate2 model directories (`model.bin` + `config.json` + vocabulary/tokenizer) without ctranslate2.

`model.bin` layout (little-endian; what `ctranslate2.specs.ModelSpec._serialize` writes, binary versions 4-6):
    u32 binary_version, str spec_name, u32 spec_revision, u32 n_variables,
    n x { str name, u8 rank, rank x u32 dim, u8 dtype_id, u32 n_bytes, n_bytes data },
    u32 n_aliases, n x { str alias, str target }
where str = u16 length (with the NUL) + bytes + NUL, and dtype_id indexes (float32, int8, int16, int32, float16,
bfloat16). Quantized weights carry a sibling `<name>_scale` (int8: per output row, `w = q / scale`; int16: one
scalar). The file is mmap'd: tensors are zero-copy views until a caller converts them. Errors name the file and
the variable.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autoglm.errors import ConfigError, CorruptFile, ModelLoadError, UnsupportedQuantType

SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
_DTYPES: tuple[tuple[str, torch.dtype], ...] = (
    ("float32", torch.float32),
    ("int8", torch.int8),
    ("int16", torch.int16),
    ("int32", torch.int32),
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),
)
_TOKENIZER_FILES = ("tokenizer.json",)
_VOCAB_FILES = ("vocabulary.json", "vocabulary.txt", "vocabulary")


@dataclass(frozen=True)
class Ct2Variable:
    name: str
    shape: tuple[int, ...]
    dtype: str  # one of the _DTYPES names
    offset: int  # of the data in the file
    nbytes: int


@dataclass
class Ct2File:
    """An opened `model.bin`: the spec, its variables (lazy, mmap'd) and aliases."""

    path: Path
    binary_version: int
    spec: str  # "WhisperSpec", "TransformerSpec", ...
    revision: int
    variables: dict[str, Ct2Variable]
    aliases: dict[str, str]  # alias -> variable name
    _buffer: Any = field(repr=False, default=None)

    def resolve(self, name: str) -> Ct2Variable:
        target = self.aliases.get(name, name)
        var = self.variables.get(target)
        if var is None:
            raise ModelLoadError(f"{self.path}: variable {name!r} is not in the file")
        return var

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def raw(self, name: str) -> Tensor:
        """The stored tensor (file dtype), a zero-copy view of the mmap."""
        var = self.resolve(name)
        torch_dtype = dict(_DTYPES)[var.dtype]
        count = int(np.prod(var.shape)) if var.shape else 1
        itemsize = torch.empty(0, dtype=torch_dtype).element_size()
        if count * itemsize != var.nbytes:
            raise CorruptFile(f"{self.path}: variable {var.name!r} has {var.nbytes} bytes for shape {var.shape} "
                              f"of {var.dtype}")
        flat = torch.frombuffer(self._buffer, dtype=torch.uint8, count=var.nbytes, offset=var.offset)
        return flat.view(torch_dtype).reshape(var.shape)

    def scalar(self, name: str) -> int | float:
        return self.raw(name).reshape(-1)[0].item()

    def is_quantized(self, name: str) -> bool:
        return self.resolve(name).dtype in ("int8", "int16") and f"{name}_scale" in self

    def float_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The variable as floats: int8/int16 weights dequantized with their `_scale`, float16/bfloat16 cast.

        A tensor already in `dtype` stays a view of the mmap (no copy)."""
        t = self.raw(name)
        if t.is_floating_point():
            return t if t.dtype == dtype else t.to(dtype)
        if not self.is_quantized(name):
            raise UnsupportedQuantType(f"{self.path}: variable {name!r} is {self.resolve(name).dtype} without a "
                                       f"'{name}_scale'; a float tensor was expected")
        scale = self.raw(f"{name}_scale").to(torch.float32)
        if scale.numel() == 1:
            return (t.to(torch.float32) / scale.reshape(())).to(dtype)
        if scale.shape[0] != t.shape[0]:
            raise CorruptFile(f"{self.path}: '{name}_scale' has {scale.shape[0]} rows for {name!r} {tuple(t.shape)}")
        shape = (t.shape[0],) + (1,) * (t.dim() - 1)  # per output row (conv weights [out, in, k] too)
        return (t.to(torch.float32) / scale.reshape(shape)).to(dtype)

    def quantization(self) -> str:
        """A summary for logs: the weights' storage type ("int8", "float16", "int8_float16", ...)."""
        weights = [v for n, v in self.variables.items() if n.endswith("/weight")]
        kinds = {v.dtype for v in weights}
        floats = {v.dtype for v in self.variables.values() if v.dtype in ("float32", "float16", "bfloat16")
                  and len(v.shape) > 0 and not v.name.endswith("_scale")}
        if "int8" in kinds or "int16" in kinds:
            q = "int8" if "int8" in kinds else "int16"
            other = sorted(floats - {"float32"})
            return f"{q}_{other[0]}" if other else q
        return "+".join(sorted(kinds)) if kinds else "float32"

    def storage_bytes(self) -> int:
        return sum(v.nbytes for v in self.variables.values())


def _reader(path: Path, buf: Any) -> Ct2File:
    pos = 0
    size = len(buf)

    def take(fmt: str, what: str) -> Any:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise CorruptFile(f"{path}: truncated model.bin while reading {what} at byte {pos}")
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += n
        return value

    def string(what: str) -> str:
        nonlocal pos
        n = take("<H", what)
        if n == 0 or pos + n > size:
            raise CorruptFile(f"{path}: truncated or malformed string ({what}) at byte {pos}")
        raw = bytes(buf[pos : pos + n - 1])
        pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptFile(f"{path}: {what} at byte {pos - n} is not UTF-8") from e

    version = take("<I", "the binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CorruptFile(f"{path}: CTranslate2 binary version {version} is not supported "
                          f"(supported: {', '.join(map(str, SUPPORTED_BINARY_VERSIONS))}); is this a model.bin?")
    spec = string("the spec name")
    revision = take("<I", "the spec revision")
    count = take("<I", "the variable count")
    variables: dict[str, Ct2Variable] = {}
    for i in range(count):
        name = string(f"variable #{i} name")
        rank = take("<B", f"the rank of {name!r}")
        shape = tuple(take("<I", f"the shape of {name!r}") for _ in range(rank))
        type_id = take("<B", f"the dtype of {name!r}")
        if type_id >= len(_DTYPES):
            raise UnsupportedQuantType(f"{path}: variable {name!r} has unknown CTranslate2 dtype id {type_id}")
        nbytes = take("<I", f"the size of {name!r}")
        if pos + nbytes > size:
            raise CorruptFile(f"{path}: truncated model.bin: variable {name!r} needs {nbytes} bytes at byte {pos}, "
                              f"the file has {size}")
        variables[name] = Ct2Variable(name, shape, _DTYPES[type_id][0], pos, nbytes)
        pos += nbytes
    aliases: dict[str, str] = {}
    if pos < size:
        for i in range(take("<I", "the alias count")):
            alias = string(f"alias #{i}")
            aliases[alias] = string(f"the target of alias {alias!r}")
    for alias, target in aliases.items():
        if target not in variables:
            raise CorruptFile(f"{path}: alias {alias!r} points to missing variable {target!r}")
    return Ct2File(path, version, spec, revision, variables, aliases)


def open_ct2(path: str | Path) -> Ct2File:
    """mmap and parse a `model.bin`. Raises CorruptFile naming the file and the variable where it breaks."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            if path.stat().st_size == 0:
                raise CorruptFile(f"{path}: empty file")
            # copy-on-write: torch views need a writable buffer; pages stay shared with the page cache (never written)
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot open ({e})") from e
    f = _reader(path, memoryview(mm))
    f._buffer = mm
    return f


@dataclass
class Ct2Dir:
    """A CTranslate2 model directory: the weights, config.json and the tokenizer/vocabulary files present."""

    path: Path
    model: Ct2File
    config: dict[str, Any]
    tokenizer_json: Path | None
    vocabulary: Path | None


def is_ct2_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "model.bin").is_file() and (p / "config.json").is_file() and _looks_ct2(p / "model.bin")


def _looks_ct2(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
    except OSError:
        return False
    return len(head) == 6 and struct.unpack("<I", head[:4])[0] in SUPPORTED_BINARY_VERSIONS


def read_ct2_dir(path: str | Path) -> Ct2Dir:
    root = Path(path)
    if not (root / "model.bin").is_file():
        raise ModelLoadError(f"{root}: no model.bin (not a CTranslate2 model directory)")
    cfg_path = root / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    tok = next((root / n for n in _TOKENIZER_FILES if (root / n).is_file()), None)
    vocab = next((root / n for n in _VOCAB_FILES if (root / n).is_file()), None)
    return Ct2Dir(root, open_ct2(root / "model.bin"), config, tok, vocab)
