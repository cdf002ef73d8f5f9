"""ReasoningSplitter: route generated token ids to "reasoning" or "content" on the ids of the reasoning tags.

GLM-4.1V writes `<think>reasoning</think><answer>answer</answer>`, and the four tags are special tokens, so the split
is done on ids, never on decoded text (API_NOTES §1). The tags themselves go to neither channel. A model without
`<think>`/`</think>` in its vocabulary has no reasoning: everything is content.

Initial state comes from the prompt tail (the ids after the last special token that is not a reasoning tag, e.g.
after `<|assistant|>`): a tail whose last think tag is `<think>` starts in reasoning (the template prefilled it);
`<think></think>` or no tag starts in content (GLM-4.1V generates `<think>` itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from autoglm.tokenizer.detokenizer import IncrementalDetokenizer
from autoglm.tokenizer.tokenizer import Tokenizer

Channel = Literal["reasoning", "content"]


@dataclass(frozen=True)
class ReasoningTokens:
    """Ids of the reasoning tags; None where the vocabulary lacks one."""

    think_start: int | None = None
    think_end: int | None = None
    answer_start: int | None = None
    answer_end: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ReasoningTokens:
        return cls(
            think_start=tokenizer.token_to_id("<think>"),
            think_end=tokenizer.token_to_id("</think>"),
            answer_start=tokenizer.token_to_id("<answer>"),
            answer_end=tokenizer.token_to_id("</answer>"),
        )

    @classmethod
    def from_mapping(cls, ids: Mapping[str, int]) -> ReasoningTokens:
        """From {"<think>": id, "</think>": id, ...} (missing tags -> None)."""
        return cls(
            think_start=ids.get("<think>"),
            think_end=ids.get("</think>"),
            answer_start=ids.get("<answer>"),
            answer_end=ids.get("</answer>"),
        )

    @property
    def has_reasoning(self) -> bool:
        """Both think tags exist: the model can reason."""
        return self.think_start is not None and self.think_end is not None

    @property
    def tag_ids(self) -> frozenset[int]:
        ids = (self.think_start, self.think_end, self.answer_start, self.answer_end) if self.has_reasoning else (
            self.answer_start, self.answer_end)
        return frozenset(i for i in ids if i is not None)


class ReasoningSplitter:
    """Per-request state machine: `add_token(id)` (alias `route`) -> the channel of that token, or None for a
    dropped tag. `tokens` may also be a {tag: id} mapping. Pass the tokenizer's `special_ids` (or use
    `for_tokenizer`) so the prompt-tail scan stops at the current turn's role token."""

    def __init__(
        self,
        tokens: ReasoningTokens | Mapping[str, int],
        prompt_ids: Sequence[int] = (),
        *,
        special_ids: Iterable[int] = (),
    ) -> None:
        if not isinstance(tokens, ReasoningTokens):
            tokens = ReasoningTokens.from_mapping(tokens)
        self.tokens = tokens
        self._tags = tokens.tag_ids
        self.state: Channel = self._initial_state(prompt_ids, frozenset(special_ids))
        self.initial_state: Channel = self.state

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> ReasoningSplitter:
        return cls(ReasoningTokens.from_tokenizer(tokenizer), prompt_ids=prompt_ids, special_ids=tokenizer.special_ids)

    def _initial_state(self, prompt_ids: Sequence[int], special_ids: frozenset[int]) -> Channel:
        if not self.tokens.has_reasoning:
            return "content"
        # Walk back over the current turn's tail; a non-tag special (e.g. <|assistant|>) ends it, so an unclosed
        # <think> in an earlier turn does not count.
        for tid in reversed(prompt_ids):
            if tid == self.tokens.think_start:
                return "reasoning"
            if tid == self.tokens.think_end:
                return "content"
            if tid in special_ids and tid not in self._tags:
                break
        return "content"

    def add_token(self, token_id: int) -> Channel | None:
        """Route one generated id. Returns None for a reasoning tag (dropped from both channels)."""
        t = self.tokens
        if token_id in self._tags:
            if token_id == t.think_start:
                self.state = "reasoning"
            elif token_id in (t.think_end, t.answer_start, t.answer_end):
                self.state = "content"
            return None
        return self.state

    route = add_token

    def split(self, token_ids: Iterable[int]) -> tuple[list[int], list[int]]:
        """Route a whole sequence: (reasoning ids, content ids), tags dropped. Continues from the current state."""
        reasoning: list[int] = []
        content: list[int] = []
        for tid in token_ids:
            channel = self.add_token(int(tid))
            if channel == "reasoning":
                reasoning.append(int(tid))
            elif channel == "content":
                content.append(int(tid))
        return reasoning, content

    def reset(self) -> None:
        self.state = self.initial_state


class ReasoningStream:
    """Splitter + one incremental detokenizer per channel: `add_token(id)` -> (reasoning delta, content delta).

    The engine's output path (`engine/output.py`); `last_channel` is the channel of the last token (None: a tag).
    With `return_reasoning` off, concatenate the two deltas in order (the tags are gone either way). `tokens`:
    the tag ids when the caller has them already (else looked up in the tokenizer)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        tokens: ReasoningTokens | None = None,
    ) -> None:
        tags = tokens if tokens is not None else ReasoningTokens.from_tokenizer(tokenizer)
        self.splitter = ReasoningSplitter(tags, prompt_ids=prompt_ids, special_ids=tokenizer.special_ids)
        self.reasoning = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.content = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.last_channel: Channel | None = None

    def add_token(self, token_id: int) -> tuple[str, str]:
        channel = self.last_channel = self.splitter.add_token(token_id)
        if channel == "reasoning":
            self.reasoning.add_token(token_id)
        elif channel == "content":
            self.content.add_token(token_id)
        return self.reasoning.last_segment, self.content.last_segment

    def finalize(self) -> tuple[str, str]:
        self.reasoning.finalize()
        self.content.finalize()
        return self.reasoning.last_segment, self.content.last_segment

    @property
    def reasoning_text(self) -> str:
        return self.reasoning.text

    @property
    def content_text(self) -> str:
        return self.content.text
