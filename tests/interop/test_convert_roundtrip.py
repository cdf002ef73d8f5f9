"""`autoglm convert` output loads back into autoglm close to transformers; mismatched mmproj files fail clearly.

No llama.cpp needed: these never skip.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from autoglm.errors import ModelLoadError
from autoglm.gguf.reader import GGUFFile
from autoglm.llm import LLM
from autoglm.loader import load_model
from tests.interop.conftest import run_cli
from tests.interop.helpers import TEXTS, chat_ids, image, ours_and_reference, rel_err

# Error allowed relative to the logit scale, per outtype (f32: same arithmetic; the rest carry their rounding).
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def converted(interop_glm4v_dir: Path, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """outtype -> (text GGUF, mmproj GGUF) written by `autoglm convert`."""
    out = tmp_path_factory.mktemp("autoglm_converted")
    files = {}
    for t in TOLERANCE:
        text, mm = out / f"m-{t}.gguf", out / f"mmproj-m-{t}.gguf"
        rc = run_cli("convert", str(interop_glm4v_dir), "-o", str(text), "--mmproj-out", str(mm), "--outtype", t,
                     "--no-progress")
        assert rc == 0 and text.is_file() and mm.is_file()
        files[t] = (text, mm)
    return files


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_converted_model_matches_transformers(converted, interop_glm4v_dir, hf_glm4v_reference, outtype) -> None:
    text, mm = converted[outtype]
    assert GGUFFile(text).get("general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    llm = LLM(text, mmproj=mm, dtype="float32")
    ref = hf_glm4v_reference(interop_glm4v_dir)
    errors = []
    for t, images in [(TEXTS[0], []), (TEXTS[3], []), (TEXTS[1], [image(90, 50, 3)])]:
        ours, expect = ours_and_reference(llm, ref, chat_ids(llm, t, with_image=bool(images)), images)
        errors.append(rel_err(ours, expect))
    print(f"autoglm convert {outtype}: max logit error / scale = {max(errors):.2e}")
    assert max(errors) <= TOLERANCE[outtype], errors


def test_convert_rejects_unknown_outtype_and_non_glm(tmp_path: Path, interop_glm4v_dir: Path) -> None:
    with pytest.raises(SystemExit):  # argparse: invalid choice
        run_cli("convert", str(interop_glm4v_dir), "-o", str(tmp_path / "x.gguf"), "--outtype", "q3_k_xs")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"architectures": ["FalconForCausalLM"]}')
    assert run_cli("convert", str(tmp_path / "other"), "-o", str(tmp_path / "y.gguf")) == 1
    assert not (tmp_path / "y.gguf").exists()


def test_mmproj_projection_size_mismatch_names_both(converted, interop_glm4v_other_dir: Path, tmp_path: Path) -> None:
    text, _ = converted["f32"]
    other = tmp_path / "mmproj-48.gguf"
    assert run_cli("convert", str(interop_glm4v_other_dir), "-o", str(tmp_path / "t48.gguf"), "--mmproj-out",
                   str(other), "--outtype", "f32", "--no-progress") == 0
    with pytest.raises(ModelLoadError) as e:
        load_model(text, mmproj=other)
    msg = str(e.value)
    assert "projection size 48" in msg and "embedding size 64" in msg and str(other) in msg


def _with_projector_type(src: Path, dst: Path, new: bytes) -> Path:
    """Copy an mmproj with clip.projector_type's value (same length) replaced."""
    data = bytearray(src.read_bytes())
    key = b"clip.projector_type"
    old = GGUFFile(src).get("clip.projector_type").encode()
    assert len(new) == len(old)
    pattern = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(old)) + old
    at = data.index(pattern)
    data[at + len(pattern) - len(old) : at + len(pattern)] = new
    dst.write_bytes(bytes(data))
    return dst


def test_mmproj_of_another_projector_type_names_both(converted, tmp_path: Path) -> None:
    text, mm = converted["f32"]
    bad = _with_projector_type(mm, tmp_path / "mmproj-glm5v.gguf", b"glm5v")
    with pytest.raises(ModelLoadError) as e:
        load_model(text, mmproj=bad)
    msg = str(e.value)
    assert "'glm5v'" in msg and "glm4" in msg and text.name in msg


def test_glm4v_mmproj_on_a_text_only_glm4_names_both(converted, tmp_path: Path, tiny_glm4_dir: Path) -> None:
    _, mm = converted["f32"]
    glm4 = tmp_path / "glm4.gguf"
    assert run_cli("convert", str(tiny_glm4_dir), "-o", str(glm4), "--outtype", "f32", "--no-progress") == 0
    with pytest.raises(ModelLoadError) as e:
        load_model(glm4, mmproj=mm)
    msg = str(e.value)
    assert "'glm4v'" in msg and "glm4.gguf" in msg and "M-RoPE" in msg


def test_text_model_given_as_mmproj_is_a_clear_error(converted) -> None:
    text, _ = converted["f32"]
    with pytest.raises(ModelLoadError, match="not an mmproj file"):
        load_model(text, mmproj=text)
