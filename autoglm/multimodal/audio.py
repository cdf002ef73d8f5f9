"""Decoding request audio into 16 kHz mono float32 samples, the one input every speech module takes.

Formats are those OpenAI's audio API accepts (wav, flac, ogg/opus, mp3, m4a/mp4, webm): libsndfile (`soundfile`)
reads what it can, PyAV (FFmpeg's libraries, linked into the wheel — no `ffmpeg` binary) reads the containers and
codecs it cannot. Samples are downmixed to mono and resampled with `soxr`. Every failure is a `MediaError` naming
the cause (not audio, truncated, empty, NaN samples, too long, too large) and decoding work is bounded by the
duration cap, so a client's bad file is never a 5xx and never a hang.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from dataclasses import dataclass

import numpy as np

from autoglm.errors import MediaError, MediaTooLarge
from autoglm.speech.recognizer import SAMPLE_RATE

# Formats a chat `input_audio` part may name (OpenAI accepts "wav" and "mp3"; the others cost nothing to allow).
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "mp4", "webm", "aac")
DEFAULT_MAX_BYTES = 25 * 1024 * 1024  # OpenAI's upload limit
# Decoding stops here even without a caller's cap: bounded work for any input.
HARD_MAX_SECONDS = 4 * 3600.0
_STREAMED_WAV_SIZE = 0x7FFF0000


@dataclass(frozen=True)
class AudioLimits:
    """The caps one caller applies: chat clips use `max_seconds=15`, transcription files a larger one."""

    max_seconds: float | None = None
    max_bytes: int = DEFAULT_MAX_BYTES

    def decode(self, data: bytes, *, param: str = "file") -> np.ndarray:
        return decode_audio(data, max_seconds=self.max_seconds, max_bytes=self.max_bytes, param=param)


def decode_audio(
    data: bytes,
    *,
    max_seconds: float | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    param: str = "file",
) -> np.ndarray:
    """Decode an audio file's bytes -> float32 [N] mono samples at 16 kHz. Raises MediaError naming the cause.

    `max_seconds` caps the clip's duration ("Maximum clip duration (15s) exceeded"); `max_bytes` the file size
    (MediaTooLarge, HTTP 413). `param` is the request field named in errors ("file", "messages").
    """
    if len(data) == 0:
        raise MediaError("empty audio file (0 bytes)", param=param)
    if len(data) > max_bytes:
        raise MediaTooLarge(
            f"audio file too large: {len(data)} bytes (the limit is {max_bytes} bytes)", param=param
        )
    limit = HARD_MAX_SECONDS if max_seconds is None else min(max_seconds, HARD_MAX_SECONDS)
    _check_riff(data, param)
    try:
        samples, rate = _read_soundfile(data, limit, max_seconds, param)
    except _NotForSoundfile as sf_err:
        samples, rate = _read_pyav(data, limit, max_seconds, param, str(sf_err))
    return _finish(samples, rate, param)


def _finish(samples: np.ndarray, rate: int, param: str) -> np.ndarray:
    # samples: [N, C] float32 at `rate`
    if samples.shape[0] == 0:
        raise MediaError("zero-length audio: the file decodes to no samples", param=param)
    if not np.isfinite(samples).all():
        raise MediaError("audio contains NaN or infinite samples", param=param)
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate != SAMPLE_RATE:
        import soxr

        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _too_long(seconds: float, max_seconds: float | None, param: str) -> MediaError:
    if max_seconds is None:
        return MediaError(f"audio too long: over {HARD_MAX_SECONDS:.0f} s", param=param)
    return MediaError(f"Maximum clip duration ({max_seconds:g}s) exceeded: the audio is {seconds:.1f}s", param=param)


# sample rates accepted: telephone-band 1 kHz up to studio 768 kHz (a header claiming more is corrupt or hostile)
MIN_RATE, MAX_RATE = 1000, 768_000
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class _NotForSoundfile(Exception):
    """libsndfile cannot open these bytes (a container or codec it lacks): PyAV gets a try."""


def _check_riff(data: bytes, param: str) -> None:
    """A WAV whose `data` chunk is shorter than its header says was cut off (libsndfile silently reads less)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if tag == b"data":
            have = len(data) - pos - 8
            # streamed WAVs (espeak-ng --stdout, pipes) leave 0 or a huge placeholder size: not truncation
            if 0 < size < _STREAMED_WAV_SIZE and have < size:
                raise MediaError(
                    f"truncated WAV file: the header declares {size} bytes of samples, the file has {have}",
                    param=param,
                )
            return
        pos += 8 + size + (size & 1)
    raise MediaError("truncated WAV file: no complete 'data' chunk", param=param)


