"""load_speech_model decides by content (never by name) and names what it refuses; the recognizer validates input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from autoglm.errors import InvalidRequest, ModelLoadError, UnsupportedArchitecture
from autoglm.speech.load import load_speech_model
from autoglm.speech.recognizer import SpeechRecognizer


def test_hf_whisper_dir_loads_by_content_under_any_name(tiny_whisper_dir: Path, tmp_path: Path) -> None:
    odd = tmp_path / "speech_conformer_q8.onnx"  # the name lies; the content decides
    shutil.copytree(tiny_whisper_dir, odd)
    loaded = load_speech_model(odd)
    assert isinstance(loaded.recognizer, SpeechRecognizer)
    info = loaded.info
    assert (info.name, info.format, info.quantization, info.device) == ("speech", "safetensors", "float32", "cpu")
    assert info.parameters == sum(p.numel() for p in loaded.recognizer.model.parameters())  # type: ignore[attr-defined]
    assert info.bytes > 0 and info.load_seconds > 0
    assert loaded.recognizer.multilingual and loaded.recognizer.supports_translation


def test_refusals_name_the_cause(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_speech_model(tmp_path / "missing")
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM.*not a speech model.*Whisper"):
        load_speech_model(llm)
    parakeet = tmp_path / "parakeet"
    parakeet.mkdir()
    (parakeet / "config.json").write_text(json.dumps({"architectures": ["ParakeetForCTC"]}))
    with pytest.raises(ModelLoadError, match="config.json: ParakeetForCTC config without an `encoder_config`"):
        load_speech_model(parakeet)  # routed to the Conformer loader by content, which names what is missing
    onnx = tmp_path / "model.bin"  # an ONNX protobuf (with no graph) under a misleading name
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")
    with pytest.raises(ModelLoadError, match="model.bin: onnxruntime cannot load it"):
        load_speech_model(onnx)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(UnsupportedArchitecture, match="not a speech model"):
        load_speech_model(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_speech_model(empty)


def test_recognizer_rejects_bad_arguments(tiny_whisper_dir: Path) -> None:
    rec = load_speech_model(tiny_whisper_dir).recognizer
    x = np.zeros(1600, np.float32)
    with pytest.raises(InvalidRequest, match="unsupported language 'xx'"):
        rec.transcribe(x, language="xx")
    with pytest.raises(InvalidRequest, match="task"):
        rec.transcribe(x, task="summarize")
    with pytest.raises(InvalidRequest, match="beam_size"):
        rec.transcribe(x, beam_size=0)
    with pytest.raises(InvalidRequest, match="temperature"):
        rec.transcribe(x, temperature=3.0)


def test_random_model_transcribes_within_bounds(tiny_whisper_dir: Path) -> None:
    """A random model's output is gibberish, but the whole path runs: sampling, timestamps, prompt, silence."""
    rec = load_speech_model(tiny_whisper_dir).recognizer
    rec.max_new_tokens = 12  # a random model rarely says EOT: bound the work
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(16_000 * 2)).astype(np.float32)
    t = rec.transcribe(x, language="en", temperature=0.7, seed=1, prompt="previous words", timestamps=True)
    assert t.language == "en" and abs(t.duration - 2.0) < 1e-9 and t.num_tokens >= 1
    assert all(0 <= s.start <= s.end <= t.duration for s in t.segments)
    again = rec.transcribe(x, language="en", temperature=0.7, seed=1, prompt="previous words", timestamps=True)
    assert again.text == t.text  # seeded sampling is reproducible
    assert rec.transcribe(np.zeros(0, np.float32)).text == ""
