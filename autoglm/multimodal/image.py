"""GLM-4.1V image preprocessing: smart resize, bicubic resample, rescale, CLIP normalisation, patch flattening.

The output equals transformers' `Glm4vImageProcessorPil` bit for bit: `pixel_values [n_patches, C*T*P*P]` float32
with patches laid out merge-block-major (the vision tower's downsample relies on that order) and `grid_thw`.
Values come from `preprocessor_config.json` (both `size.{shortest,longest}_edge` and `min/max_pixels` spellings).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from autoglm.errors import ConfigError, MediaError
from autoglm.multimodal.encoder import EncoderInputs
from autoglm.multimodal.media import MediaPolicy, displayed_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Preprocessing constants; defaults are GLM-4.1V's."""

    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 15000
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        # resized sides are multiples of one merged patch
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        kw: dict[str, Any] = {}
        size = d.get("size") or {}
        if "shortest_edge" in size:
            kw["min_pixels"] = int(size["shortest_edge"])
        if "longest_edge" in size:
            kw["max_pixels"] = int(size["longest_edge"])
        # older processors: top-level min_pixels / max_pixels win only when `size` lacks them
        for key in ("min_pixels", "max_pixels"):
            if key not in kw and d.get(key) is not None:
                kw[key] = int(d[key])
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if d.get(key) is not None:
                kw[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                kw[key] = tuple(float(v) for v in d[key])
        for key in ("rescale_factor",):
            if d.get(key) is not None:
                kw[key] = float(d[key])
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                kw[key] = bool(d[key])
        return cls(**kw)

    @classmethod
    def from_dir(cls, path: str | Path) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` from a model directory; defaults when the file is absent."""
        f = Path(path) / "preprocessor_config.json"
        if not f.is_file():
            return cls()
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{f}: cannot read preprocessor config: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{f}: expected a JSON object")
        return cls.from_dict(d)


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = 112 * 112,
    max_pixels: int = 28 * 28 * 15000,
    num_frames: int = 2,
    temporal_factor: int = 2,
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, aspect kept, `num_frames*h*w` within [min, max] pixels.

    Same arithmetic as transformers' GLM-4.1V `smart_resize` (the budget counts the temporal factor)."""
    if height <= 0 or width <= 0:
        raise MediaError(f"image has an empty side ({width}x{height})")
    if num_frames < temporal_factor:
        raise MediaError(f"num_frames {num_frames} must be at least temporal_factor {temporal_factor}")
    sent = (width, height)
    if height < factor or width < factor:
        # tiny images are scaled up so their short side reaches one merged patch
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        ratio = max(sent) / min(sent)
        raise MediaError(
            f"image aspect ratio {ratio:.4g} ({sent[0]}x{sent[1]}) is over the model's limit of 200", param="image_url"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_image(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise MediaError(f"expected a decoded image (PIL.Image), got {type(image).__name__}")
    w, h = image.size
    if w < 1 or h < 1:
        raise MediaError(f"image is empty ({w}x{h})")
    return image


def resized_size(width: int, height: int, cfg: ImageProcessorConfig | None = None) -> tuple[int, int]:
    """(width, height) the image is resized to before patching."""
    cfg = cfg or ImageProcessorConfig()
    if not cfg.do_resize:
        return width, height
    h, w = smart_resize(
        height,
        width,
        factor=cfg.factor,
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        num_frames=cfg.temporal_patch_size,
        temporal_factor=cfg.temporal_patch_size,
    )
    return w, h


def slot_grid(grid: tuple[int, int, int], cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """(t, h, w) patch grid -> the (t, h, w) grid of decoder slots after the spatial merge."""
    t, h, w = grid
    m = cfg.merge_size
    if h % m or w % m:
        raise MediaError(f"patch grid {grid} is not divisible by the merge size {m}")
    return t, h // m, w // m


def patchify(pixels: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """pixels [C, H, W] float32 -> patches [gh*gw, C*T*P*P] in merge-block-major order, grid (1, gh, gw)."""
    c, height, width = pixels.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    # [C, gh/m, m, P, gw/m, m, P] -> [gh/m, gw/m, m, m, C, P, P]: patches of one merge block are adjacent
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    # a still image fills both temporal slots with the same frame
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * tp * p * p)), (1, gh, gw)


def preprocess_image(
    image: Image.Image, cfg: ImageProcessorConfig | None = None
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """PIL image -> (pixel_values [n_patches, C*T*P*P] float32, grid (t, h, w))."""
    cfg = cfg or ImageProcessorConfig()
    image = _check_image(image)
    try:
        rgb = displayed_rgb(image)  # as a browser shows it: EXIF, 16-bit grey, alpha onto white
        w, h = resized_size(rgb.width, rgb.height, cfg)
        if cfg.do_resize:
            rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
        arr = np.asarray(rgb)  # [H, W, 3] uint8
    except MediaError:
        raise
    except (OSError, ValueError) as e:  # truncated / undecodable pixel data surfaces on first access
        raise MediaError(f"cannot decode image: {e}") from e
    if h % cfg.factor or w % cfg.factor:
        raise MediaError(f"image size {w}x{h} is not a multiple of {cfg.factor} (resize disabled)")
    x = np.moveaxis(arr, -1, 0)  # [3, H, W]
    if cfg.do_rescale:
        # float64 product then float32, matching transformers' rounding exactly
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    patches, grid = patchify(x, cfg)
    return torch.from_numpy(patches), grid


# OpenAI chat (`image_url`), Responses API (`input_image`), HF processors (`image`) and in-process PIL parts.
IMAGE_PART_TYPES = ("image_url", "image", "input_image", "image_pil")


def image_inputs(media: Any, cfg: ImageProcessorConfig) -> EncoderInputs:
    """PIL image (or encoded image bytes) -> `EncoderInputs` (patches, patch grid, slot count and slot grid after
    the spatial merge, content hash); MediaError when it is not a usable image."""
    if isinstance(media, (bytes, bytearray)):
        try:
            media = Image.open(io.BytesIO(bytes(media)))
        except (OSError, ValueError) as e:
            raise MediaError(f"cannot decode image bytes: {e}") from e
    pixels, grid = preprocess_image(media, cfg)
    slots = slot_grid(grid, cfg)
    digest = hashlib.sha256()
    digest.update(f"{media.mode}:{media.width}x{media.height}:".encode())
    digest.update(media.tobytes())
    return EncoderInputs(
        modality="image",
        data={"pixel_values": pixels},
        grid=grid,
        n_slots=math.prod(slots),
        content_hash=digest.hexdigest(),
        meta={"width": media.width, "height": media.height},
        slot_grid=slots,
    )


def image_part_source(part: Mapping[str, Any]) -> Any:
    """The image a content part refers to: `{"type": "image_url", "image_url": {"url": ...}}`, `{"type":
    "input_image", "image_url": "..."}`, `{"type": "image", "image": <PIL | bytes | path>}`; None when absent."""
    kind = part.get("type")
    src = part.get(kind) if isinstance(kind, str) and kind in part else part.get("image_url", part.get("image"))
    if isinstance(src, Mapping):
        src = src.get("url")
    return src


class ImageEncoderBase:
    """The image half of `autoglm.multimodal.encoder.Encoder`; a vision model's encoder adds `placeholder`,
    `placeholder_id`, `device`, `image_processor` (its ImageProcessorConfig) and `encode`."""

    modality = "image"
    module_name = "vision"
    part_types: tuple[str, ...] = IMAGE_PART_TYPES
    image_processor: ImageProcessorConfig

    def load(self, part: Mapping[str, Any], policy: MediaPolicy | None) -> Any:
        src = image_part_source(part)
        if src is None:
            return None
        if isinstance(src, Path):
            src = str(src)
        return (policy or MediaPolicy()).load(src)

    def preprocess(self, media: Any) -> EncoderInputs:
        return image_inputs(media, self.image_processor)

    def sample(self) -> Image.Image:
        # the smallest image that survives GLM-4.1V's resize (factor 28) without upscaling artifacts mattering
        return Image.new("RGB", (56, 56), (127, 127, 127))
