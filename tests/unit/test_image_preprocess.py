"""GLM-4.1V image preprocessing equals transformers' Glm4vImageProcessorPil (bit for bit) and fails clearly."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoglm.errors import MediaError
from autoglm.multimodal.image import (
    ImageProcessorConfig,
    image_inputs,
    preprocess_image,
    resized_size,
    slot_grid,
    smart_resize,
)

# A small budget keeps the oracle fast while still exercising the down-scaling branch.
MAX_PIXELS = 28 * 28 * 160
MIN_PIXELS = 112 * 112


@pytest.fixture(scope="module")
def reference():
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    return Glm4vImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})


def _random_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    shape = (h, w) if bands == 1 else (h, w, bands)
    # smooth-ish content so bicubic resampling has something real to do
    base = rng.integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(base, mode)


def _png_roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()))


CASES = [
    (64, 48, "RGB"),
    (333, 517, "RGBA"),  # alpha composited on white
    (20, 90, "L"),  # smaller than one merged patch: scaled up
    (640, 480, "RGB"),  # over the pixel budget: scaled down
    (1, 1, "RGB"),
    (57, 1200, "LA"),
    (300, 28, "RGB"),
]


@pytest.mark.parametrize("w,h,mode", CASES)
def test_matches_transformers(reference, w: int, h: int, mode: str) -> None:
    img = _png_roundtrip(_random_image(w, h, mode, seed=w * 7 + h))
    ref = reference(images=[img], return_tensors="pt")
    cfg = ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pixels, grid = preprocess_image(img, cfg)
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels, ref["pixel_values"])
    # the token count callers are told equals what the processor produces
    t, gh, gw = ref["image_grid_thw"][0].tolist()
    inputs = image_inputs(img, cfg)
    assert inputs.n_slots == t * gh * gw // 4 and inputs.slot_grid == (t, gh // 2, gw // 2)
    assert torch.equal(inputs.data["pixel_values"], pixels) and inputs.grid == grid
    assert reference.get_number_of_image_patches(h, w) == t * gh * gw


def test_batch_of_two_matches_concatenation(reference) -> None:
    imgs = [_random_image(100, 60, "RGB", 1), _random_image(45, 150, "RGB", 2)]
    ref = reference(images=imgs, return_tensors="pt")
    cfg = ImageProcessorConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ours = [preprocess_image(i, cfg) for i in imgs]
    assert torch.equal(torch.cat([p for p, _ in ours]), ref["pixel_values"])
    assert [list(g) for _, g in ours] == ref["image_grid_thw"].tolist()


def test_smart_resize_matches_transformers() -> None:
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as ref_resize

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 150:
            continue
        max_px = int(rng.choice([28 * 28 * 100, 28 * 28 * 2000, 28 * 28 * 15000]))
        expect = ref_resize(2, h, w, temporal_factor=2, factor=28, min_pixels=MIN_PIXELS, max_pixels=max_px)
        assert smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=max_px) == expect


def test_screenshot_token_count() -> None:
    # API_NOTES: a 1080x2400 phone screenshot costs about 3.1-3.4k image tokens with GLM-4.1V defaults.
    w, h = resized_size(1080, 2400)
    t, gh, gw = slot_grid((1, h // 14, w // 14), ImageProcessorConfig())
    assert t == 1 and 3000 <= t * gh * gw <= 3500


def test_config_from_preprocessor_json(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 3136, "longest_edge": 28 * 28 * 50},
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
                "image_processor_type": "Glm4vImageProcessor",
            }
        )
    )
    cfg = ImageProcessorConfig.from_dir(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 28 * 28 * 50)
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.25, 0.25, 0.25)
    img = _random_image(500, 400, "RGB", 3)
    pixels, grid = preprocess_image(img, cfg)
    assert grid[1] * grid[2] * 14 * 14 * 2 <= 28 * 28 * 50
    # normalisation used the file's mean/std: values span (0 - .5)/.25 .. (1 - .5)/.25
    assert pixels.min() >= -2.0 - 1e-6 and pixels.max() <= 2.0 + 1e-6
    # older spelling
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 1000, "max_pixels": 200000}))
    cfg2 = ImageProcessorConfig.from_dir(tmp_path)
    assert (cfg2.min_pixels, cfg2.max_pixels) == (1000, 200000)
    assert ImageProcessorConfig.from_dir(tmp_path / "absent") == ImageProcessorConfig()


def test_not_an_image_is_media_error() -> None:
    with pytest.raises(MediaError, match="PIL.Image"):
        preprocess_image(b"\x89PNG not really")  # type: ignore[arg-type]
    with pytest.raises(MediaError, match="PIL.Image"):
        preprocess_image(np.zeros((10, 10, 3), dtype=np.uint8))  # type: ignore[arg-type]


def test_truncated_image_is_media_error() -> None:
    buf = io.BytesIO()
    _random_image(200, 200, "RGB", 4).save(buf, format="PNG")
    img = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))  # header fine, pixel data cut
    with pytest.raises(MediaError, match="decode"):
        preprocess_image(img)


def test_degenerate_sizes_are_media_errors() -> None:
    with pytest.raises(MediaError, match=r"aspect ratio 300 \(3000x10\) is over") as info:
        preprocess_image(Image.new("RGB", (3000, 10)))
    assert info.value.param == "image_url"
    with pytest.raises(MediaError, match=r"\(1x10000\)"):  # the size sent, not the upscaled one
        preprocess_image(Image.new("RGB", (1, 10000)))
    with pytest.raises(MediaError, match="empty"):
        smart_resize(0, 10)
    with pytest.raises(MediaError, match="empty"):
        preprocess_image(Image.new("RGB", (0, 0)))
