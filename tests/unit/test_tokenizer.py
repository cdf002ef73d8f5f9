"""Tokenizer: ids and text equal transformers' AutoTokenizer on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoglm.errors import ConfigError, InvalidRequest
from autoglm.tokenizer.tokenizer import Tokenizer
from tests.fixtures.tokenizer import (
    GLM_SPECIAL_TOKENS,
    TRAINING_TEXT,
    sentencepiece_like_tokenizer,
    write_glm_tokenizer,
)

TEXTS = [
    "Hello, world! Open Chrome and tap the search bar.",
    "打开微信，搜索联系人并发送消息。",
    "def add(a, b):\n    return a + b\n",
    "Emoji 😀😃 👍🏽 🚀 ❤️ and a family 👨‍👩‍👧",
    "   leading and trailing spaces   \t\t tabs \n\n\n newlines",
    "",
    " ",
    "Mixed 中文 English 123456789 ünïcödé",
    "<think>reasoning</think><answer>do(action=\"Tap\")</answer>",
    "[gMASK]<sop><|system|>\nSYS<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Open<|assistant|>\n",
    "text with <|user|> inside and <|endoftext|> at the end<|endoftext|>",
    "unknown-ish tags <foo> </bar> <|notatoken|>",
]


@pytest.fixture(scope="module")
def hf_tok(glm_tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(glm_tokenizer_dir))


@pytest.fixture(scope="module")
def tok(glm_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(glm_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok: Tokenizer, hf_tok, text: str, add_special_tokens: bool) -> None:  # type: ignore[no-untyped-def]
    assert tok.encode(text, add_special_tokens=add_special_tokens) == hf_tok.encode(
        text, add_special_tokens=add_special_tokens
    )


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok: Tokenizer, hf_tok, text: str, skip: bool) -> None:  # type: ignore[no-untyped-def]
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_byte_level_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS + list(TRAINING_TEXT):
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_metadata_matches_transformers(tok: Tokenizer, hf_tok, glm_special_ids: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    assert tok.vocab_size == len(hf_tok)
    assert tok.eos_token_id == hf_tok.eos_token_id == glm_special_ids["<|endoftext|>"]
    assert tok.pad_token_id == hf_tok.pad_token_id
    assert tok.bos_token_id is None and hf_tok.bos_token_id is None
    assert set(tok.all_special_tokens) == set(hf_tok.all_special_tokens)
    assert tok.special_ids == set(hf_tok.all_special_ids) == set(glm_special_ids.values())
    assert not tok.add_bos
    for t in GLM_SPECIAL_TOKENS:
        assert tok.token_to_id(t) == hf_tok.convert_tokens_to_ids(t)
        assert tok.id_to_token(glm_special_ids[t]) == t
    assert tok.get_vocab() == hf_tok.get_vocab()
    assert tok.decode([glm_special_ids["<think>"]], skip_special_tokens=True) == ""


def test_merges_exist_for_chinese_and_emoji(tok: Tokenizer) -> None:
    # The fixture must exercise multi-byte merges: fewer tokens than UTF-8 bytes.
    for text in ("你好，世界", "😀😃😄"):
        assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_prefix_post_processor_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_glm_tokenizer(tmp_path, prefix_tokens=True)
    ours, hf = Tokenizer.from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert ours.encode("hi")[:2] == [ours.token_to_id("[gMASK]"), ours.token_to_id("<sop>")]


def test_add_bos_token_in_config_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_glm_tokenizer(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(bos_token="<sop>", add_bos_token=True, add_eos_token=True)
    cfg_path.write_text(json.dumps(cfg))
    ours, hf = Tokenizer.from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    # transformers v5's generic fast backend keeps tokenizer.json's post-processor; so do we.
    assert ours.bos_token == "<sop>" and ours.add_bos == (hf.encode("x")[0] == ours.bos_token_id)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_config_flags_and_extra_added_tokens_match_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    specials = write_glm_tokenizer(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # A disagreeing flag (tokenizer.json wins in transformers) and a token only the config knows.
    cfg["added_tokens_decoder"][str(specials["<answer>"])]["special"] = False
    cfg["additional_special_tokens"].remove("<answer>")
    new_id = max(specials.values()) + 1
    cfg["added_tokens_decoder"][str(new_id)] = {"content": "<|begin_of_box|>", "special": True, "normalized": False}
    cfg_path.write_text(json.dumps(cfg))
    ours, hf = Tokenizer.from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<answer>x</answer> <|begin_of_box|>y"
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert new_id in ids and ours.token_to_id("<|begin_of_box|>") == new_id
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.vocab_size == len(hf)


def test_from_backend_with_metadata() -> None:
    backend = sentencepiece_like_tokenizer()
    bos, eos = backend.token_to_id("<s>"), backend.token_to_id("</s>")
    tok = Tokenizer(backend, bos_token_id=bos, eos_token_id=eos, add_bos=True, special_ids=[bos, eos])
    assert tok.add_bos
    ids = tok.encode("hello 你好")
    assert ids[0] == bos
    assert tok.token_to_id("<0xE4>") in ids  # byte fallback for characters outside the vocab
    assert tok.token_to_id("▁hello") in ids
    assert tok.decode(ids) == "hello 你好"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")
    assert bos in tok.special_ids and eos in tok.special_ids
    no_bos = Tokenizer(backend, bos_token_id=bos, eos_token_id=eos, add_bos=False)
    assert no_bos.encode("hello")[0] != bos and not no_bos.add_bos


def test_errors_name_the_cause(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(InvalidRequest, match="99999"):
        tok.decode([1, 99999])
    with pytest.raises(ConfigError, match="eos_token_id"):
        Tokenizer(tok.backend, eos_token_id=10**6)
