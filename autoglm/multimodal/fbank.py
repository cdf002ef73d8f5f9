"""Filterbank features for CTC Conformers: NeMo/Parakeet log-mel and Kaldi fbank, one implementation per recipe.

- `nemo_log_mel`: what NeMo's `AudioToMelSpectrogramPreprocessor` (and transformers' `ParakeetFeatureExtractor`)
  computes: pre-emphasis, centred zero-padded STFT with a symmetric Hann window, power spectrum, Slaney mel, natural
  log with a 2**-24 guard, then per-feature normalization over each clip's valid frames. Batched over clips.
- `kaldi_fbank`: Kaldi's `compute-fbank-feats` (as `kaldi-native-fbank` and sherpa-onnx compute it): framed
  waveform, DC removal, pre-emphasis, Povey (or another) window, power spectrum, Kaldi mel scale, log floored at
  FLT_EPSILON. Used by ONNX models exported the sherpa-onnx way.

Inputs are 16 kHz (or the config's rate) mono float32 samples; outputs are [frames, bins] per clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autoglm.errors import ConfigError

_LOG_GUARD = 2.0**-24  # NeMo's log_zero_guard_value
_NORM_EPS = 1e-5  # NeMo's normalize_batch epsilon, added to the std
_FLT_EPSILON = float(np.finfo(np.float32).eps)  # Kaldi's log floor


# --- NeMo / Parakeet log-mel -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NemoMelConfig:
    """NeMo preprocessor settings (transformers `preprocessor_config.json` spellings in `from_dict`)."""

    sample_rate: int = 16_000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    preemphasis: float = 0.97
    normalize: str = "per_feature"  # "per_feature" | "none"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NemoMelConfig:
        pre = d.get("preemphasis", 0.97)
        cfg = cls(
            sample_rate=int(d.get("sampling_rate", d.get("sample_rate", 16_000))),
            n_fft=int(d.get("n_fft", 512)),
            win_length=int(d.get("win_length", 400)),
            hop_length=int(d.get("hop_length", 160)),
            n_mels=int(d.get("feature_size", d.get("n_mels", 80))),
            preemphasis=float(pre) if pre is not None else 0.0,
            normalize=str(d.get("normalize", "per_feature") or "none"),
        )
        if cfg.win_length > cfg.n_fft or cfg.hop_length <= 0 or cfg.n_mels <= 0:
            raise ConfigError(f"invalid NeMo feature settings {cfg} (win_length <= n_fft, hop_length > 0, n_mels > 0)")
        if cfg.normalize not in ("per_feature", "none"):
            raise ConfigError(f"normalize={cfg.normalize!r}: supported are 'per_feature' and 'none'")
        return cfg


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    # linear below 1 kHz, logarithmic above (Slaney's Auditory Toolbox, as librosa)
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3.0)
    logstep = math.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, mel)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    logstep = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * (200.0 / 3.0))


@lru_cache(maxsize=8)
def slaney_mel_filters(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """[n_mels, n_freqs] float32 triangular filters on the Slaney mel scale with Slaney (area) normalization."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate // 2, n_freqs)
    mel_pts = np.linspace(_hz_to_mel_slaney(np.array(f_min)), _hz_to_mel_slaney(np.array(f_max)), n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    diff = np.diff(hz_pts)
    slopes = hz_pts[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))  # [n_freqs, n_mels]
    fb *= (2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels]))[None, :]
    return torch.from_numpy(np.ascontiguousarray(fb.T.astype(np.float32)))


