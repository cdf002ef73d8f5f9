"""Filterbank features against their references: NeMo log-mel vs transformers `ParakeetFeatureExtractor`, Kaldi
fbank vs `kaldi-native-fbank` (both test-time oracles)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm.multimodal.fbank import (
    FeatureRecipe,
    KaldiFbankConfig,
    NemoMelConfig,
    kaldi_fbank,
    kaldi_fbank_batch,
    nemo_log_mel,
)
from tests.fixtures.conformer import tone_clip


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    silence_then_tone = np.concatenate([np.zeros(4000, np.float32), tone_clip(0.6, seed=5)])
    return [tone_clip(1.23, seed=1), (0.2 * rng.standard_normal(7001)).astype(np.float32), silence_then_tone]


@pytest.mark.parametrize(
    "settings",
    [{}, {"feature_size": 64, "hop_length": 128, "n_fft": 400, "win_length": 320, "preemphasis": 0.9}],
    ids=["default", "custom"],
)
def test_nemo_log_mel_matches_parakeet_feature_extractor(settings: dict) -> None:
    from transformers import ParakeetFeatureExtractor

    fe = ParakeetFeatureExtractor(**settings)
    clips = _clips()
    ref = fe(clips, sampling_rate=16_000, return_tensors="pt")
    feats, frames = nemo_log_mel(clips, NemoMelConfig.from_dict(fe.to_dict()))
    assert feats.shape == ref.input_features.shape
    assert frames.tolist() == ref.attention_mask.sum(-1).tolist()
    assert torch.allclose(feats, ref.input_features.float(), atol=2e-5, rtol=1e-5), (
        (feats - ref.input_features).abs().max()
    )


def test_nemo_log_mel_batch_equals_one_at_a_time() -> None:
    clips = _clips()
    batch, frames = nemo_log_mel(clips)
    for i, c in enumerate(clips):
        one, n = nemo_log_mel([c])
        assert int(n[0]) == int(frames[i])
        torch.testing.assert_close(batch[i, : int(n[0])], one[0, : int(n[0])], atol=1e-5, rtol=1e-5)
        assert not batch[i, int(n[0]) :].any()  # padded frames are zero


def _knf(samples: np.ndarray, cfg: KaldiFbankConfig) -> np.ndarray:
    import kaldi_native_fbank as knf

    o = knf.FbankOptions()
    o.frame_opts.samp_freq = cfg.sample_rate
    o.frame_opts.dither = 0.0
    o.frame_opts.snip_edges = cfg.snip_edges
    o.frame_opts.window_type = cfg.window_type
    o.frame_opts.remove_dc_offset = cfg.remove_dc_offset
    o.frame_opts.preemph_coeff = cfg.preemph_coeff
    o.mel_opts.num_bins = cfg.num_mel_bins
    o.mel_opts.low_freq = cfg.low_freq
    o.mel_opts.high_freq = cfg.high_freq
    f = knf.OnlineFbank(o)
    f.accept_waveform(cfg.sample_rate, samples.tolist())
    f.input_finished()
    if f.num_frames_ready == 0:
        return np.zeros((0, cfg.num_mel_bins), np.float32)
    return np.stack([np.asarray(f.get_frame(i)) for i in range(f.num_frames_ready)])


@pytest.mark.parametrize("snip_edges", [True, False])
@pytest.mark.parametrize("window_type", ["povey", "hann", "hamming", "rectangular"])
def test_kaldi_fbank_matches_kaldi_native_fbank(snip_edges: bool, window_type: str) -> None:
    pytest.importorskip("kaldi_native_fbank", reason="kaldi-native-fbank (test oracle) is not installed")
    cfg = KaldiFbankConfig(snip_edges=snip_edges, window_type=window_type)
    for clip in _clips():
        ref, ours = _knf(clip, cfg), kaldi_fbank(clip, cfg)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-4)


def test_kaldi_fbank_other_settings_and_int16_scale() -> None:
    pytest.importorskip("kaldi_native_fbank", reason="kaldi-native-fbank (test oracle) is not installed")
    cfg = KaldiFbankConfig(num_mel_bins=23, low_freq=0.0, high_freq=-400.0, remove_dc_offset=False, preemph_coeff=0.0)
    clip = tone_clip(0.9, seed=9) * 32768.0  # Kaldi recipes feed int16-range samples
    np.testing.assert_allclose(kaldi_fbank(clip, cfg), _knf(clip, cfg), atol=1e-3, rtol=1e-4)
    short = tone_clip(0.01)  # under one 25 ms window
    assert kaldi_fbank(short, cfg).shape == _knf(short, cfg).shape == (0, 23)


def test_feature_recipe_kaldi_per_feature_normalization() -> None:
    clips = _clips()
    recipe = FeatureRecipe(kind="kaldi_fbank", kaldi=KaldiFbankConfig(snip_edges=False), normalize="per_feature")
    feats, frames = recipe(clips)
    raw, raw_frames = kaldi_fbank_batch(clips, recipe.kaldi)
    assert frames.tolist() == raw_frames.tolist()
    for i, n in enumerate(frames.tolist()):
        valid = feats[i, :n]
        torch.testing.assert_close(valid.mean(0), torch.zeros(recipe.num_bins), atol=1e-4, rtol=0)
        torch.testing.assert_close(valid.std(0), torch.ones(recipe.num_bins), atol=1e-3, rtol=0)
