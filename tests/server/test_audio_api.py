"""Speech serving on the live server: /v1/audio/* with the official openai SDK, the bad-audio table, concurrency
beside a chat stream, and chat `input_audio` parts, with a tiny random Parakeet CTC module (HF safetensors).

Oracle: the same speech module loaded in-process (`load_conformer`) on the same decoded samples; transcripts over
HTTP must equal it. That a transcript reached the prompt is shown by `usage.prompt_tokens`: an input_audio request
counts exactly the tokens of the same request with the oracle transcript as a text part.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from autoglm.multimodal.audio import decode_audio
from tests.fixtures.conformer import tone_clip
from tests.fixtures.server import ServerProcess, start_server
from tests.fixtures.speech import wav_bytes

MAX_BYTES = 2_000_000
MAX_FILE_SECONDS = 40
NAME = "autoglm-phone-9b"


@pytest.fixture(scope="module")
def speech_server(tiny_glm4v_dir: Path, parakeet_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    handle = start_server(tiny_glm4v_dir, tmp_path_factory.mktemp("speech_server"), "--served-model-name", NAME,
                          "--max-model-len", "1024", "--speech-model", str(parakeet_dir),
                          "--max-audio-bytes", str(MAX_BYTES), "--max-audio-file-seconds", str(MAX_FILE_SECONDS),
                          speech=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def oracle(parakeet_dir: Path) -> Any:
    from autoglm.speech.conformer import load_conformer

    return load_conformer(parakeet_dir)[0]


@pytest.fixture(scope="module")
def client(speech_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=speech_server.v1, api_key="EMPTY", max_retries=0, timeout=120)


def _wav(seconds: float, seed: int = 0, rate: int = 16_000) -> bytes:
    return wav_bytes(tone_clip(seconds, seed=seed, rate=rate), rate)


def _expected(oracle: Any, data: bytes, **kw: Any) -> Any:
    return oracle.transcribe(decode_audio(data), **kw)


def test_startup_log_line_and_readiness(speech_server: ServerProcess, parakeet_dir: Path) -> None:
    log = speech_server.log()
    line = next(li for li in log.splitlines() if "Loaded module speech:" in li)
    assert str(parakeet_dir) in line and "safetensors" in line and "params" in line
    ready = httpx.get(speech_server.base_url + "/health/ready", params={"force": "1"}, timeout=60).json()
    speech = [m for m in ready["modules"] if m["name"] == "speech"]
    assert speech and speech[0]["ok"], ready


def test_models_carry_capabilities(client: openai.OpenAI) -> None:
    entry = client.models.list().data[0].model_dump()
    assert {"chat", "transcription", "audio_input"} <= set(entry["capabilities"])
    assert "translation" not in entry["capabilities"]  # a CTC module only transcribes


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "verbose_json", "vtt"])
def test_sdk_transcription_each_format(client: openai.OpenAI, oracle: Any, fmt: str) -> None:
    data = _wav(3.0, seed=1)
    want = _expected(oracle, data, timestamps=fmt in ("srt", "vtt", "verbose_json"))
    out = client.audio.transcriptions.create(model=NAME, file=("clip.wav", data, "audio/wav"),
                                             response_format=fmt)  # type: ignore[call-overload]
    if fmt == "json":
        assert out.text == want.text
        assert out.usage is not None and out.usage.type == "duration" and out.usage.seconds == 3
    elif fmt == "verbose_json":
        assert out.text == want.text and abs(out.duration - 3.0) < 1e-3
        assert [s.text for s in out.segments] == [s.text for s in want.segments]
    elif fmt == "text":
        assert out.strip() == want.text
    elif fmt == "srt":
        assert out.startswith("1\n00:00:00,000 --> ") and want.text.strip() in out
    else:
        assert out.startswith("WEBVTT\n\n00:00:00.000 --> ") and want.text.strip() in out


def test_sdk_model_names(client: openai.OpenAI) -> None:
    data = _wav(1.0)
    assert client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data)).text is not None
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="no-such-model", file=("a.wav", data))
    out = client.audio.transcriptions.create(model=NAME, file=("a.wav", data), response_format="verbose_json",
                                             timestamp_granularities=["segment"], language="en", prompt="Hi.")
    assert out.segments is not None and out.duration == 1.0


def test_long_file_is_windowed_by_the_recognizer(client: openai.OpenAI, oracle: Any) -> None:
    data = _wav(33.0, seed=2)  # > 2 CTC windows of 15 s
    out = client.audio.transcriptions.create(model=NAME, file=("long.wav", data))
    assert out.text == _expected(oracle, data).text


def test_translation_refused_by_a_ctc_module(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="cannot translate"):
        client.audio.translations.create(model=NAME, file=("a.wav", _wav(1.0)))


def _bad_audio_table() -> list[tuple[str, bytes, int, str]]:
    good = _wav(2.0)
    t = np.arange(16_000) / 16_000
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 500 * t)], axis=1).astype(np.float32) * 0.3
    nan = tone_clip(1.0)
    nan[100:200] = np.nan
    return [
        ("not audio", b"hello, this is not an audio file at all " * 50, 400, "not a recognised audio file"),
        ("truncated", good[: len(good) // 2], 400, "truncated"),
        ("empty", b"", 400, "empty audio file"),
        ("zero-length", wav_bytes(np.zeros(0, np.float32), 16_000), 400, "zero-length"),
        ("silence", wav_bytes(np.zeros(16_000, np.float32), 16_000), 200, ""),
        ("8-bit", wav_bytes(tone_clip(1.0), 16_000, subtype="PCM_U8"), 200, ""),
        ("8 kHz", _wav(1.0, rate=8_000), 200, ""),
        ("multichannel", wav_bytes(stereo, 16_000), 200, ""),
        ("48 kHz", _wav(1.0, rate=48_000), 200, ""),
        ("NaN samples", wav_bytes(nan, 16_000, subtype="FLOAT"), 400, "NaN"),
        ("too big", b"RIFF" + b"\0" * (MAX_BYTES + 10), 413, "too large"),
        ("too long", wav_bytes(np.zeros(16_000 * (MAX_FILE_SECONDS + 2), np.float32), 16_000, subtype="PCM_U8"),
         400, f"Maximum clip duration ({MAX_FILE_SECONDS}s) exceeded"),
    ]


@pytest.mark.parametrize(("case", "data", "status", "message"), _bad_audio_table(), ids=lambda v: None)
def test_bad_audio_table(speech_server: ServerProcess, case: str, data: bytes, status: int, message: str) -> None:
    r = httpx.post(speech_server.v1 + "/audio/transcriptions", data={"model": NAME},
                   files={"file": ("x.wav", data, "audio/wav")}, timeout=120)
    assert r.status_code == status, (case, r.text)
    if status != 200:
        err = r.json()["error"]
        assert message in err["message"] and err["param"] == "file", (case, err)
    else:
        assert isinstance(r.json()["text"], str)


def test_bad_fields(speech_server: ServerProcess) -> None:
    url = speech_server.v1 + "/audio/transcriptions"
    wav = {"file": ("a.wav", _wav(1.0), "audio/wav")}
    cases = [
        ({"response_format": "xml"}, wav, "response_format"),
        ({"temperature": "hot"}, wav, "temperature"),
        ({"timestamp_granularities[]": "word"}, wav, "timestamp_granularities"),
        ({"model": NAME}, None, "file"),
    ]
    for data, files, param in cases:
        r = httpx.post(url, data=data, files=files, timeout=60) if files else httpx.post(
            url, data=data, files={"other": ("x", b"1")}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (data, r.text)
    r = httpx.post(url, json={"file": "x"}, timeout=60)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_concurrent_transcriptions_beside_a_chat_stream(speech_server: ServerProcess, oracle: Any) -> None:
    clips = [_wav(2.0 + i * 0.5, seed=10 + i) for i in range(6)]
    results: dict[int, str] = {}
    errors: list[str] = []

    def transcribe(i: int) -> None:
        r = httpx.post(speech_server.v1 + "/audio/transcriptions", data={"model": NAME},
                       files={"file": ("c.wav", clips[i], "audio/wav")}, timeout=120)
        if r.status_code != 200:
            errors.append(r.text)
        else:
            results[i] = r.json()["text"]

    chat_events: list[str] = []

    def chat() -> None:
        with httpx.stream("POST", speech_server.v1 + "/chat/completions", timeout=120, json={
            "model": NAME, "stream": True, "max_tokens": 24, "temperature": 0.0,
            "messages": [{"role": "user", "content": "hello there"}],
        }) as r:
            chat_events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    threads = [threading.Thread(target=transcribe, args=(i,)) for i in range(len(clips))]
    threads.append(threading.Thread(target=chat))
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert results == {i: _expected(oracle, c).text for i, c in enumerate(clips)}  # batched jobs do not mix
    assert chat_events[-1] == "data: [DONE]"
    assert not any('"error"' in e for e in chat_events)


def _audio_part(data: bytes, data_url: bool = False) -> dict[str, Any]:
    b64 = base64.b64encode(data).decode()
    return {"type": "input_audio",
            "input_audio": {"data": f"data:audio/wav;base64,{b64}" if data_url else b64, "format": "wav"}}


def _prompt_tokens(client: openai.OpenAI, content: list[dict[str, Any]]) -> int:
    out = client.chat.completions.create(model=NAME, max_tokens=1, temperature=0.0,
                                         messages=[{"role": "user", "content": content}])  # type: ignore[list-item]
    assert out.usage is not None
    return out.usage.prompt_tokens


@pytest.mark.parametrize("data_url", [False, True])
def test_input_audio_is_transcribed_into_the_prompt(client: openai.OpenAI, oracle: Any, data_url: bool) -> None:
    data = _wav(4.0, seed=5)
    transcript = _expected(oracle, data).text
    assert transcript  # the tone clip gives the tiny random module something to say
    ask = {"type": "text", "text": "What did I say?"}
    with_audio = _prompt_tokens(client, [ask, _audio_part(data, data_url)])
    assert with_audio == _prompt_tokens(client, [ask, {"type": "text", "text": transcript}])
    assert with_audio != _prompt_tokens(client, [ask])


def test_input_audio_over_the_clip_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=r"Maximum clip duration \(15s\) exceeded"):
        _prompt_tokens(client, [_audio_part(_wav(16.0))])
    with pytest.raises(openai.BadRequestError, match=r"At most 8 audio clip\(s\)"):  # --limit-mm-per-prompt
        _prompt_tokens(client, [_audio_part(_wav(0.2))] * 9)
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        _prompt_tokens(client, [{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}])


def test_no_speech_server_names_why(server: ServerProcess) -> None:
    r = httpx.post(server.v1 + "/audio/transcriptions", files={"file": ("a.wav", _wav(1.0), "audio/wav")},
                   timeout=60)
    assert r.status_code == 400 and "--no-speech" in r.json()["error"]["message"]
    r = httpx.post(server.v1 + "/chat/completions", timeout=60, json={"messages": [
        {"role": "user", "content": [_audio_part(_wav(1.0))]}]})
    assert r.status_code == 400 and "--no-speech" in r.json()["error"]["message"]
    caps = httpx.get(server.v1 + "/models", timeout=60).json()["data"][0]["capabilities"]
    assert "transcription" not in caps

