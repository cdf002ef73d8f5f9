"""Audio decoding: every format OpenAI accepts round-trips to 16 kHz mono float32; bad input is a MediaError naming
its cause (never a 500, never a hang)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from autoglm.errors import MediaError, MediaTooLarge
from autoglm.multimodal.audio import (
    data_url_bytes,
    decode_audio,
    encode_input_audio,
    input_audio_bytes,
)

sf = pytest.importorskip("soundfile")
av = pytest.importorskip("av")


def _tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _sf_bytes(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _av_bytes(x: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """Encode mono float samples with PyAV (FFmpeg's libraries) into a container in memory."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_len = 960
        pts = 0
        for i in range(0, len(x), frame_len):
            chunk = x[i : i + frame_len].astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = pts
            pts += chunk.shape[1]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def _dominant_hz(x: np.ndarray, rate: int = 16_000) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(spec.argmax())])


CASES = {
    "wav16": lambda: _sf_bytes(_tone(1.0, 16_000), 16_000, "WAV", "PCM_16"),
    "wav-8bit": lambda: _sf_bytes(_tone(1.0, 16_000), 16_000, "WAV", "PCM_U8"),
    "wav-float": lambda: _sf_bytes(_tone(1.0, 16_000), 16_000, "WAV", "FLOAT"),
    "wav-8khz": lambda: _sf_bytes(_tone(1.0, 8_000), 8_000, "WAV", "PCM_16"),
    "wav-48khz-stereo": lambda: _sf_bytes(_tone(1.0, 48_000, channels=2), 48_000, "WAV", "PCM_24"),
    "wav-6ch": lambda: _sf_bytes(_tone(1.0, 44_100, channels=6), 44_100, "WAV", "PCM_16"),
    "flac": lambda: _sf_bytes(_tone(1.0, 44_100), 44_100, "FLAC"),
    "ogg-vorbis": lambda: _sf_bytes(_tone(1.0, 22_050), 22_050, "OGG", "VORBIS"),
    "ogg-opus": lambda: _sf_bytes(_tone(1.0, 48_000), 48_000, "OGG", "OPUS"),
    "mp3": lambda: _sf_bytes(_tone(1.0, 44_100), 44_100, "MP3"),
    "m4a-aac": lambda: _av_bytes(_tone(1.0, 44_100), 44_100, "ipod", "aac"),
    "mp4-aac": lambda: _av_bytes(_tone(1.0, 48_000), 48_000, "mp4", "aac"),
    "webm-opus": lambda: _av_bytes(_tone(1.0, 48_000), 48_000, "webm", "libopus"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_formats_decode_to_16k_mono(case: str) -> None:
    x = decode_audio(CASES[case]())
    assert x.dtype == np.float32 and x.ndim == 1
    # lossy codecs add priming / padding samples: about one second either way
    assert 0.95 * 16_000 <= x.shape[0] <= 1.1 * 16_000
    assert abs(_dominant_hz(x) - 440.0) < 5.0  # resampled correctly (a wrong rate shifts the pitch)
    rms = float(np.sqrt(np.mean(x[1600:-1600] ** 2)))
    assert 0.3 < rms < 0.42  # a 0.5-amplitude sine: downmixed by averaging, not summing


def test_stereo_downmix_is_the_channel_mean() -> None:
    left, right = _tone(0.5, 16_000), _tone(0.5, 16_000, freq=1000.0)
    x = decode_audio(_sf_bytes(np.stack([left, right], axis=1), 16_000, "WAV", "FLOAT"))
    np.testing.assert_allclose(x, (left + right) / 2, atol=1e-6)


def _wav_with_nan() -> bytes:
    x = _tone(0.5, 16_000)
    x[100] = np.nan
    return _sf_bytes(x, 16_000, "WAV", "FLOAT")


def _truncated_wav() -> bytes:
    data = CASES["wav16"]()
    return data[: len(data) // 2]


def _wav_at(rate: int) -> bytes:
    """A valid 16-bit WAV of 0.1 s whose header then claims `rate` Hz (the fmt chunk's rate and byte-rate fields)."""
    import struct

    data = bytearray(CASES["wav16"]())
    fmt = data.index(b"fmt ")
    struct.pack_into("<II", data, fmt + 12, rate, rate * 2)
    return bytes(data)


BAD = {
    "1-GHz-header": (_wav_at(1_000_000_000), "1000000000 Hz"),
    "1-Hz-header": (_wav_at(1), "1 Hz"),
    "empty": (b"", "empty audio file"),
    "not-audio": (b"hello, this is plain text and not a sound file at all" * 20, "not a recognised audio file"),
    "png": (base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
                             "rkJggg=="), "not a recognised audio file|no audio stream"),
    "truncated-wav": (_truncated_wav(), "truncated WAV"),
    "truncated-header": (CASES["wav16"]()[:30], "truncated|not a recognised"),
    "zero-length-wav": (_sf_bytes(np.zeros(0, np.float32), 16_000, "WAV", "PCM_16"), "zero-length audio"),
    "nan-samples": (_wav_with_nan(), "NaN or infinite"),
    "truncated-mp3": (CASES["mp3"]()[: len(CASES["mp3"]()) // 2], "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_name_their_cause(case: str) -> None:
    data, pattern = BAD[case]
    with pytest.raises(MediaError, match=pattern) as info:
        decode_audio(data)
    assert info.value.status == 400 and " object at 0x" not in info.value.message


def test_too_long_clip_uses_the_articles_message() -> None:
    with pytest.raises(MediaError, match=r"Maximum clip duration \(15s\) exceeded"):
        decode_audio(_sf_bytes(_tone(16.0, 16_000), 16_000, "WAV", "PCM_16"), max_seconds=15)
    # a container without a declared duration is stopped while decoding, not after
    with pytest.raises(MediaError, match=r"Maximum clip duration \(2s\) exceeded"):
        decode_audio(_av_bytes(_tone(3.0, 48_000), 48_000, "webm", "libopus"), max_seconds=2)
    assert decode_audio(_sf_bytes(_tone(14.0, 16_000), 16_000, "WAV", "PCM_16"), max_seconds=15).shape[0] == 224_000


def test_too_large_is_413() -> None:
    with pytest.raises(MediaTooLarge, match="too large") as info:
        decode_audio(CASES["wav16"](), max_bytes=1000)
    assert info.value.status == 413


def test_silence_decodes_to_zeros() -> None:
    x = decode_audio(_sf_bytes(np.zeros(8000, np.float32), 8_000, "WAV", "PCM_16"))
    assert x.shape[0] == 16_000 and float(np.abs(x).max()) == 0.0


def test_input_audio_parts_and_data_urls() -> None:
    wav = CASES["wav16"]()
    part = encode_input_audio(wav, "wav")
    assert input_audio_bytes(part) == wav
    url = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    assert data_url_bytes(url) == wav
    assert input_audio_bytes({"data": url, "format": "wav"}) == wav
    with pytest.raises(MediaError, match="not valid base64"):
        input_audio_bytes({"data": "@@not base64@@", "format": "wav"})
    with pytest.raises(MediaError, match="format 'aiff'"):
        input_audio_bytes({"data": part["data"], "format": "aiff"})
    with pytest.raises(MediaError, match="non-empty base64"):
        input_audio_bytes({"format": "wav"})
    with pytest.raises(MediaError, match="not audio"):
        data_url_bytes("data:image/png;base64," + part["data"])
