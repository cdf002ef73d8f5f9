"""Whisper's log-mel spectrogram (the recipe of `WhisperFeatureExtractor` / openai-whisper), in torch.

16 kHz samples -> STFT (n_fft 400, hop 160, periodic Hann, centred with reflection) -> power -> Slaney mel
filterbank (80 or 128 bins, 0-8 kHz, Slaney norm) -> log10 -> floor at (max - 8) -> (x + 4) / 4. A clip is padded
with 30 s of zeros (`WhisperFeatureExtractor`'s recipe, the default), or featurised as-is (padding=160, what
faster-whisper transcribes from) and sliced into 3000-frame windows zero-padded in the feature domain.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from autoglm.speech.recognizer import SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples in a window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames in a window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney: linear below 1 kHz, logarithmic above
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = 200.0 * m / 3.0
    log = 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalised triangular filters -> float64 [n_fft // 2 + 1, n_mels] (read-only, cached)."""
    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    mels = np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sampling_rate / 2)), n_mels + 2)
    edges = _mel_to_hz(mels)  # [n_mels + 2]
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # [F, n_mels + 2]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (edges[2 : n_mels + 2] - edges[:n_mels])
    filters.setflags(write=False)
    return filters


def log_mel_spectrogram(samples: np.ndarray | Tensor, n_mels: int = 80, *, padding: int = N_SAMPLES) -> Tensor:
    """samples [N] float32 at 16 kHz -> float32 [n_mels, (N + padding) // 160] log-mel features.

    With the default padding, frames [0:3000) equal `WhisperFeatureExtractor` on a clip of up to 30 s.
    """
    x = torch.as_tensor(samples, dtype=torch.float32).flatten()
    if padding > 0:
        x = torch.nn.functional.pad(x, (0, padding))
    if x.shape[0] <= N_FFT // 2:  # reflection padding needs more samples than half a frame
        x = torch.nn.functional.pad(x, (0, N_FFT // 2 + 1 - x.shape[0]))
    window = torch.hann_window(N_FFT, dtype=torch.float32)
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # [201, frames + 1]
    power = stft[..., :-1].abs() ** 2  # [201, frames]: the last frame is dropped, as in Whisper
    filters = torch.from_numpy(np.ascontiguousarray(mel_filters(n_mels).T)).to(torch.float32)  # [n_mels, 201]
    mel = filters @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def window_features(features: Tensor, start_frame: int, n_frames: int = N_FRAMES) -> Tensor:
    """features [n_mels, T] -> [n_mels, 3000]: `n_frames` (<= 3000) frames from `start_frame`, zero-padded in the
    feature domain to a full window (what openai-whisper and faster-whisper feed the encoder)."""
    chunk = features[:, start_frame : start_frame + min(n_frames, N_FRAMES)]
    if chunk.shape[1] < N_FRAMES:
        chunk = torch.nn.functional.pad(chunk, (0, N_FRAMES - chunk.shape[1]))
    return chunk
