"""llama.cpp's own converter -> GGUF + mmproj -> autoglm, against transformers; and our writer against that converter.

Needs llama-cpp-python (its sdist carries vendor/llama.cpp/convert_hf_to_gguf.py): skips with the reason otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoglm.gguf.reader import GGUFFile
from autoglm.gguf.writer import convert_mmproj, convert_text
from autoglm.llm import LLM
from tests.interop.helpers import TEXTS, chat_ids, image, ours_and_reference, rel_err

# Error allowed relative to the logit scale: f32 is the same arithmetic; q8_0 carries its weight rounding.
pytestmark = pytest.mark.llamacpp
TOLERANCE = {"f32": 1e-3, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def llamacpp_files(llamacpp_converter, interop_glm4v_dir: Path, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """outtype -> (text GGUF, mmproj GGUF) written by llama.cpp's converter."""
    out = tmp_path_factory.mktemp("llamacpp_converted")
    files = {}
    for t in TOLERANCE:
        text = llamacpp_converter(interop_glm4v_dir, out / f"model-{t}.gguf", t)
        mm = llamacpp_converter(interop_glm4v_dir, out / f"mmproj-model-{t}.gguf", t, mmproj=True)
        files[t] = (text, mm)
    return files


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_llamacpp_converted_model_matches_transformers(
    llamacpp_files, interop_glm4v_dir: Path, hf_glm4v_reference, outtype: str
) -> None:
    text, mm = llamacpp_files[outtype]
    llm = LLM(text, mmproj=mm, dtype="float32")
    assert "image" in llm.model.encoders and llm.model.missing_projector is None
    ref = hf_glm4v_reference(interop_glm4v_dir)
    errors = []
    for k, (t, images) in enumerate(
        [(TEXTS[0], []), (TEXTS[1], []), (TEXTS[0], [image(90, 50, 1)]), (TEXTS[2], [image(40, 130, 2)])]
    ):
        ours, expect = ours_and_reference(llm, ref, chat_ids(llm, t, with_image=bool(images)), images)
        errors.append(rel_err(ours, expect))
        assert errors[-1] <= TOLERANCE[outtype], f"prompt {k}: error {errors[-1]:.3g} of the logit scale"
    print(f"{outtype}: max logit error / scale = {max(errors):.2e} (text, text, image, image)")


def _same_file_content(a: Path, b: Path) -> None:
    fa, fb = GGUFFile(a), GGUFFile(b)
    assert set(fa.metadata) == set(fb.metadata), (set(fa.metadata) ^ set(fb.metadata))
    for key, va in fa.metadata.items():
        vb = fb.metadata[key]
        assert fa.value_types[key] == fb.value_types[key], key
        if isinstance(va, np.ndarray):
            assert np.array_equal(va, vb), key
        else:
            assert va == vb, key
    assert list(fa.tensors) and set(fa.tensors) == set(fb.tensors)
    for name, ta in fa.tensors.items():
        tb = fb.tensors[name]
        assert (ta.qtype, ta.shape) == (tb.qtype, tb.shape), name
        assert np.array_equal(fa.raw(ta), fb.raw(tb)), f"{name}: data differs"


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_our_writer_writes_what_llamacpp_writes(llamacpp_files, interop_glm4v_dir: Path, tmp_path, outtype) -> None:
    """Same metadata (keys, types, values) and the same tensors, byte for byte, for the text file and the mmproj."""
    text, mm = llamacpp_files[outtype]
    # general.name comes from the directory name in both; write from the same directory
    ours_text = convert_text(interop_glm4v_dir, tmp_path / "ours.gguf", outtype=outtype)
    ours_mm = convert_mmproj(interop_glm4v_dir, tmp_path / "mmproj-ours.gguf", outtype=outtype)
    _same_file_content(text, ours_text)
    _same_file_content(mm, ours_mm)


def test_q8_0_mmproj_keeps_its_blocks_and_the_plan_prices_what_is_held(llamacpp_files) -> None:
    """A Q8_0 mmproj: the tower's linears stay Q8_0 GGUFLinears on the decoder's kernels (packed), the rest float32;
    `autoglm plan MODEL.gguf --mmproj` prices exactly those bytes, and one image from the mmproj's own processor."""
    import torch

    from autoglm.layers.linear.gguf import GGUFLinear
    from autoglm.tools.image_memory import image_patches
    from autoglm.tools.plan import plan_model

    text, mm = llamacpp_files["q8_0"]
    llm = LLM(text, mmproj=mm, dtype="float32")
    tower = llm.model.encoders["image"].visual
    kept = [m for m in tower.modules() if isinstance(m, GGUFLinear)]
    f = GGUFFile(mm)
    q8 = [n for n, t in f.tensors.items() if t.qtype.name == "Q8_0"]
    assert kept and len(kept) == len(q8), (len(kept), q8)
    assert all(m.weight_format.packed == m.impl.can_pack(m.weight_format.unpacked()) for m in kept)
    dense = list(tower.parameters())
    assert all(p.dtype == torch.float32 for p in dense)
    held = sum(p.numel() * 4 for p in dense) + sum(m.weight.numel() for m in kept)
    info = next(m for m in llm.model.modules if m.name == "vision")
    assert info.bytes == held and "kept" in info.quantization
    plan = plan_model(str(text), mmproj=str(mm), image_size=(1080, 2400))
    vision = next(m for m in plan.modules if m.name == "vision")
    assert vision.bytes == held
    assert vision.parameters == sum(p.numel() for p in dense) + sum(m.in_features * m.out_features for m in kept)
    assert plan.image_patches == image_patches(llm.model.encoders["image"].image_processor, (1080, 2400)) > 0
    assert plan.total_bytes == plan.weight_bytes + plan.kv_bytes + plan.overhead_bytes + plan.image_bytes
