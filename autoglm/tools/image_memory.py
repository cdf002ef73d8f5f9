"""Peak memory of one image through a GLM-4.1V-style vision encoder, for `autoglm.tools.plan`.

Counted from what `autoglm.multimodal.image.preprocess_image` and `autoglm.models.glm4v_vision` hold at their
peaks (each term below names its buffers; checked with `benchmarks/plan_check.py --image`):
- the image as sent, per pixel of the original: the request's encoded file at worst (an incompressible PNG, 3 B) and
  its base64 text (4), and the decoded image (3), held while the request lives;
- preprocessing, per resized pixel: the resized RGB image and its numpy copy (3 + 3 B), the float64 rescale (24; numpy
  multiplies that temporary in place) and the float32 result (12) alive together;
- the tower, with `pixel_values` (C*T*P*P float32) alive throughout: attention holds x, norm1(x), qkv (3D), the two
  rotated q/k, the SDPA inputs' contiguous copies (3D), its output and `out` = 12D; the SwiGLU MLP holds x,
  norm2(x), act(gate), up and their product = 2D + 3I (I = `out_hidden_size`, the tower's MLP width);
- the merger, per merged token: the [m*m*D] regrouped input, the downsample and projection outputs (2 x O) and the
  SwiGLU's three [intermediate_size] buffers;
- the image's decoder embeddings [merged, O] (kept until its prompt is prefilled; in the encoder cache after).
The largest image the processor lets through is `max_pixels` / (T * P * P) patches (`max_pixels` counts both
temporal frames, as GLM-4.1V's `smart_resize` does): the plan prices that one unless told an image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autoglm.multimodal.image import ImageProcessorConfig, resized_size

ORIGINAL_BYTES_PER_PIXEL = 3 + 4 + 3  # encoded file (worst case) + its base64 text + the decoded image
PREPROCESS_BYTES_PER_PIXEL = 3 + 3 + 24 + 12  # resized RGB + numpy copy + float64 rescale + float32 result


@dataclass(frozen=True)
class ImageMemory:
    patches: int
    size: tuple[int, int] | None  # (width, height) as sent; None: the processor's largest image
    peak_bytes: int  # the larger of preprocessing and encoding, plus the embeddings it leaves


def image_patches(cfg: ImageProcessorConfig, size: tuple[int, int] | None) -> int:
    """Patches of an image of `size` (width, height) after resizing; None: the largest the processor allows."""
    p, t = cfg.patch_size, cfg.temporal_patch_size
    if size is None:
        m = cfg.factor
        return cfg.max_pixels // (t * m * m) * cfg.merge_size**2  # whole merge blocks only
    w, h = resized_size(size[0], size[1], cfg)
    return (w // p) * (h // p)


def image_memory(
    vision: dict[str, Any], cfg: ImageProcessorConfig, act_bytes: int, size: tuple[int, int] | None = None
) -> ImageMemory:
    """Peak bytes of one image (see the module docstring) for a vision config (HF `vision_config` keys)."""
    n = image_patches(cfg, size)
    d = int(vision["hidden_size"])
    out = int(vision.get("out_hidden_size") or d)
    inter = int(vision.get("intermediate_size") or 4 * d)
    p, t, m = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
    channels = int(vision.get("in_channels", 3))
    original = (size[0] * size[1] if size is not None else n * p * p) * ORIGINAL_BYTES_PER_PIXEL
    pixel_values = n * channels * t * p * p * 4  # float32 whatever the model dtype
    preprocess = n * p * p * PREPROCESS_BYTES_PER_PIXEL
    tower = n * max(12 * d, 2 * d + 3 * out) * act_bytes
    merged = n // (m * m)
    merger = merged * (m * m * d + 2 * out + 3 * inter) * act_bytes
    embeddings = merged * out * act_bytes
    peak = original + max(preprocess, pixel_values + max(tower, merger)) + embeddings
    return ImageMemory(patches=n, size=size, peak_bytes=peak)
