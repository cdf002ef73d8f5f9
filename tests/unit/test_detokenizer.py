"""IncrementalDetokenizer: segments concatenate to tokenizer.decode(all ids); no half characters are emitted."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm.tokenizer.detokenizer import IncrementalDetokenizer
from autoglm.tokenizer.tokenizer import Tokenizer
from tests.fixtures.tokenizer import sentencepiece_like_tokenizer

PIECES = list("abc xyz\n\t 你好世界中文😀🎉👍🏽❤️🚀éüΩ") + ["<think>", "</think>", "<|user|>", "hello", " world"]
TEXTS = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def glm(glm_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(glm_tokenizer_dir)


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    backend = sentencepiece_like_tokenizer()
    return Tokenizer(backend, bos_token_id=backend.token_to_id("<s>"), eos_token_id=backend.token_to_id("</s>"))


def stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str]:
    """Feed ids one by one; return the segments read after each token and the flushed tail."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    segments = []
    for t in ids:
        detok.add_token(t)
        segments.append(detok.last_segment)
    detok.finalize()
    tail = detok.last_segment
    assert detok.text == "".join(segments) + tail
    return segments, tail


@SETTINGS
@given(text=TEXTS, skip=st.booleans())
def test_valid_text_streams_whole_characters(glm: Tokenizer, spm: Tokenizer, text: str, skip: bool) -> None:
    for tok in (glm, spm):
        ids = tok.encode(text, add_special_tokens=False)
        segments, tail = stream(tok, ids, skip)
        assert "".join(segments) + tail == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in s for s in segments)  # never half a character
    # Byte-level BPE: every character is out as soon as its last byte's token arrives.
    ids = glm.encode(text, add_special_tokens=False)
    segments, tail = stream(glm, ids, skip)
    assert tail == ""


@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_random_ids_concatenate_to_decode(glm: Tokenizer, spm: Tokenizer, data: st.DataObject, skip: bool) -> None:
    # Arbitrary ids include stray UTF-8 lead/continuation bytes and specials anywhere.
    for tok in (glm, spm):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
        segments, tail = stream(tok, ids, skip)
        assert "".join(segments) + tail == tok.decode(ids, skip_special_tokens=skip)


@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_byte_tokens_split_characters(spm: Tokenizer, data: st.DataObject, skip: bool) -> None:
    # SentencePiece byte fallback: runs of <0xXX> tokens (valid or not) mixed with words and specials.
    byte_ids = sorted(spm.byte_fallback_ids)
    assert len(byte_ids) == 256
    utf8 = [spm.token_to_id(f"<0x{b:02X}>") for b in "你好😀".encode()]
    pool = st.one_of(
        st.sampled_from(byte_ids),
        st.sampled_from(utf8),
        st.sampled_from([spm.token_to_id(t) for t in ("▁hello", "▁world", "a", "▁", "<s>", "</s>")]),
    )
    ids = data.draw(st.lists(pool, max_size=30))
    segments, tail = stream(spm, ids, skip)
    assert "".join(segments) + tail == spm.decode(ids, skip_special_tokens=skip)


def test_emoji_split_across_byte_level_tokens(glm: Tokenizer) -> None:
    text = "a😀b你c"
    ids = glm.encode(text, add_special_tokens=False)
    pieces = [glm.backend.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "fixture must split a character across tokens"
    segments, tail = stream(glm, ids, skip=True)
    assert "".join(segments) == text and tail == ""
    assert all("\ufffd" not in s for s in segments)


def test_special_tokens_skipped_or_kept(glm: Tokenizer) -> None:
    ids = glm.encode("<think>x</think><answer>y</answer>", add_special_tokens=False)
    assert "".join(stream(glm, ids, skip=True)[0]) == "xy"
    assert "".join(stream(glm, ids, skip=False)[0]) == "<think>x</think><answer>y</answer>"


def test_reset_and_incomplete_tail(glm: Tokenizer) -> None:
    detok = IncrementalDetokenizer(glm)
    lead = glm.encode("😀", add_special_tokens=False)
    # Feed only the first token of a split emoji: nothing comes out until finalize.
    first = next(i for i in range(len(lead)) if glm.backend.decode(lead[: i + 1]).endswith("\ufffd"))
    detok.add_token(lead[first])
    assert detok.last_segment == ""
    detok.finalize()
    assert detok.last_segment == glm.decode([lead[first]])
    detok.reset()
    assert detok.text == "" and detok.tokens == []
    detok.add_tokens(glm.encode("ok", add_special_tokens=False))
    assert detok.last_segment == "ok"
    assert detok.last_segment == ""  # reading clears
