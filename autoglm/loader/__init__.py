"""`load_model`: one entry point that decides what a path is (by its contents, never its name) and loads it.

- a directory with config.json      -> autoglm.loader.hf.load_hf
- a file starting with b"GGUF"      -> autoglm.loader.gguf.load_gguf (with an optional mmproj GGUF)
- None, or a built-in name           -> that built-in model, assembled on first use (autoglm.builtins;
                                       `autoglm models` lists them); a path on disk wins over a built-in name
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from autoglm.errors import ConfigError, CorruptFile, ModelLoadError
from autoglm.models.loaded import LoadedModel

GGUF_MAGIC = b"GGUF"
log = logging.getLogger("autoglm.loader")


def is_gguf(path: str | Path) -> bool:
    """True when `path` is a file whose first bytes are the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def load_model(
    path: str | Path | None = None,
    *,
    mmproj: str | Path | None = None,
    dtype: str = "auto",
    device: Any = "cpu",
    no_vision: bool = False,
    quantization: str | None = None,
    chat_template: str | None = None,
    cpu_isa: str | None = None,
) -> LoadedModel:
    """Load a model from an HF directory or a GGUF file (plus `mmproj` for its vision projector).
    `quantization` ("int8" | "int4") applies to HF checkpoints; GGUF weights keep their own block types.
    `cpu_isa` (auto|avx512|avxvnni|avx2|scalar|neon): the CPU kernel variant a GGUF decoder on CPU computes with
    (`autoglm.kernels.select_kernels`; None: `$AUTOGLM_CPU_ISA`, else the best this CPU runs; one this CPU lacks
    raises CpuIsaError); HF checkpoints compute with torch and ignore it.
    `chat_template` (a Jinja file path or template text) replaces the model's own template; a model with none
    gets its family's built-in (GLM-4.1V, GLM-4, Gemma, Llama 3, ChatML for Qwen), else ChatML as llama-server
    does, with a warning (autoglm.tokenizer.builtin_templates.choose_chat_template decides and logs why)."""
    model = _load(
        path, mmproj=mmproj, dtype=dtype, device=device, no_vision=no_vision, quantization=quantization,
        cpu_isa=cpu_isa,
    )
    _set_chat_template(model, chat_template)
    return model


def _set_chat_template(model: LoadedModel, override: str | None) -> None:
    """The template decision is autoglm.tokenizer.builtin_templates' (inspect asks it too); this reads the file."""
    from autoglm.tokenizer.builtin_templates import apply_chat_template

    source = override
    if override is not None and "{" not in override:  # a path, not template text
        try:
            source = Path(override).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--chat-template {override}: cannot read the template file: {e}") from e
    name = f"--chat-template {override[:60]}" if override is not None else ""
    apply_chat_template(model, source, name)


def _load(
    path: str | Path | None,
    *,
    mmproj: str | Path | None,
    dtype: str,
    device: Any,
    no_vision: bool,
    quantization: str | None,
    cpu_isa: str | None,
) -> LoadedModel:
    if quantization not in (None, "none", "int8", "int4"):
        raise ModelLoadError(f"unknown quantization {quantization!r}; choose int8, int4 or none")
    path = _builtin_or_path(path)
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p}: directory has no config.json (expected a Hugging Face model directory)")
        if mmproj is not None:
            raise ModelLoadError(f"--mmproj {mmproj} applies to GGUF models only; {p} is a Hugging Face directory")
        from autoglm.loader.hf import load_hf

        return load_hf(p, dtype=dtype, device=device, no_vision=no_vision, quantization=quantization)
    if p.is_file():
        if not is_gguf(p):
            raise CorruptFile(
                f"{p}: not a GGUF file (first bytes are not {GGUF_MAGIC!r}) and not a model directory"
            )
        if mmproj is not None and not is_gguf(mmproj):
            raise CorruptFile(f"{mmproj}: the mmproj file is not a GGUF file")
        if quantization not in (None, "none"):
            raise ModelLoadError(
                f"--quantization {quantization} applies to Hugging Face checkpoints; {p} is a GGUF file whose "
                "weights are already quantized (use `autoglm quantize` to change their type)"
            )
        from autoglm.loader.gguf import load_gguf

        return load_gguf(p, mmproj=mmproj, dtype=dtype, device=device, no_vision=no_vision, cpu_isa=cpu_isa)
    from autoglm.builtins import builtin_names

    raise ModelLoadError(f"{p}: no such file or directory (nor a built-in model: {', '.join(builtin_names())})")


def _builtin_or_path(path: str | Path | None) -> str | Path:
    """None -> the default built-in text model; a name that is not on disk but is a built-in -> its file."""
    from autoglm.builtins import TEXT_GGUF, builtin_path, default_builtin, find_builtin

    if path is None:
        return builtin_path(default_builtin(TEXT_GGUF))
    if Path(path).expanduser().exists():
        return path
    asset = find_builtin(str(path))
    if asset is None:
        return path
    if asset.kind != TEXT_GGUF:
        raise ModelLoadError(f"{path} is a built-in {asset.kind} module, not a text model (see `autoglm models`)")
    return builtin_path(asset)
