"""GLM-4.1V / AutoGLM-Phone: the M-RoPE text model + vision tower + lm_head, and the image `Encoder` around the tower.

Parameter names (ours) and the checkpoint names that fill them (`checkpoint_to_param`):

    ours                      transformers 5.x checkpoint       older checkpoint (transformers < 4.54)
    language_model.<rest>     model.language_model.<rest>       model.<rest>      (embed_tokens, layers.N.*, norm)
    visual.<rest>             model.visual.<rest>               visual.<rest>
    lm_head.weight            lm_head.weight                    lm_head.weight    (tied to embed_tokens if configured)

`<rest>` is the same on both sides (HF attribute names throughout). Built with `no_vision=True` the model has no
`visual`; loaders consume and drop the tensors `is_vision_param` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autoglm.errors import ConfigError
from autoglm.layers.attention import AttentionContext
from autoglm.layers.linear import Linear
from autoglm.models.config import TextConfig, VisionConfig
from autoglm.models.glm4 import Glm4vTextModel
from autoglm.models.glm4v_vision import Glm4vVisionModel
from autoglm.models.positions import MediaSpan, PromptPositions, mrope_positions
from autoglm.multimodal.encoder import EncoderInputs
from autoglm.multimodal.image import ImageEncoderBase, ImageProcessorConfig

IMAGE_PLACEHOLDER = "<|image|>"


def checkpoint_to_param(name: str) -> str:
    """Checkpoint tensor name (either spelling) -> our parameter name. Unknown names come back unchanged."""
    for prefix, ours in (
        ("model.language_model.", "language_model."),
        ("model.visual.", "visual."),
        ("language_model.model.", "language_model."),  # some conversion scripts nest the text model once more
        ("model.", "language_model."),
    ):
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name


def is_vision_param(name: str) -> bool:
    """True for parameters of the vision tower (ours or checkpoint spelling)."""
    return checkpoint_to_param(name).startswith("visual.")


class Glm4vForConditionalGeneration(nn.Module):
    """Implements autoglm.models.base.DecoderModel (positions [3, T], uses_mrope=True) by delegating to
    `language_model`; `visual` (None when built with no_vision) turns images into embeddings for the runner to merge
    at the image-token positions."""

    uses_mrope = True
    position_rows = 3

    def __init__(
        self,
        text_config: TextConfig,
        vision_config: VisionConfig | None,
        *,
        no_vision: bool = False,
        image_processor: ImageProcessorConfig | None = None,
    ) -> None:
        super().__init__()
        if not text_config.uses_mrope:
            raise ConfigError("GLM-4.1V text config has no mrope_section", param="rope_parameters.mrope_section")
        if vision_config is not None and vision_config.out_hidden_size != text_config.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size {vision_config.out_hidden_size} != text hidden_size "
                f"{text_config.hidden_size}",
                param="vision_config.out_hidden_size",
            )
        self.config = text_config
        self.vision_config = vision_config
        self.image_processor = image_processor or ImageProcessorConfig(
            patch_size=vision_config.patch_size if vision_config else 14,
            temporal_patch_size=vision_config.temporal_patch_size if vision_config else 2,
            merge_size=vision_config.spatial_merge_size if vision_config else 2,
        )
        self.language_model = Glm4vTextModel(text_config)
        self.visual: Glm4vVisionModel | None = (
            Glm4vVisionModel(vision_config) if vision_config is not None and not no_vision else None
        )
        self.lm_head = Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.vocab_size = text_config.vocab_size
        self.hidden_size = text_config.hidden_size
        self.max_position_embeddings = text_config.max_position_embeddings
        self.image_token_id = text_config.image_token_id
        self.spatial_merge_size = vision_config.spatial_merge_size if vision_config else 2
        self.tie_weights()

    # --- loading ----------------------------------------------------------------------------------------------
    checkpoint_to_param = staticmethod(checkpoint_to_param)
    is_vision_param = staticmethod(is_vision_param)

    def tied_parameters(self) -> dict[str, str]:
        """Parameters that are another parameter (name -> source name); loaders fill only the source."""
        return {"lm_head.weight": "language_model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    # --- DecoderModel -----------------------------------------------------------------------------------------
    def prompt_positions(self, num_tokens: int, spans: Sequence[MediaSpan]) -> PromptPositions:
        return mrope_positions(num_tokens, spans)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.language_model.embed_tokens(input_ids)

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        # input_ids: [T]; positions: [3, T] (or [T] for text-only); -> hidden [T, D]
        return self.language_model(input_ids, positions, ctx, inputs_embeds)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        # hidden: [N, D] -> [N, vocab] float32
        return self.lm_head(hidden).float()

    # --- vision -----------------------------------------------------------------------------------------------
    def vision_encoder(self, image_processor: ImageProcessorConfig | None = None) -> VisionEncoder | None:
        """The image encoder over `visual`, or None when the model was built without vision."""
        if self.visual is None:
            return None
        return VisionEncoder(self, image_processor or self.image_processor)


class VisionEncoder(ImageEncoderBase):
    """autoglm.multimodal.encoder.Encoder for images: PIL image -> patches (CPU) -> `visual` -> [n_slots, D].

    `encode` runs on the tower's device and returns the decoder's dtype on that device."""

    placeholder = IMAGE_PLACEHOLDER

    def __init__(self, model: Glm4vForConditionalGeneration, image_processor: ImageProcessorConfig) -> None:
        if model.visual is None:
            raise ValueError("VisionEncoder needs a model built with its vision tower")
        if model.image_token_id is None:
            raise ConfigError("config.json has no image_token_id", param="image_token_id")
        self.visual: Glm4vVisionModel = model.visual
        self._model = model
        self.placeholder_id = int(model.image_token_id)
        self.image_processor = image_processor
        self.merge_size = model.spatial_merge_size
        if image_processor.merge_size != self.merge_size or image_processor.patch_size != self.visual.patch_size:
            raise ConfigError(
                f"preprocessor (patch {image_processor.patch_size}, merge {image_processor.merge_size}) does not "
                f"match vision_config (patch {self.visual.patch_size}, merge {self.merge_size})",
                param="preprocessor_config.merge_size",
            )

    @property
    def device(self) -> torch.device:
        return self.visual.device

    @property
    def out_dtype(self) -> torch.dtype:
        return self._model.language_model.embed_tokens.weight.dtype

    def encode(self, inputs: EncoderInputs) -> Tensor:
        """-> [inputs.n_slots, decoder hidden], decoder dtype, on `self.device`."""
        return self.encode_batch([inputs])[0]

    def encode_batch(self, items: Sequence[EncoderInputs]) -> list[Tensor]:
        """Several images in one packed tower call (attention stays within each image)."""
        if not items:
            return []
        dtype = self.visual.dtype
        pixels = torch.cat([it.data["pixel_values"] for it in items]).to(self.device, dtype)
        with torch.inference_mode():
            out = self.visual(pixels, [it.grid for it in items])  # [sum n_slots, D]
        return list(out.to(self.out_dtype).split([it.n_slots for it in items]))


def build_glm4v(
    config_dict: dict[str, Any], *, no_vision: bool = False, image_processor: ImageProcessorConfig | None = None
) -> Glm4vForConditionalGeneration:
    """HF config.json dict -> Glm4vForConditionalGeneration on the `meta` device (the loader fills it)."""
    text = TextConfig.from_dict(config_dict)
    vision = VisionConfig.from_dict(config_dict)
    if vision is None and not no_vision:
        raise ConfigError(
            "GLM-4.1V config.json has no vision_config (load with no_vision to run text-only)", param="vision_config"
        )
    with torch.device("meta"):
        return Glm4vForConditionalGeneration(text, vision, no_vision=no_vision, image_processor=image_processor)


# --- the architecture interface (autoglm.models.registry); GGUF text files are `glm4` (autoglm.models.glm4) ----
VISION_PREFIX = "visual."
MODULES = ("decoder", "vision")  # device-map keys; the tower may sit on its own device
GGUF_ARCH = "glm4"  # the text model; `autoglm.gguf.writer.convert_mmproj` writes the tower


def gguf_export_fixups(model: nn.Module) -> Any:
    """The text model's q/k rows in llama.cpp's M-RoPE (NeoX) order, as `autoglm.models.glm4` does."""
    from autoglm.models.glm4 import gguf_export_fixups as text_fixups

    return text_fixups(model)


def from_hf(config: dict[str, Any], *, no_vision: bool = False) -> Glm4vForConditionalGeneration:
    return build_glm4v(config, no_vision=no_vision)


def encoders(model: nn.Module, root: Path) -> dict[str, Any]:
    """{"image": VisionEncoder} of a filled model (none when it was built without its tower)."""
    encoder = model.vision_encoder(ImageProcessorConfig.from_dir(root))  # type: ignore[operator]
    return {} if encoder is None else {encoder.modality: encoder}


__all__ = [
    "Glm4vForConditionalGeneration",
    "VisionEncoder",
    "build_glm4v",
    "checkpoint_to_param",
    "is_vision_param",
    "IMAGE_PLACEHOLDER",
]
