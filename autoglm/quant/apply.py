"""Swap a model's dense linear layers for INT8/INT4 ones, and the `quantization_config` that records it.

Which layers (our choice, recorded in config.json so a loader never guesses from file names):
- every `autoglm.layers.linear.Linear` / `nn.Linear` of the text decoder;
- not the vision tower (`skip`, default: the model's vision prefix): it runs once per image, is compute-bound (so
  4/8-bit weights do not speed it up) and is the accuracy-sensitive part for GUI screenshots; ~0.6 B params;
- not a tied `lm_head` (it is the embedding matrix; quantizing it would store a second copy);
- with int4, `lm_head` goes int8 (like llama.cpp's Q4_K_M keeps `output` at Q6_K: logits are sensitive);
- an int4 layer whose `in_features` is not a multiple of the group size falls back to int8.

config.json entry written by `autoglm.tools.quantize.quantize_hf_checkpoint` (read by `QuantSpec.from_config`):
    "quantization_config": {"quant_method": "autoglm", "format": "int8"|"int4", "group_size": 32,
                            "skip_modules": ["visual."], "module_formats": {"lm_head": "int8"}}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoglm.errors import ConfigError, UnsupportedQuantType
from autoglm.layers.linear.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES, Int4Linear
from autoglm.layers.linear.int8 import Int8Linear

log = logging.getLogger(__name__)

QUANT_METHOD = "autoglm"
MODES = ("int8", "int4")


def _dense_types() -> tuple[type[nn.Module], ...]:
    from autoglm.layers.linear import Linear

    return (Linear, nn.Linear)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how. Prefixes match our module names (`name == p` or `name.startswith(p)`)."""

    mode: str  # "int8" | "int4"
    group_size: int = DEFAULT_GROUP_SIZE
    skip_modules: tuple[str, ...] = ()
    module_formats: dict[str, str] = field(default_factory=dict)  # prefix -> "int8" | "int4" | "none"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UnsupportedQuantType(f"unknown quantization {self.mode!r}; supported: {', '.join(MODES)}")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise UnsupportedQuantType(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size}")
        for prefix, fmt in self.module_formats.items():
            if fmt not in (*MODES, "none"):
                raise UnsupportedQuantType(f"module_formats[{prefix!r}] = {fmt!r}; expected int8, int4 or none")

    def format_for(self, name: str) -> str:
        """ "int8" | "int4" | "none" for the module called `name`."""
        if any(_matches(name, p) for p in self.skip_modules):
            return "none"
        best = ""
        for prefix in self.module_formats:
            if _matches(name, prefix) and len(prefix) > len(best):
                best = prefix
        return self.module_formats[best] if best else self.mode

    def to_config(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format": self.mode,
            "group_size": self.group_size,
            "skip_modules": list(self.skip_modules),
            "module_formats": dict(self.module_formats),
        }

    @classmethod
    def from_config(cls, qc: dict[str, Any], *, source: str = "config.json") -> QuantSpec:
        if qc.get("quant_method") != QUANT_METHOD:
            raise ConfigError(
                f"{source}: quantization_config.quant_method {qc.get('quant_method')!r} is not supported "
                f"(supported: {QUANT_METHOD!r})",
                param="quantization_config",
            )
        try:
            return cls(
                mode=str(qc["format"]),
                group_size=int(qc.get("group_size", DEFAULT_GROUP_SIZE)),
                skip_modules=tuple(qc.get("skip_modules", ())),
                module_formats=dict(qc.get("module_formats", {})),
            )
        except (KeyError, TypeError, ValueError, UnsupportedQuantType) as e:
            raise ConfigError(f"{source}: invalid quantization_config ({e})", param="quantization_config") from e


def _matches(name: str, prefix: str) -> bool:
    p = prefix.rstrip(".")
    return name == p or name.startswith(p + ".")


def quantization_from_config(config: dict[str, Any], *, source: str = "config.json") -> QuantSpec | None:
    """The QuantSpec recorded in a config.json dict, or None for a dense checkpoint."""
    qc = config.get("quantization_config")
    return None if qc is None else QuantSpec.from_config(qc, source=source)


def default_spec(
    model: nn.Module,
    mode: str,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    vision_prefix: str | None = None,
    skip: Iterable[str] = (),
) -> QuantSpec:
    """The defaults described in the module docstring for `model`."""
    skips = list(skip)
    if vision_prefix:
        skips.append(vision_prefix)
    tied = getattr(model, "tied_parameters", None)
    for name in dict(tied()) if callable(tied) else {}:
        skips.append(name.rsplit(".", 1)[0])
    formats: dict[str, str] = {}
    if mode == "int4":
        for name, mod in model.named_modules():
            if name.endswith("lm_head") and isinstance(mod, _dense_types()):
                formats[name] = "int8"
    return QuantSpec(mode=mode, group_size=group_size, skip_modules=tuple(skips), module_formats=formats)


def _quantized(mod: nn.Module, fmt: str, spec: QuantSpec, name: str, compute_dtype: torch.dtype) -> nn.Module:
    if fmt == "int4":
        in_f = mod.weight.shape[1]
        if in_f % spec.group_size == 0:
            return Int4Linear.from_linear(mod, group_size=spec.group_size, compute_dtype=compute_dtype)
        log.info("%s: in_features %d not a multiple of group size %d; using int8", name, in_f, spec.group_size)
    return Int8Linear.from_linear(mod, compute_dtype=compute_dtype)


def apply_quantization(
    model: nn.Module,
    mode: str | QuantSpec,
    *,
    skip: Iterable[str] = (),
    group_size: int = DEFAULT_GROUP_SIZE,
    vision_prefix: str | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Replace dense linear layers in place (returns `model`). `mode` "int8"/"int4" uses `default_spec`; a QuantSpec
    (e.g. from config.json) is applied as recorded. A model on `meta` gets empty quantized shells of the right
    shapes, ready to be filled by name (`autoglm.loader.weights.fill_parameters`); call `finalize_quantization` after.
    """
    spec = (
        mode
        if isinstance(mode, QuantSpec)
        else default_spec(model, mode, group_size=group_size, vision_prefix=vision_prefix, skip=skip)
    )
    dense = _dense_types()
    targets = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, dense) and spec.format_for(name) != "none"
    ]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _quantized(mod, spec.format_for(name), spec, name, compute_dtype))
    return model


def finalize_quantization(model: nn.Module) -> None:
    """After filling: repack int4 layers into the kernel layout and align int8 weights now, not on a first forward."""
    for mod in model.modules():
        if isinstance(mod, (Int4Linear, Int8Linear)):
            mod.prepare()


def quantized_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held per format ("int8", "int4", dtype names for dense tensors), counting shared tensors once."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for mod in model.modules():
        fmt = getattr(mod, "format", None)
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = fmt if fmt in MODES else str(p.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out
