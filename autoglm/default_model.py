"""Compatibility names for code written before `autoglm.builtins` (the built-in asset table).

`default_model_path()` is the built-in default *text* model (whichever `autoglm.builtins` marks default); code that
means Gemma 3 270M specifically should call `builtin_path("gemma-3-270m")`.
"""

from __future__ import annotations

from pathlib import Path

from autoglm.builtins import TEXT_GGUF, builtin_path, cache_dir, default_builtin

__all__ = ["cache_dir", "default_model_name", "default_model_path"]


def default_model_path(directory: Path | None = None) -> Path:
    """Path of the assembled default text GGUF (assembled and verified on first use)."""
    return builtin_path(default_builtin(TEXT_GGUF), cache=directory)


def default_model_name() -> str:
    """The name the default model is served under (its file name without the extension)."""
    return default_model_path().stem
