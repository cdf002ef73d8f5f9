"""Our Whisper vs transformers' WhisperForConditionalGeneration on tiny random checkpoints (same safetensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoglm.speech.load import load_speech_model
from autoglm.speech.whisper_decoding import DecodeOptions, decode_window
from autoglm.speech.whisper_recognizer import WhisperRecognizer

transformers = pytest.importorskip("transformers")


_CACHE: dict[tuple[str, Path], object] = {}


def _hf(path: Path) -> torch.nn.Module:
    key = ("hf", path)
    if key not in _CACHE:
        _CACHE[key] = transformers.WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return _CACHE[key]  # type: ignore[return-value]


def _ours(path: Path) -> WhisperRecognizer:
    key = ("ours", path)
    if key not in _CACHE:
        _CACHE[key] = load_speech_model(path).recognizer
    return _CACHE[key]  # type: ignore[return-value]


def _features(n_mels: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_mels, 3000, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_logits_match_transformers(tiny_whisper_dir: Path) -> None:
    ours = _ours(tiny_whisper_dir)
    hf = _hf(tiny_whisper_dir)
    n_mels = ours.model.config.num_mel_bins
    feats = torch.cat([_features(n_mels, 1), _features(n_mels, 2)])  # batch of 2 clips
    tok = ours.tokenizer
    ids = torch.tensor([[tok.sot, tok.languages["en"], tok.transcribe, tok.no_timestamps, 440, 1702, 6292],
                        [tok.sot, tok.languages["zh"], tok.translate, tok.no_timestamps, 13, 11, 220]])
    with torch.no_grad():
        ref = hf(input_features=feats, decoder_input_ids=ids).logits
        enc_ref = hf.model.encoder(feats).last_hidden_state
    got = ours.model(feats, ids)
    assert _rel(ours.model.encode(feats), enc_ref) < 1e-4
    assert _rel(got, ref) < 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_kv_cache_steps_equal_full_forward(tiny_whisper_dir: Path) -> None:
    model = _ours(tiny_whisper_dir).model
    feats = _features(model.config.num_mel_bins)
    ids = torch.tensor([[50258, 50259, 50359, 50363, 440, 1702, 6292, 21026, 13]])
    full = model(feats, ids)  # [1, T, V]
    states = model.encode(feats)
    cache = model.new_cache(states, 1)
    steps = [model.decode(ids[:, :4], cache, last_only=False)]  # a 4-token prefill, then 2 + 1 + ... chunks
    steps.append(model.decode(ids[:, 4:6], cache, last_only=False))
    for t in range(6, ids.shape[1]):
        steps.append(model.decode(ids[:, t : t + 1], cache, last_only=False))
    assert _rel(torch.cat(steps, dim=1), full) < 1e-5


def _generate_kwargs(rec: WhisperRecognizer) -> dict[str, object]:
    tok = rec.tokenizer
    vocab = rec.model.config.vocab_size
    # no-timestamp mode: our rules also mask every timestamp id, so transformers gets them as suppressed too
    suppress = sorted(set(rec.suppress_tokens) | set(range(tok.timestamp_begin, vocab)))
    return dict(suppress_tokens=suppress, begin_suppress_tokens=rec.suppress_begin)


@pytest.mark.parametrize("seed", [1, 2])
def test_greedy_tokens_equal_transformers_generate(tiny_whisper_dir: Path, seed: int) -> None:
    rec = _ours(tiny_whisper_dir)
    hf = _hf(tiny_whisper_dir)
    tok = rec.tokenizer
    feats = _features(rec.model.config.num_mel_bins, seed)
    prompt = [tok.sot, tok.languages["en"], tok.transcribe, tok.no_timestamps]
    n_new = 16
    opts = DecodeOptions(max_new_tokens=n_new, suppress_tokens=rec.suppress_tokens, suppress_begin=rec.suppress_begin)
    ours = decode_window(rec.model, tok, rec.model.encode(feats), prompt, opts)
    # the generic seq2seq generate (Whisper's override adds its own long-form logic)
    ref = transformers.GenerationMixin.generate(
        hf, input_features=feats, decoder_input_ids=torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
        num_beams=1, eos_token_id=tok.eot, pad_token_id=tok.eot, **_generate_kwargs(rec),
    )
    ref_tokens = [t for t in ref[0, len(prompt) :].tolist() if t != tok.eot]
    assert ours.tokens == ref_tokens[: len(ours.tokens)] and len(ours.tokens) == len(ref_tokens)


def test_beam_search_scores_at_least_greedy(tiny_whisper_dir: Path) -> None:
    """Beam search finds a sequence whose length-normalised log-prob is >= greedy's, and beam 1 == greedy."""
    rec = _ours(tiny_whisper_dir)
    tok = rec.tokenizer
    states = rec.model.encode(_features(rec.model.config.num_mel_bins, 4))
    prompt = [tok.sot, tok.languages["en"], tok.transcribe, tok.no_timestamps]
    base = dict(max_new_tokens=12, suppress_tokens=rec.suppress_tokens, suppress_begin=rec.suppress_begin)
    greedy = decode_window(rec.model, tok, states, prompt, DecodeOptions(**base))
    beam = decode_window(rec.model, tok, states, prompt, DecodeOptions(beam_size=4, **base))
    assert beam.tokens
    assert beam.sum_logprob / max(1, len(beam.tokens)) >= greedy.sum_logprob / max(1, len(greedy.tokens)) - 1e-4


def test_beam_search_matches_transformers_when_no_early_finish(tiny_whisper_dir: Path) -> None:
    """With EOT suppressed no beam finishes early: both searches keep the top-k sum log-prob sequences."""
    rec = _ours(tiny_whisper_dir)
    hf = _hf(tiny_whisper_dir)
    tok = rec.tokenizer
    feats = _features(rec.model.config.num_mel_bins, 5)
    prompt = [tok.sot, tok.languages["en"], tok.transcribe, tok.no_timestamps]
    kw = _generate_kwargs(rec)
    suppress = sorted(set(kw["suppress_tokens"]) | {tok.eot})  # type: ignore[arg-type]
    n_new = 8
    opts = DecodeOptions(beam_size=3, max_new_tokens=n_new, suppress_tokens=suppress,
                         suppress_begin=rec.suppress_begin)
    ours = decode_window(rec.model, tok, rec.model.encode(feats), prompt, opts)
    ref = transformers.GenerationMixin.generate(
        hf, input_features=feats, decoder_input_ids=torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
        num_beams=3, length_penalty=1.0, eos_token_id=tok.eot, pad_token_id=tok.eot, suppress_tokens=suppress,
        begin_suppress_tokens=rec.suppress_begin,
    )
    assert ours.tokens == ref[0, len(prompt) :].tolist()
