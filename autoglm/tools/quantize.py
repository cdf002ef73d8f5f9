"""Offline writer: an HF model directory -> its INT8/INT4 copy (safetensors shards + `quantization_config`).

Lives apart from the load path (`autoglm.quant.apply` holds the layer swap both use), so the loader never imports
a writer. `ShardedWriter` and `copy_side_files` are shared with the other offline writers (prune, GGUF export).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from autoglm.errors import ConfigError
from autoglm.layers.linear.int4 import quantize_int4
from autoglm.layers.linear.int8 import quantize_int8
from autoglm.loader.hf import iter_safetensors, safetensors_files
from autoglm.models.config import read_config_json
from autoglm.models.registry import hf_spec
from autoglm.quant.apply import DEFAULT_GROUP_SIZE, _dense_types, default_spec


def quantize_hf_checkpoint(
    src: str | Path, dst: str | Path, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE, shard_bytes: int = 2 << 30
) -> dict[str, int]:
    """Write a quantized copy of an HF model directory: safetensors shards + config.json with quantization_config.

    Streams one tensor at a time (memory ≈ the largest tensor); the model class is built on `meta` only to know
    which checkpoint tensors are weights of linear layers. Returns {format: bytes written}.
    """
    src, dst = Path(src), Path(dst)
    config = read_config_json(src)
    if config.get("quantization_config") is not None:
        raise ConfigError(f"{src}: already quantized ({config['quantization_config']})", param="quantization_config")
    model_spec = hf_spec(config, source=str(src / "config.json"))
    with torch.device("meta"):
        model = model_spec.build(config, False)
    spec = default_spec(model, mode, group_size=group_size, vision_prefix=model_spec.vision_prefix)
    dense = _dense_types()
    linear_names = {n for n, m in model.named_modules() if isinstance(m, dense)}
    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(dst, shard_bytes)
    written: dict[str, int] = {}

    def put(key: str, t: torch.Tensor, fmt: str) -> None:
        writer.add(key, t)
        written[fmt] = written.get(fmt, 0) + t.numel() * t.element_size()

    for key, tensor in iter_safetensors(safetensors_files(src)):
        ours = model_spec.rename(key)
        module = ours[: -len(".weight")] if ours is not None and ours.endswith(".weight") else None
        fmt = spec.format_for(module) if module in linear_names else "none"
        if fmt == "int4" and tensor.shape[1] % group_size:
            fmt = "int8"
        stem = key[: -len(".weight")]
        if fmt == "int8":
            q, scales = quantize_int8(tensor)
            put(key, q, "int8")
            put(stem + ".scales", scales, "int8")
        elif fmt == "int4":
            qweight, sz = quantize_int4(tensor, group_size)
            put(stem + ".qweight", qweight, "int4")
            put(stem + ".scales_and_zeros", sz, "int4")
        else:
            put(key, tensor, str(tensor.dtype).removeprefix("torch."))
    writer.close()
    config = dict(config)
    config["quantization_config"] = spec.to_config()
    (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    copy_side_files(src, dst)
    return written


class ShardedWriter:
    """Write tensors to `model.safetensors` (or `model-0000i-of-0000n.safetensors` + index) holding at most about
    one shard in memory."""

    def __init__(self, dst: Path, shard_bytes: int = 2 << 30) -> None:
        self.dst, self.shard_bytes = dst, shard_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.size = 0
        self.total = 0
        self.parts: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.size and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.shard[key] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.shard:
            name = f".partial-{len(self.parts):05d}.safetensors"
            save_file(self.shard, str(self.dst / name), metadata={"format": "pt"})
            self.weight_map.update({k: name for k in self.shard})
            self.parts.append(name)
        self.shard, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.parts)
        final = {
            p: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            for i, p in enumerate(self.parts)
        }
        for p, f in final.items():
            (self.dst / p).replace(self.dst / f)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {k: final[v] for k, v in self.weight_map.items()},
            }
            (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation and preprocessor configs travel with the weights."""
    import shutil

    for f in src.iterdir():
        if (
            f.is_file()
            and f.suffix in (".json", ".jinja", ".txt", ".model")
            and f.name
            not in (
                "config.json",
                "model.safetensors.index.json",
            )
        ):
            shutil.copy2(f, dst / f.name)
