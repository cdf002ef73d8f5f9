"""Which model class serves a checkpoint: HF `architectures` and GGUF `general.architecture` -> builders.

Model modules are imported lazily so that loading a GLM checkpoint does not import Gemma (and vice versa).
Each HF entry also says how checkpoint tensor names map to our parameter names and which of our names belong to
the vision tower (dropped when loading with no_vision).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from autoglm.errors import ConfigError, UnsupportedArchitecture
from autoglm.models.config import TextConfig

Rename = Callable[[str], "str | None"]


def _identity(name: str) -> str | None:
    return name


def glm4v_rename(name: str) -> str | None:
    """GLM-4.1V checkpoint tensor name (5.x `model.language_model.*` / `model.visual.*` or older `model.*` /
    `visual.*`) -> our parameter name; the table lives beside the model in autoglm.models.glm4v."""
    from autoglm.models.glm4v import checkpoint_to_param

    return checkpoint_to_param(name)


def _resolve(module: str, attr: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnsupportedArchitecture(f"{module}.{attr} is not available in this build: {e}") from e


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return _resolve(module, attr)(*args, **kwargs)

    return call


def _build_glm4(config: dict[str, Any], no_vision: bool) -> nn.Module:
    from autoglm.models.glm4 import Glm4ForCausalLM

    return Glm4ForCausalLM(TextConfig.from_dict(config))


def _build_glm4v(config: dict[str, Any], no_vision: bool) -> nn.Module:
    return _lazy("autoglm.models.glm4v", "build_glm4v")(config, no_vision=no_vision)


def _glm4v_encoders(model: nn.Module, root: Path) -> dict[str, Any]:
    from autoglm.multimodal.image import ImageProcessorConfig

    encoder = model.vision_encoder(ImageProcessorConfig.from_dir(root))  # type: ignore[operator]
    return {} if encoder is None else {encoder.modality: encoder}


def _build_gemma3(config: dict[str, Any], no_vision: bool) -> nn.Module:
    # Gemma 3 parses its own config.json fields (per-layer-type RoPE, sliding window pattern).
    config_cls = _resolve("autoglm.models.gemma3", "Gemma3Config")
    return _resolve("autoglm.models.gemma3", "Gemma3ForCausalLM")(config_cls.from_dict(config))


@dataclass(frozen=True)
class ModelSpec:
    """How to build and fill one HF architecture.

    build(config_json_dict, no_vision) -> model (call it under `torch.device("meta")`)
    rename(checkpoint name) -> our parameter name, or None to drop the tensor on purpose
    vision_prefix: our names under it are the vision tower (own device; dropped with no_vision)
    encoders(model, model_dir) -> {modality: Encoder} once the model is filled (skipped with no_vision)
    """

    architecture: str
    build: Callable[[dict[str, Any], bool], nn.Module]
    rename: Rename = _identity
    vision_prefix: str | None = None
    encoders: Callable[[nn.Module, Path], dict[str, Any]] | None = None


HF_ARCHITECTURES: dict[str, ModelSpec] = {
    "Glm4ForCausalLM": ModelSpec("Glm4ForCausalLM", _build_glm4),
    "Glm4vForConditionalGeneration": ModelSpec(
        "Glm4vForConditionalGeneration", _build_glm4v, glm4v_rename, vision_prefix="visual.", encoders=_glm4v_encoders
    ),
    "Gemma3ForCausalLM": ModelSpec("Gemma3ForCausalLM", _build_gemma3),
}
# config.json without `architectures`: fall back on model_type
_MODEL_TYPES = {"glm4": "Glm4ForCausalLM", "glm4v": "Glm4vForConditionalGeneration", "gemma3_text": "Gemma3ForCausalLM"}


def _glm4_from_text_config(config: TextConfig) -> nn.Module:
    from autoglm.models.glm4 import Glm4ForCausalLM

    return Glm4ForCausalLM(config)


# GGUF `general.architecture` -> builder(TextConfig) of the text decoder (GLM-4.1V text when config.uses_mrope).
GGUF_ARCHITECTURES: dict[str, Callable[[TextConfig], nn.Module]] = {
    "glm4": _glm4_from_text_config,
    "gemma3": _lazy("autoglm.models.gemma3", "Gemma3ForCausalLM"),
}


def hf_spec(config: dict[str, Any], *, source: str = "config.json") -> ModelSpec:
    """The spec for an HF config.json dict; UnsupportedArchitecture names it and lists the supported ones."""
    archs = config.get("architectures")
    if archs is None:
        mt = config.get("model_type")
        if mt in _MODEL_TYPES:
            return HF_ARCHITECTURES[_MODEL_TYPES[mt]]
        raise ConfigError(
            f"{source}: no 'architectures' (and model_type {mt!r} is not one we know)", param="architectures"
        )
    if isinstance(archs, str):
        archs = [archs]
    for arch in archs:
        if arch in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[arch]
    raise UnsupportedArchitecture(
        f"{source}: unsupported architecture {', '.join(map(str, archs)) or '(empty)'}; "
        f"supported: {', '.join(sorted(HF_ARCHITECTURES))}",
        param="architectures",
    )


def gguf_builder(architecture: str) -> Callable[[TextConfig], nn.Module]:
    """GGUF `general.architecture` -> builder(TextConfig); UnsupportedArchitecture lists the supported ones."""
    try:
        return GGUF_ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported GGUF architecture {architecture!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}",
            param="general.architecture",
        ) from None


def supported_architectures() -> list[str]:
    return sorted(HF_ARCHITECTURES)