def nemo_frame_count(num_samples: Tensor | int, cfg: NemoMelConfig) -> Tensor | int:
    """Valid feature frames of a clip of `num_samples` (NeMo: floor(len / hop) for an even n_fft)."""
    return (num_samples + cfg.n_fft // 2 * 2 - cfg.n_fft) // cfg.hop_length


def pad_clips(clips: Sequence[np.ndarray] | np.ndarray) -> tuple[Tensor, Tensor]:
    """Clips -> (zero-padded batch [B, N] float32, lengths [B] int64)."""
    if isinstance(clips, np.ndarray) and clips.ndim == 1:
        clips = [clips]
    arrs = [torch.as_tensor(np.asarray(c, dtype=np.float32)).reshape(-1) for c in clips]
    lengths = torch.tensor([a.shape[0] for a in arrs], dtype=torch.int64)
    batch = torch.zeros(len(arrs), int(lengths.max()) if arrs else 0)
    for i, a in enumerate(arrs):
        batch[i, : a.shape[0]] = a
    return batch, lengths


def normalize_per_feature(feats: Tensor, lengths: Tensor) -> Tensor:
    """NeMo per-feature normalization over each clip's valid frames; padded frames become 0.

    feats [B, T, F], lengths [B] -> [B, T, F]. Unbiased std (n - 1), plus 1e-5; a one-frame clip gets std 0.
    """
    mask = (torch.arange(feats.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)  # [B, T, 1]
    n = lengths.clamp(min=1).to(feats.dtype)[:, None]
    masked = feats * mask
    mean = (masked.sum(dim=1) / n).unsqueeze(1)  # [B, 1, F]
    var = (((masked - mean) ** 2) * mask).sum(dim=1) / (n - 1).clamp(min=1)
    std = var.sqrt().unsqueeze(1)
    return (feats - mean) / (std + _NORM_EPS) * mask


@torch.no_grad()
def nemo_log_mel(clips: Sequence[np.ndarray] | np.ndarray, cfg: NemoMelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Clips (each [N] float32) -> (features [B, T, n_mels] float32, valid frames [B] int64).

    T is 1 + max_len // hop (the STFT's frame count); frames past a clip's length are 0. One clip or many: a
    clip's features do not depend on what it was batched with (the STFT pads with zeros either way).
    """
    cfg = cfg or NemoMelConfig()
    wave, lengths = pad_clips(clips)  # [B, N]
    valid = torch.arange(wave.shape[1])[None, :] < lengths[:, None]
    if cfg.preemphasis:
        wave = torch.cat([wave[:, :1], wave[:, 1:] - cfg.preemphasis * wave[:, :-1]], dim=1).masked_fill(~valid, 0.0)
    window = torch.hann_window(cfg.win_length, periodic=False)
    spec = torch.stft(
        wave, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
        center=True, pad_mode="constant", return_complex=True,
    )  # fmt: skip
    # NeMo takes |X| then squares it; |X|^2 straight from (re, im) differs by an ulp
    power = torch.view_as_real(spec).pow(2).sum(-1).sqrt().pow(2)  # [B, n_freqs, T]
    mel = slaney_mel_filters(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate) @ power  # [B, n_mels, T]
    feats = torch.log(mel + _LOG_GUARD).transpose(1, 2)  # [B, T, n_mels]
    frames = nemo_frame_count(lengths, cfg)
    assert isinstance(frames, Tensor)
    if cfg.normalize == "per_feature":
        feats = normalize_per_feature(feats, frames)
    else:
        feats = feats * (torch.arange(feats.shape[1])[None, :] < frames[:, None]).unsqueeze(-1)
    return feats.contiguous(), frames


# --- Kaldi fbank -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KaldiFbankConfig:
    """Kaldi `FbankOptions` (the fields kaldi-native-fbank names the same way); dither is always 0 (deterministic)."""

    sample_rate: int = 16_000
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    num_mel_bins: int = 80
    preemph_coeff: float = 0.97
    remove_dc_offset: bool = True
    window_type: str = "povey"  # povey | hann (periodic) | hanning | hamming | sine | rectangular | blackman
    blackman_coeff: float = 0.42
    round_to_power_of_two: bool = True
    snip_edges: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: offset from Nyquist
    use_power: bool = True
    use_log_fbank: bool = True

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * 0.001 * self.frame_length_ms)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * 0.001 * self.frame_shift_ms)

    @property
    def padded_window_size(self) -> int:
        n = self.window_size
        return 1 << (n - 1).bit_length() if self.round_to_power_of_two else n


def _kaldi_window(cfg: KaldiFbankConfig) -> np.ndarray:
    n = cfg.window_size
    a = 2.0 * math.pi / (n - 1)
    i = np.arange(n, dtype=np.float64)
    kind = cfg.window_type
    if kind == "hanning":
        w = 0.5 - 0.5 * np.cos(a * i)
    elif kind == "hann":  # kaldi-native-fbank's "hann" is torch's periodic Hann (sherpa-onnx NeMo models use it)
        w = 0.5 - 0.5 * np.cos(2.0 * math.pi * i / n)
    elif kind == "povey":  # a Hann window raised to 0.85: goes to zero at the edges but less sharply
        w = (0.5 - 0.5 * np.cos(a * i)) ** 0.85
    elif kind == "hamming":
        w = 0.54 - 0.46 * np.cos(a * i)
    elif kind == "sine":
        w = np.sin(0.5 * a * i)
    elif kind == "rectangular":
        w = np.ones(n)
    elif kind == "blackman":
        c = cfg.blackman_coeff
        w = c - 0.5 * np.cos(a * i) + (0.5 - c) * np.cos(2 * a * i)
    else:
        raise ConfigError(f"kaldi fbank window_type={kind!r} is not one of povey, hann, hamming, sine, rectangular")
    return w


def _kaldi_mel(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + f / 700.0)


@lru_cache(maxsize=8)
def kaldi_mel_banks(cfg: KaldiFbankConfig) -> np.ndarray:
    """[num_mel_bins, padded/2] triangular filters, Kaldi's MelBanks (HTK mel scale, triangles in mel)."""
    n_fft_bins = cfg.padded_window_size // 2
    nyquist = 0.5 * cfg.sample_rate
    high = cfg.high_freq if cfg.high_freq > 0 else nyquist + cfg.high_freq
    if not 0.0 <= cfg.low_freq < high <= nyquist:
        raise ConfigError(f"kaldi fbank low_freq={cfg.low_freq}, high_freq={cfg.high_freq}: need 0 <= low < high <= "
                          f"Nyquist ({nyquist})")  # fmt: skip
    mel_low, mel_high = _kaldi_mel(np.array(cfg.low_freq)), _kaldi_mel(np.array(high))
    delta = (mel_high - mel_low) / (cfg.num_mel_bins + 1)
    mel = _kaldi_mel(cfg.sample_rate / cfg.padded_window_size * np.arange(n_fft_bins))  # [n_fft_bins]
    b = np.arange(cfg.num_mel_bins)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    w = np.where(mel <= center, up, down)
    return np.where((mel > left) & (mel < right), w, 0.0)


def kaldi_frame_count(num_samples: int, cfg: KaldiFbankConfig) -> int:
    size, shift = cfg.window_size, cfg.window_shift
    if cfg.snip_edges:
        return 0 if num_samples < size else 1 + (num_samples - size) // shift
    return (num_samples + shift // 2) // shift


def kaldi_fbank(samples: np.ndarray, cfg: KaldiFbankConfig | None = None) -> np.ndarray:
    """Samples [N] float -> log mel filterbank [frames, num_mel_bins] float32 (no dither, no energy column)."""
    cfg = cfg or KaldiFbankConfig()
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    n, size, shift = x.shape[0], cfg.window_size, cfg.window_shift
    frames = kaldi_frame_count(n, cfg)
    if frames == 0:
        return np.zeros((0, cfg.num_mel_bins), dtype=np.float32)
    start = np.arange(frames) * shift
    if not cfg.snip_edges:
        start = start + shift // 2 - size // 2
    idx = start[:, None] + np.arange(size)[None, :]  # [frames, size]
    # samples before 0 / past the end are mirrored (Kaldi's ExtractWindow); one reflection suffices when n >= size
    idx = np.where(idx < 0, -idx - 1, idx)
    idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    idx = np.clip(idx, 0, n - 1)
    w = x[idx]
    if cfg.remove_dc_offset:
        w = w - w.mean(axis=1, keepdims=True)
    if cfg.preemph_coeff:
        w = np.concatenate([w[:, :1] * (1.0 - cfg.preemph_coeff), w[:, 1:] - cfg.preemph_coeff * w[:, :-1]], axis=1)
    w = w * _kaldi_window(cfg)[None, :]
    spec = np.fft.rfft(w, n=cfg.padded_window_size, axis=1)  # [frames, padded/2 + 1]
    power = spec.real**2 + spec.imag**2
    if not cfg.use_power:
        power = np.sqrt(power)
    mel = power[:, : cfg.padded_window_size // 2] @ kaldi_mel_banks(cfg).T  # Kaldi's banks skip the Nyquist bin
    if cfg.use_log_fbank:
        mel = np.log(np.maximum(mel, _FLT_EPSILON))
    return mel.astype(np.float32)


def kaldi_fbank_batch(clips: Sequence[np.ndarray], cfg: KaldiFbankConfig | None = None) -> tuple[Tensor, Tensor]:
    """Clips -> (zero-padded features [B, T, bins] float32, frames [B] int64)."""
    feats = [kaldi_fbank(c, cfg) for c in clips]
    bins = (cfg or KaldiFbankConfig()).num_mel_bins
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    out = torch.zeros(len(feats), int(lengths.max()) if feats else 0, bins)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = torch.from_numpy(f)
    return out, lengths


# --- one recipe object for a recognizer ------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureRecipe:
    """Which features a CTC model takes: `kind` "nemo_mel" (with `nemo`) or "kaldi_fbank" (with `kaldi`), and
    `normalize` "per_feature" | "none" applied to kaldi fbank (NeMo log-mel normalizes per its own config)."""

    kind: str = "nemo_mel"
    nemo: NemoMelConfig | None = None
    kaldi: KaldiFbankConfig | None = None
    normalize: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in ("nemo_mel", "kaldi_fbank"):
            raise ConfigError(f"feature kind {self.kind!r} is not 'nemo_mel' or 'kaldi_fbank'")
        if self.normalize not in ("per_feature", "none"):
            raise ConfigError(f"feature normalization {self.normalize!r} is not 'per_feature' or 'none'")

    @property
    def num_bins(self) -> int:
        return (self.nemo or NemoMelConfig()).n_mels if self.kind == "nemo_mel" else self._kaldi.num_mel_bins

    @property
    def sample_rate(self) -> int:
        return (self.nemo or NemoMelConfig()).sample_rate if self.kind == "nemo_mel" else self._kaldi.sample_rate

    @property
    def hop_samples(self) -> int:
        return (self.nemo or NemoMelConfig()).hop_length if self.kind == "nemo_mel" else self._kaldi.window_shift

    @property
    def _kaldi(self) -> KaldiFbankConfig:
        return self.kaldi or KaldiFbankConfig()

    def __call__(self, clips: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Clips -> (features [B, T, bins] float32, valid frames [B] int64)."""
        if self.kind == "nemo_mel":
            return nemo_log_mel(clips, self.nemo)
        feats, lengths = kaldi_fbank_batch(clips, self.kaldi)
        if self.normalize == "per_feature":
            feats = normalize_per_feature(feats, lengths)
        return feats, lengths
