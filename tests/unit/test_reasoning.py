"""ReasoningSplitter: tags routed on ids, initial state from the prompt tail, streaming == whole sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm.tokenizer.chat_template import ChatTemplate
from autoglm.tokenizer.reasoning import ReasoningSplitter, ReasoningStream, ReasoningTokens
from autoglm.tokenizer.tokenizer import Tokenizer
from tests.fixtures.tokenizer import sentencepiece_like_tokenizer


@pytest.fixture(scope="module")
def tok(glm_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(glm_tokenizer_dir)


@pytest.fixture(scope="module")
def prompt_ids(tok: Tokenizer, glm_tokenizer_dir: Path) -> list[int]:
    text = ChatTemplate.from_hf_dir(glm_tokenizer_dir).render([{"role": "user", "content": "Open Chrome"}])
    return tok.encode(text, add_special_tokens=False)


def split_text(tok: Tokenizer, prompt: list[int], generated: str) -> tuple[str, str]:
    splitter = ReasoningSplitter.for_tokenizer(tok, prompt)
    reasoning, content = splitter.split(tok.encode(generated, add_special_tokens=False))
    return tok.decode(reasoning), tok.decode(content)


def test_tokens_looked_up(tok: Tokenizer, glm_special_ids: dict[str, int]) -> None:
    rt = ReasoningTokens.from_tokenizer(tok)
    assert (rt.think_start, rt.think_end, rt.answer_start, rt.answer_end) == tuple(
        glm_special_ids[t] for t in ("<think>", "</think>", "<answer>", "</answer>")
    )
    assert rt.has_reasoning and len(rt.tag_ids) == 4


def test_glm_generates_think_itself(tok: Tokenizer, prompt_ids: list[int]) -> None:
    # GLM-4.1V's prompt ends "<|assistant|>\n": start in content; the model's <think> switches to reasoning.
    assert ReasoningSplitter.for_tokenizer(tok, prompt_ids).state == "content"
    generated = "<think>I see the home screen.</think><answer>do(action=\"Launch\", app=\"Chrome\")</answer>"
    assert split_text(tok, prompt_ids, generated) == ("I see the home screen.", "do(action=\"Launch\", app=\"Chrome\")")


def test_prompt_ending_in_think_starts_in_reasoning(tok: Tokenizer, prompt_ids: list[int]) -> None:
    prompt = prompt_ids + tok.encode("<think>\n", add_special_tokens=False)
    assert ReasoningSplitter.for_tokenizer(tok, prompt).state == "reasoning"
    assert split_text(tok, prompt, "plan</think>answer") == ("plan", "answer")


def test_prompt_ending_in_empty_think_starts_in_content(tok: Tokenizer, prompt_ids: list[int]) -> None:
    prompt = prompt_ids + tok.encode("<think></think>", add_special_tokens=False)
    assert ReasoningSplitter.for_tokenizer(tok, prompt).state == "content"
    assert split_text(tok, prompt, "<answer>direct</answer>") == ("", "direct")


def test_unclosed_think_in_earlier_turn_does_not_leak(tok: Tokenizer) -> None:
    prompt = tok.encode("<|user|>\nq<|assistant|>\n<think>cut off<|user|>\nq2<|assistant|>\n", add_special_tokens=False)
    assert ReasoningSplitter.for_tokenizer(tok, prompt).state == "content"


def test_missing_think_end_truncated_by_max_tokens(tok: Tokenizer, prompt_ids: list[int]) -> None:
    assert split_text(tok, prompt_ids, "<think>still thinking when max_tokens hit") == (
        "still thinking when max_tokens hit", "")


def test_no_tags_is_all_content(tok: Tokenizer, prompt_ids: list[int]) -> None:
    assert split_text(tok, prompt_ids, "just an answer 你好") == ("", "just an answer 你好")


def test_model_without_reasoning_tokens() -> None:
    backend = sentencepiece_like_tokenizer()
    tok = Tokenizer(backend, eos_token_id=backend.token_to_id("</s>"))
    rt = ReasoningTokens.from_tokenizer(tok)
    assert not rt.has_reasoning and rt.tag_ids == frozenset()
    ids = tok.encode("hello <think> world </think>", add_special_tokens=False)
    splitter = ReasoningSplitter.for_tokenizer(tok, ids)
    assert splitter.state == "content"
    assert splitter.split(ids) == ([], ids)


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_streaming_equals_whole_sequence(tok: Tokenizer, prompt_ids: list[int], data: st.DataObject) -> None:
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "a", " b", "你", "😀", "\n"]
    text = "".join(data.draw(st.lists(st.sampled_from(pieces), max_size=20)))
    prompt = prompt_ids + data.draw(st.sampled_from([[], tok.encode("<think>", add_special_tokens=False)]))
    ids = tok.encode(text, add_special_tokens=False)
    whole_r, whole_c = ReasoningSplitter.for_tokenizer(tok, prompt).split(ids)
    stream = ReasoningStream(tok, prompt_ids=prompt)
    got_r, got_c = "", ""
    for t in ids:
        r, c = stream.add_token(t)
        got_r, got_c = got_r + r, got_c + c
    r, c = stream.finalize()
    got_r, got_c = got_r + r, got_c + c
    assert (got_r, got_c) == (tok.decode(whole_r), tok.decode(whole_c))
    tags = ReasoningTokens.from_tokenizer(tok).tag_ids
    assert sorted(whole_r + whole_c) == sorted(i for i in ids if i not in tags)


def test_reset_returns_to_prompt_state(tok: Tokenizer, prompt_ids: list[int]) -> None:
    splitter = ReasoningSplitter.for_tokenizer(tok, prompt_ids)
    splitter.add_token(ReasoningTokens.from_tokenizer(tok).think_start)  # type: ignore[arg-type]
    assert splitter.state == "reasoning"
    splitter.reset()
    assert splitter.state == "content"


def test_mapping_constructor_and_route_alias(tok: Tokenizer, prompt_ids: list[int]) -> None:
    tags = {t: tok.token_to_id(t) for t in ("<think>", "</think>", "<answer>", "</answer>")}
    splitter = ReasoningSplitter(tags, prompt_ids, special_ids=tok.special_ids)  # type: ignore[arg-type]
    assert splitter.tokens == ReasoningTokens.from_tokenizer(tok)
    ids = tok.encode("<think>r</think><answer>c</answer>", add_special_tokens=False)
    assert [splitter.route(i) for i in ids] == [None, "reasoning", None, None, "content", None]
