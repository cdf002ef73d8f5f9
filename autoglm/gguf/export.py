"""A GGUF file as an HF safetensors directory (dequantized): config.json, model.safetensors, tokenizer files.

The weights are the values our GGUF loader computes with (`autoglm.loader.gguf.dense_weights`: decoded from their
block type, Gemma norms shifted back by -1, GLM-4.1V q/k rows back in interleaved order), so a directory written
here computes what the GGUF computes (up to the dtype chosen). Tools that work on HF checkpoints (pruning,
`autoglm quantize HF_DIR`) use it to accept GGUF input.

Architectures: any the registry has; each module's `hf_config` writes the config.json (GLM-4.1V text GGUFs have no
text-only HF class and are refused). The tokenizer is the one built from GGUF metadata (llama.cpp's ids), saved as a
`tokenizers`
tokenizer.json plus a tokenizer_config.json naming its special tokens and the file's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from autoglm.errors import ConfigError, InvalidRequest, UnsupportedArchitecture
from autoglm.gguf.reader import GGUFFile

GGUF_MAGIC = b"GGUF"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_gguf_file(path: str | Path) -> bool:
    """True when `path` is a file starting with the GGUF magic (the content decides, never the name)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def hf_config_of(f: GGUFFile) -> dict[str, Any]:
    """The HF config.json dict for the GGUF's text model (its architecture module writes it)."""
    from autoglm.loader.gguf import build_decoder
    from autoglm.models.registry import gguf_module

    try:
        return gguf_module(f.architecture, source=str(f.path)).hf_config(build_decoder(f))
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"{f.path}: cannot export: {e.message}", param=e.param) from e


def _write_tokenizer(f: GGUFFile, dst: Path) -> None:
    from autoglm.gguf.tokenizer import build_tokenizer, eos_token_ids

    tok = build_tokenizer(f.metadata, source=str(f.path))
    # the backend already carries llama.cpp's BOS/EOS post-processor and the special tokens
    tok.backend.save(str(dst / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": None if tok.unk_token_id is None else tok.id_to_token(tok.unk_token_id),
        "add_bos_token": tok.add_bos,
        "clean_up_tokenization_spaces": False,
    }
    template = f.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = str(template)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    gen: dict[str, Any] = {}
    eos = eos_token_ids(f.metadata)
    if eos:
        gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if tok.bos_token_id is not None:
        gen["bos_token_id"] = tok.bos_token_id
    keys = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}
    for k, ours in keys.items():
        v = f.get(f"general.sampling.{k}")
        if v is not None:
            gen[ours] = int(v) if ours == "top_k" else float(v)
    if gen:
        (dst / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def export_hf(src: str | Path, dst: str | Path, *, dtype: str = "float32", shard_bytes: int = 2 << 30) -> Path:
    """Write the GGUF file `src` as an HF model directory `dst` (created; must not hold a config.json).

    Memory: one decoded tensor at a time plus the shard being written (`shard_bytes`)."""
    from autoglm.loader.gguf import dense_weights
    from autoglm.tools.quantize import ShardedWriter

    if dtype not in _DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not supported; choose from {', '.join(_DTYPES)}", param="dtype")
    src, dst = Path(src), Path(dst)
    if not is_gguf_file(src):
        raise InvalidRequest(f"{src}: not a GGUF file (no GGUF magic)", param="model")
    if (dst / "config.json").exists():
        raise InvalidRequest(f"{dst}: already holds a model (config.json); choose a new directory", param="output")
    f = GGUFFile(src)
    config = hf_config_of(f)
    config["torch_dtype"] = dtype
    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(dst, shard_bytes)
    for name, tensor in dense_weights(f):
        writer.add(name, tensor.to(_DTYPES[dtype]))
    writer.close()
    (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    _write_tokenizer(f, dst)
    return dst
