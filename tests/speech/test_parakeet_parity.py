"""Our FastConformer CTC vs transformers `ParakeetForCTC` on tiny random checkpoints: fp32 log-probs within 1e-4
relative, identical greedy CTC text (transformers' generate + ParakeetTokenizer), batch == one clip at a time,
and the `SpeechRecognizer` contract of `CTCRecognizer` (windows, timestamps, bad input)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm.errors import InvalidRequest, MediaError, ModelLoadError
from autoglm.speech.conformer import conformer_kind, load_conformer, load_parakeet_hf
from autoglm.speech.ctc import CTCVocab, ctc_greedy
from autoglm.speech.recognizer import SAMPLE_RATE, SpeechRecognizer
from tests.fixtures.conformer import tone_clip

CLIPS = (tone_clip(2.3, seed=11), tone_clip(0.9, seed=12), tone_clip(1.6, seed=13))


def _hf(path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer, ParakeetFeatureExtractor, ParakeetForCTC

    return (ParakeetForCTC.from_pretrained(path).eval(), ParakeetFeatureExtractor.from_pretrained(path),
            AutoTokenizer.from_pretrained(path))  # fmt: skip


def test_log_probs_and_greedy_text_match_transformers(parakeet_dirs: list[Path]) -> None:
    for path in parakeet_dirs:
        hf, fe, tok = _hf(path)
        inputs = fe(list(CLIPS), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.no_grad():
            ref = hf(**inputs).logits.log_softmax(-1)
            ref_text = tok.batch_decode(hf.generate(**inputs), skip_special_tokens=True)
        ref_len = hf._get_output_attention_mask(inputs.attention_mask, target_length=ref.shape[1]).sum(-1)

        model, features, vocab, _ = load_parakeet_hf(path)
        feats, frames = features(list(CLIPS))
        torch.testing.assert_close(feats, inputs.input_features.float(), atol=2e-5, rtol=1e-5)
        with torch.no_grad():
            ours, out_len = model.log_probs(inputs.input_features, inputs.attention_mask.sum(-1))
        assert out_len.tolist() == ref_len.tolist()
        for b, n in enumerate(out_len.tolist()):
            err = (ours[b, :n] - ref[b, :n]).abs().max() / ref[b, :n].abs().max()
            assert err <= 1e-4, f"{path.name} clip {b}: relative error {err:.2e}"
        rec, _ = load_conformer(path)
        texts = [t.text for t in rec.transcribe_batch(list(CLIPS))]
        assert texts == [t.strip() for t in ref_text]
        assert len({len(t) for t in texts}) > 1 or any(len(set(t)) > 2 for t in texts)  # not a degenerate path


def test_batch_equals_one_at_a_time(parakeet_dirs: list[Path]) -> None:
    for path in parakeet_dirs:
        model, features, _, _ = load_parakeet_hf(path)
        feats, frames = features(list(CLIPS))
        with torch.no_grad():
            batch, lens = model.log_probs(feats, frames)
            for i, clip in enumerate(CLIPS):
                f1, n1 = features([clip])
                one, l1 = model.log_probs(f1, n1)
                n = int(l1[0])
                assert n == int(lens[i])
                torch.testing.assert_close(batch[i, :n], one[0, :n], atol=1e-4, rtol=1e-4)
        rec, _ = load_conformer(path)
        assert [t.text for t in rec.transcribe_batch(list(CLIPS))] == [rec.transcribe(c).text for c in CLIPS]


def test_recognizer_contract(parakeet_dir: Path) -> None:
    rec, info = load_conformer(parakeet_dir)
    assert isinstance(rec, SpeechRecognizer)
    assert (info.name, info.format, info.quantization) == ("speech", "safetensors", "float32")
    assert info.parameters > 0 and info.bytes == 4 * info.parameters
    assert (rec.multilingual, rec.supports_translation) == (False, False)
    with pytest.raises(InvalidRequest, match="only transcribes"):
        rec.transcribe(CLIPS[0], task="translate")
    with pytest.raises(MediaError, match="NaN"):
        rec.transcribe(np.full(16000, np.nan, np.float32))
    with pytest.raises(MediaError, match="mono"):
        rec.transcribe(np.zeros((2, 16000), np.float32))
    empty = rec.transcribe(np.zeros(0, np.float32))
    assert (empty.text, empty.duration, empty.num_tokens) == ("", 0.0, 0)
    t = rec.transcribe(CLIPS[0], timestamps=True)
    assert len(t.segments) == 1 and t.segments[0].start == 0.0 and t.segments[0].end == pytest.approx(2.3)
    assert t.segments[0].text == t.text and t.num_tokens == len(t.segments[0].token_ids)


def test_long_input_is_windowed_without_gaps(parakeet_dir: Path) -> None:
    rec, _ = load_conformer(parakeet_dir, window_seconds=2.0)
    clip = np.concatenate([tone_clip(2.0, seed=s) for s in range(4)])[: int(7.3 * SAMPLE_RATE)]
    t = rec.transcribe(clip, timestamps=True)
    assert len(t.segments) > 3
    assert t.segments[0].start == 0.0 and t.segments[-1].end == pytest.approx(7.3)
    for a, b in zip(t.segments, t.segments[1:], strict=False):
        assert a.end == pytest.approx(b.start)  # windows keep disjoint, adjacent frame ranges
    assert sum(len(s.token_ids) for s in t.segments) == t.num_tokens
    # frames kept across windows == the frames a single pass over the whole clip produces
    model, features, _, _ = load_parakeet_hf(parakeet_dir)
    _, frames = features([clip])
    total = int(model.output_lengths(frames)[0])
    kept = round((t.segments[-1].end - t.segments[0].start) / rec.frame_seconds)
    assert abs(kept - total) <= 1


def test_ctc_greedy_collapses_repeats_and_drops_blank() -> None:
    blank = 3
    path = [0, 0, 3, 0, 1, 1, 3, 3, 2, 2, 0]
    logp = np.log(np.eye(4)[path] * 0.97 + 0.01)
    ids, frames = ctc_greedy(logp, blank)
    assert ids == [0, 0, 1, 2, 0] and frames == [0, 3, 4, 8, 10]
    vocab = CTCVocab.from_pieces(["▁he", "llo", "<0xC3>", "<blk>", "<0xA9>", "▁wor", "ld"])
    assert vocab.decode([0, 1, 5, 6, 3, 2, 4]) == "hello world\u00e9"


def test_load_errors_name_the_cause(parakeet_dir: Path, tmp_path: Path) -> None:
    no_tok = tmp_path / "no_tok"
    shutil.copytree(parakeet_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_conformer(no_tok)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["Glm4ForCausalLM"]}))
    assert conformer_kind(other) is None and conformer_kind(parakeet_dir) == "hf"
    with pytest.raises(ModelLoadError, match="neither an HF Parakeet-CTC directory"):
        load_conformer(other)
    bf16, info = load_conformer(parakeet_dir, dtype="bfloat16")
    assert info.quantization == "bfloat16" and isinstance(bf16.transcribe(CLIPS[1]).text, str)


def test_parity_on_espeak_speech(parakeet_dirs: list[Path]) -> None:
    from tests.fixtures.conformer import espeak_clip

    clips = [espeak_clip("open the settings and turn on wifi", "en"), espeak_clip("打开微信，给妈妈发消息", "cmn")]
    for path in parakeet_dirs:
        hf, fe, tok = _hf(path)
        inputs = fe(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.no_grad():
            ref = hf(**inputs).logits.log_softmax(-1)
            ref_text = tok.batch_decode(hf.generate(**inputs), skip_special_tokens=True)
        rec, _ = load_conformer(path)
        feats, frames = rec.features(clips)
        logp, lens = rec.model.log_probs(feats, frames)
        for b, n in enumerate(lens.tolist()):
            err = np.abs(logp[b, :n] - ref[b, :n].numpy()).max() / ref[b, :n].abs().max().item()
            assert err <= 1e-4
        assert [t.text for t in rec.transcribe_batch(clips)] == [t.strip() for t in ref_text]
