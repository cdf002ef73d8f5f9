"""Which architecture module serves a checkpoint: ONE table of HF `architectures`, `model_type` fallbacks and GGUF
`general.architecture` names -> the module (imported lazily, so loading a GLM checkpoint does not import Gemma).

An architecture module (autoglm/models/<arch>.py) provides, at module level:

    from_hf(config_dict, *, no_vision=False) -> nn.Module     the model for a config.json (build it on `meta`)
    from_gguf(f: GGUFFile) -> nn.Module                       the text decoder for a GGUF's metadata (on `meta`)
    gguf_fixups(model) -> (our name, tensor) -> tensor        undo the converter's layout changes (GGUF -> ours)
    gguf_export_fixups(model) -> (name, tensor) -> tensor     redo them (ours -> GGUF; the converter's layout)
    hf_config(model) -> dict                                  config.json of a model built from_gguf (export)
    GGUF_ARCH: str                                            `general.architecture` it writes
optionally `checkpoint_to_param(name) -> name | None` (checkpoint tensor names -> ours), `MODULES` (module names for
device maps, default ("decoder",)), `VISION_PREFIX` (our names of the vision tower) and
`encoders(model, model_dir) -> {modality: Encoder}`.
Adding an architecture = its module + one row here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from autoglm.errors import ConfigError, UnsupportedArchitecture

Rename = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Arch:
    module: str  # autoglm.models.<arch>
    hf: tuple[str, ...] = ()  # config.json `architectures`
    model_types: tuple[str, ...] = ()  # config.json `model_type` when `architectures` is absent
    gguf: tuple[str, ...] = ()  # GGUF `general.architecture`


ARCHITECTURES: tuple[Arch, ...] = (
    Arch("autoglm.models.glm4", ("Glm4ForCausalLM",), ("glm4",), ("glm4",)),
    Arch("autoglm.models.glm4v", ("Glm4vForConditionalGeneration",), ("glm4v",)),
    Arch("autoglm.models.gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), ("gemma3",)),
    Arch("autoglm.models.llama", ("LlamaForCausalLM", "MistralForCausalLM"), ("llama", "mistral"), ("llama",)),
    Arch("autoglm.models.qwen2", ("Qwen2ForCausalLM",), ("qwen2",), ("qwen2",)),
    Arch("autoglm.models.qwen3", ("Qwen3ForCausalLM",), ("qwen3",), ("qwen3",)),
)


def _identity(name: str) -> str | None:
    return name


def _import(arch: Arch) -> ModuleType:
    try:
        return importlib.import_module(arch.module)
    except ImportError as e:
        raise UnsupportedArchitecture(f"{arch.module} is not available in this build: {e}") from e


@dataclass(frozen=True)
class ModelSpec:
    """How to build and fill one HF architecture (read from its module).

    build(config_json_dict, no_vision) -> model (call it under `torch.device("meta")`)
    rename(checkpoint name) -> our parameter name, or None to drop the tensor on purpose
    vision_prefix: our names under it are the vision tower (own device; dropped with no_vision)
    encoders(model, model_dir) -> {modality: Encoder} once the model is filled (skipped with no_vision)
    """

    architecture: str
    module: ModuleType

    def build(self, config: dict[str, Any], no_vision: bool) -> nn.Module:
        return self.module.from_hf(config, no_vision=no_vision)

    @property
    def rename(self) -> Rename:
        return getattr(self.module, "checkpoint_to_param", _identity)

    @property
    def vision_prefix(self) -> str | None:
        return getattr(self.module, "VISION_PREFIX", None)

    @property
    def modules(self) -> tuple[str, ...]:
        """Module names the model declares (device map keys, `ModuleInfo` rows): `MODULES`, default decoder only."""
        return tuple(getattr(self.module, "MODULES", ("decoder",)))

    @property
    def encoders(self) -> Callable[[nn.Module, Path], dict[str, Any]] | None:
        return getattr(self.module, "encoders", None)


def hf_spec(config: dict[str, Any], *, source: str = "config.json") -> ModelSpec:
    """The spec for an HF config.json dict; UnsupportedArchitecture names it and lists the supported ones."""
    archs = config.get("architectures")
    if archs is None:
        mt = config.get("model_type")
        for a in ARCHITECTURES:
            if mt in a.model_types:
                return ModelSpec(a.hf[0], _import(a))
        raise ConfigError(
            f"{source}: no 'architectures' (and model_type {mt!r} is not one we know)", param="architectures"
        )
    if isinstance(archs, str):
        archs = [archs]
    for name in archs:
        for a in ARCHITECTURES:
            if name in a.hf:
                return ModelSpec(name, _import(a))
    raise UnsupportedArchitecture(
        f"{source}: unsupported architecture {', '.join(map(str, archs)) or '(empty)'}; "
        f"supported: {', '.join(supported_architectures())}",
        param="architectures",
    )


def gguf_module(architecture: str, *, source: str = "gguf") -> ModuleType:
    """GGUF `general.architecture` -> its architecture module; UnsupportedArchitecture lists the supported ones."""
    for a in ARCHITECTURES:
        if architecture in a.gguf:
            return _import(a)
    raise UnsupportedArchitecture(
        f"{source}: unsupported GGUF architecture {architecture!r}; supported: {', '.join(gguf_architectures())}",
        param="general.architecture",
    )


def supported_architectures() -> list[str]:
    return sorted(n for a in ARCHITECTURES for n in a.hf)


def gguf_architectures() -> list[str]:
    return sorted(n for a in ARCHITECTURES for n in a.gguf)
