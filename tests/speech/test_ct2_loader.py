"""Our CTranslate2 model.bin reader: files made by ctranslate2's own converter from the tiny HF checkpoints load to
the same model as the safetensors path (float32 exactly, float16 / int8 within their rounding), and broken files
fail naming the file and the variable."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import torch

from autoglm.errors import CorruptFile, ModelLoadError, UnsupportedArchitecture
from autoglm.loader.ct2 import is_ct2_dir, open_ct2
from autoglm.speech.load import load_speech_model

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (test-time converter) is not installed")

_CONVERTED: dict[tuple[Path, str], Path] = {}


def _convert(hf_dir: Path, quantization: str) -> Path:
    key = (hf_dir, quantization)
    if key not in _CONVERTED:
        from ctranslate2.converters import TransformersConverter

        out = hf_dir.parent / f"{hf_dir.name}-ct2-{quantization}"
        TransformersConverter(str(hf_dir), copy_files=["tokenizer.json"]).convert(
            str(out), quantization=quantization, force=True
        )
        _CONVERTED[key] = out
    return _CONVERTED[key]


def _logits(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_speech_model(path).recognizer.model  # type: ignore[attr-defined]
    feats = torch.randn(1, model.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[50258, 50259, 50359, 50363, 440, 1702, 6292, 21026]])
    return model.model.encoder(feats), model(feats, ids)


@pytest.mark.parametrize(("quantization", "bound"), [("float32", 1e-6), ("float16", 5e-3), ("int8", 6e-2)])
def test_ct2_export_loads_like_safetensors(tiny_whisper_dir: Path, quantization: str, bound: float) -> None:
    ct2_dir = _convert(tiny_whisper_dir, quantization)
    assert is_ct2_dir(ct2_dir) and not is_ct2_dir(tiny_whisper_dir)
    loaded = load_speech_model(ct2_dir)
    assert loaded.info.format == "ct2" and loaded.info.quantization.startswith(quantization.split("_")[0])
    enc_ref, ref = _logits(tiny_whisper_dir)
    enc, got = _logits(ct2_dir)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= bound, f"{quantization}: logits differ by {rel:.2e} relative"
    assert float((enc - enc_ref).abs().max() / enc_ref.abs().max()) <= bound
    if quantization == "float32":
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    else:
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        assert agree >= 0.75, f"{quantization}: argmax agreement {agree:.2f}"


def test_ct2_int8_dequantization_matches_ctranslate2_scales(tiny_whisper_dir: Path) -> None:
    """w = q / scale per output row: recovers the float32 export's weights within half a quantization step."""
    f8 = open_ct2(_convert(tiny_whisper_dir, "int8") / "model.bin")
    f32 = open_ct2(_convert(tiny_whisper_dir, "float32") / "model.bin")
    name = "decoder/layer_0/ffn/linear_0/weight"
    assert f8.raw(name).dtype == torch.int8 and f8.is_quantized(name)
    w, ref = f8.float_tensor(name), f32.float_tensor(name)
    step = ref.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((w - ref).abs() <= step / 2 + 1e-7).all())


def test_truncated_model_bin_names_file_and_variable(tiny_whisper_dir: Path, tmp_path: Path) -> None:
    src = _convert(tiny_whisper_dir, "float32")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = (bad / "model.bin").read_bytes()
    (bad / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match=r"model\.bin.*truncated.*variable '[a-z_0-9/]+'"):
        load_speech_model(bad)


def test_unknown_binary_version_and_dtype_are_refused(tiny_whisper_dir: Path, tmp_path: Path) -> None:
    src = _convert(tiny_whisper_dir, "float32") / "model.bin"
    data = bytearray(src.read_bytes())
    bad = tmp_path / "v99.bin"
    bad.write_bytes(struct.pack("<I", 99) + bytes(data[4:]))
    with pytest.raises(CorruptFile, match="binary version 99"):
        open_ct2(bad)
    f = open_ct2(src)
    first = next(iter(f.variables.values()))
    # the dtype byte sits just before the u32 size, 4 bytes before the data
    data[first.offset - 5] = 17
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=rf"{first.name}.*dtype id 17"):
        open_ct2(bad)


def test_non_whisper_spec_is_refused(tiny_whisper_dir: Path, tmp_path: Path) -> None:
    src = _convert(tiny_whisper_dir, "float32")
    bad = tmp_path / "other"
    shutil.copytree(src, bad)
    data = (bad / "model.bin").read_bytes()
    (bad / "model.bin").write_bytes(data.replace(b"WhisperSpec\x00", b"WhisperSpeX\x00", 1))
    with pytest.raises(UnsupportedArchitecture, match="WhisperSpeX"):
        load_speech_model(bad)
