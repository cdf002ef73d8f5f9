"""Whisper log-mel features vs transformers' WhisperFeatureExtractor (80 and 128 mel bins)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm.multimodal.whisper_features import N_FRAMES, log_mel_spectrogram, mel_filters, window_features

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [0.3, 3.0, 29.5])
def test_log_mel_matches_whisper_feature_extractor(n_mels: int, seconds: float) -> None:
    rng = np.random.default_rng(int(seconds * 10) + n_mels)
    t = np.arange(int(seconds * 16_000)) / 16_000
    x = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    ref = fe(x, sampling_rate=16_000, return_tensors="np").input_features[0]  # [n_mels, 3000]
    ours = log_mel_spectrogram(x, n_mels)[:, :N_FRAMES].numpy()
    assert ours.shape == ref.shape == (n_mels, N_FRAMES)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels: int) -> None:
    ref = transformers.WhisperFeatureExtractor(feature_size=n_mels).mel_filters  # [201, n_mels]
    np.testing.assert_allclose(mel_filters(n_mels), ref, atol=1e-12)


def test_windows_are_zero_padded_in_the_feature_domain() -> None:
    feats = torch.randn(80, 4500)
    w = window_features(feats, 3000, 1200)
    assert w.shape == (80, N_FRAMES)
    assert torch.equal(w[:, :1200], feats[:, 3000:4200]) and bool((w[:, 1200:] == 0).all())