def _read_soundfile(data: bytes, limit: float, max_seconds: float | None, param: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception as e:  # libsndfile says "Format not recognised" etc.: let PyAV try
        # its message names our in-memory buffer by address ("Error opening <_io.BytesIO object at 0x..>")
        raise _NotForSoundfile(_BUFFER_REPR.sub("the file", str(e)).strip()) from e
    with f:
        rate, frames = int(f.samplerate), int(f.frames)
        if not MIN_RATE <= rate <= MAX_RATE or f.channels <= 0:
            raise MediaError(f"invalid audio header: {rate} Hz, {f.channels} channel(s) (sample rates "
                             f"{MIN_RATE}-{MAX_RATE} Hz are accepted)", param=param)
        if frames / rate > limit:
            raise _too_long(frames / rate, max_seconds, param)
        try:
            samples = f.read(frames, dtype="float32", always_2d=True)
        except Exception as e:
            raise MediaError(f"truncated or corrupt audio ({f.format}): {e}", param=param) from e
    if frames > 0 and samples.shape[0] < frames:
        have, want = samples.shape[0] / rate, frames / rate
        raise MediaError(f"truncated audio ({f.format}): decoded {have:.2f}s of the {want:.2f}s declared", param=param)
    return samples, rate


def _read_pyav(
    data: bytes, limit: float, max_seconds: float | None, param: str, sf_error: str
) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except Exception as e:
        raise MediaError(
            f"not a recognised audio file (libsndfile: {sf_error}; FFmpeg: {_short(e)})", param=param
        ) from e
    with container:
        streams = container.streams.audio
        if not streams:
            raise MediaError("the file has no audio stream", param=param)
        stream = streams[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        if rate <= 0:
            raise MediaError("invalid audio stream: unknown sample rate", param=param)
        if not MIN_RATE <= rate <= MAX_RATE:
            raise MediaError(f"invalid audio stream: {rate} Hz (sample rates {MIN_RATE}-{MAX_RATE} Hz are accepted)",
                             param=param)
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
            if declared > limit:
                raise _too_long(declared, max_seconds, param)
        # One sample format and layout for every codec; the rate is kept (soxr resamples after).
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
        chunks: list[np.ndarray] = []
        total = 0
        max_samples = int(limit * rate) + rate // 10  # decode at most a tenth of a second past the cap
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray()[0]
                    chunks.append(chunk)
                    total += chunk.shape[0]
                if total > max_samples:
                    raise _too_long(total / rate, max_seconds, param)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray()[0])
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(
                f"truncated or corrupt audio ({container.format.name}) after {total / rate:.2f}s: {_short(e)}",
                param=param,
            ) from e
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if samples.shape[0] / rate > limit:
        raise _too_long(samples.shape[0] / rate, max_seconds, param)
    return samples.astype(np.float32, copy=False)[:, None], rate


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 200 else text[:200] + "..."


# --- chat `input_audio` parts ------------------------------------------------------------------------------------
def input_audio_bytes(part: object, *, param: str = "messages") -> bytes:
    """The file bytes of an OpenAI chat `input_audio` value: `{"data": base64, "format": "wav"|"mp3"}`.

    `data` may also be a `data:audio/...;base64,` URL. The format is advisory (decoding is by content), but an
    unknown one is refused so typos surface.
    """
    if not isinstance(part, dict):
        raise MediaError(f"input_audio must be an object with 'data' and 'format', got {type(part).__name__}",
                         param=param)
    data, fmt = part.get("data"), part.get("format")
    if not isinstance(data, str) or not data:
        raise MediaError("input_audio.data must be a non-empty base64 string", param=param)
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in INPUT_AUDIO_FORMATS):
        raise MediaError(f"input_audio.format {fmt!r} is not one of {', '.join(INPUT_AUDIO_FORMATS)}", param=param)
    if data.startswith("data:"):
        return data_url_bytes(data, param=param)
    return b64_bytes(data, param=param)


def data_url_bytes(url: str, *, param: str = "messages") -> bytes:
    """`data:audio/wav;base64,....` -> bytes. Raises MediaError for a malformed URL or bad base64."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise MediaError("malformed data URL: expected 'data:<mime>;base64,<payload>'", param=param)
    mime = head[5:].split(";", 1)[0].lower()
    if mime and not (mime.startswith("audio/") or mime.startswith("video/") or mime == "application/octet-stream"):
        raise MediaError(f"data URL media type {mime!r} is not audio", param=param)
    return b64_bytes(payload, param=param)


def b64_bytes(text: str, *, param: str = "messages") -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"input_audio.data is not valid base64: {e}", param=param) from e


def encode_input_audio(data: bytes, fmt: str = "wav") -> dict[str, str]:
    """bytes -> the chat part value `{"data": base64, "format": fmt}` (clients and tests)."""
    return {"data": base64.b64encode(data).decode("ascii"), "format": fmt}
