#!/usr/bin/env python3
"""Run llama.cpp's own `convert_hf_to_gguf.py` (the copy inside the llama-cpp-python source distribution).

    python scripts/llamacpp_convert.py HF_DIR --outfile X.gguf --outtype f32|f16|bf16|q8_0 [--mmproj]

All arguments go to the converter unchanged. Where the converter comes from:
  1. `$AUTOGLM_LLAMACPP_DIR` (a llama.cpp checkout holding convert_hf_to_gguf.py), else
  2. `<cache>/llama.cpp-<version>/`, unpacked once from `<cache>/sdist/llama_cpp_python-<version>.tar.gz`, which is
     fetched with `pip download --no-deps --no-binary :all: llama-cpp-python==<version>` when absent.
  <cache> is `$AUTOGLM_TEST_CACHE` or `~/.cache/autoglm-test`; <version> is the installed llama_cpp's (else 0.3.36).

Why a wrapper and not the converter alone: the converter identifies a BPE pre-tokenizer by hashing the token ids of
a fixed text, so only the published vocabularies are recognised; a tiny test vocabulary with GLM-4's pre-tokenizer
gets a new hash and the converter refuses it. When (and only when) the hash is unknown, the wrapper reads the split
regex from tokenizer.json and, if it is GLM-4's (llama.cpp's "glm4" pre-tokenizer, same regex), answers "glm4" —
the value the converter writes for the real GLM-4/4.1V checkpoints. Everything else is the converter's own code.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_VERSION = "0.3.36"
# GLM-4's split regex as published in its tokenizer.json (llama.cpp spells `(?i:'s|...)` out as `'[sS]|...`).
GLM4_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# What the converter needs from the sdist (the rest is C++ we never build here).
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOGLM_TEST_CACHE", Path.home() / ".cache" / "autoglm-test")).expanduser()


def llama_cpp_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:
        return DEFAULT_VERSION


def sdist_path(version: str) -> Path:
    """The llama-cpp-python sdist in the cache, downloaded with pip when it is not there yet."""
    dest = cache_dir() / "sdist"
    path = dest / f"llama_cpp_python-{version}.tar.gz"
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(
            f"could not fetch the llama-cpp-python {version} sdist ({' '.join(cmd)}): {proc.stderr.strip()[-500:]}\n"
            f"Put it at {path} by hand, or set AUTOGLM_LLAMACPP_DIR to a llama.cpp checkout."
        )
    return path


def converter_dir(version: str | None = None) -> Path:
    """A directory holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ (unpacked once)."""
    if env := os.environ.get("AUTOGLM_LLAMACPP_DIR"):
        d = Path(env).expanduser()
        if not (d / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"AUTOGLM_LLAMACPP_DIR={d} has no convert_hf_to_gguf.py")
        return d
    version = version or llama_cpp_version()
    target = cache_dir() / f"llama.cpp-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    sdist = sdist_path(version)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache_dir()))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len(prefix) :]
                if rel.startswith(_MEMBERS) or rel in _MEMBERS:
                    m.name = rel
                    members.append(m)
            if not members:
                raise RuntimeError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
            tar.extractall(tmp, members=members, filter="data")
        try:
            tmp.rename(target)  # atomic: a concurrent unpacker either wins or finds the finished directory
        except OSError:
            if not (target / "convert_hf_to_gguf.py").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pre_from_tokenizer_json(model_dir: Path) -> str | None:
    """"glm4" when tokenizer.json's pre-tokenizer is GLM-4's split regex + byte-level, else None."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps: list[dict[str, Any]] = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    return "glm4" if byte_level and regexes == [GLM4_SPLIT_REGEX] else None


def _patch_pre_tokenizer_lookup() -> None:
    from conversion.base import TextModel, logger  # the converter's own package (on sys.path by now)

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            pre = _pre_from_tokenizer_json(self.dir_model)
            if pre is None:
                raise
            logger.warning("unknown vocabulary hash, but tokenizer.json uses GLM-4's pre-tokenizer: writing %r", pre)
            return pre

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def run_converter(argv: list[str]) -> None:
    """Run convert_hf_to_gguf.py in this process with `argv` (its own arguments)."""
    d = converter_dir()
    # the converter's gguf-py must win over the installed `gguf` (it writes newer constants)
    sys.path[:0] = [str(d / "gguf-py"), str(d)]
    for mod in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        del sys.modules[mod]
    _patch_pre_tokenizer_lookup()
    sys.argv = [str(d / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(str(d / "convert_hf_to_gguf.py"), run_name="__main__")


def convert_command(hf_dir: str | Path, outfile: str | Path, outtype: str, *, mmproj: bool = False) -> list[str]:
    """The command line that runs this script for one conversion (for subprocess callers such as tests)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), str(hf_dir), "--outfile", str(outfile), "--outtype", outtype]
    return [*cmd, "--mmproj"] if mmproj else cmd


if __name__ == "__main__":
    run_converter(sys.argv[1:])
