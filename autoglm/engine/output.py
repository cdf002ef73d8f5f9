"""Output processing: sampled token ids -> text deltas per channel, stop strings, and the `RequestOutput` records.

Per request, an `OutputStream` puts each emitted token through `tokenizer/reasoning.py`'s `ReasoningStream` (the
reasoning splitter on tag ids + one incremental detokenizer per channel: never half a UTF-8 character, tags dropped)
and then through one `StopStringStream` per channel (stop strings cut exactly, text that may still become a stop
string held back). Stop token ids are the engine's business: they never reach this stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from autoglm.engine.sampler import TokenLogprob
from autoglm.errors import AutoGLMError
from autoglm.tokenizer.reasoning import ReasoningStream, ReasoningTokens
from autoglm.tokenizer.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas since the previous output)."""

    request_id: str
    new_token_ids: list[int]
    content_delta: str
    reasoning_delta: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_reasoning_tokens: int = 0
    prompt_logits: torch.Tensor | None = None  # [P, V] float32, only for score requests once finished
    first_token_time: float | None = None
    arrival_time: float | None = None
    error: AutoGLMError | None = None  # set when the engine ended the request (timeout): raise it to the client


@dataclass
class TextDelta:
    content: str = ""
    reasoning: str = ""

    def __iadd__(self, other: TextDelta) -> TextDelta:
        self.content += other.content
        self.reasoning += other.reasoning
        return self


class StopStringStream:
    """Cuts generated text at the first stop string; holds back a tail that could still start one.

    Stop strings may span token boundaries (the text is matched, not the tokens); the emitted text never includes
    the stop string. Stop strings containing multi-byte characters match exactly too.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything received
        self.emitted = 0  # chars of `text` already handed out
        self.stopped = False

    def push(self, segment: str) -> str:
        """Add decoded text; return what can be emitted now (sets `stopped` on a stop-string match)."""
        if self.stopped or not segment:
            return ""
        self.text += segment
        if not self.stops:
            return self._emit(len(self.text))
        longest = max(len(s) for s in self.stops)
        search_from = max(0, self.emitted - longest + 1)  # a match can only end in new text
        hits = [i for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        return self._emit(len(self.text) - self._held())

    def flush(self) -> str:
        """End of generation: release held-back text (it never became a stop string)."""
        return "" if self.stopped else self._emit(len(self.text))

    def _held(self) -> int:
        # longest suffix of `text` that is a proper prefix of some stop string
        for n in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out


class OutputStream:
    """One request's text path: `add_token(id)` -> TextDelta; `stopped` once a stop string matched; `finish()`
    flushes what detokenizers and stop streams held back (call it once, when the request ends)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        reasoning_tokens: ReasoningTokens | None = None,
    ) -> None:
        self.stream = ReasoningStream(
            tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens, tokens=reasoning_tokens
        )
        self.content = StopStringStream(stop)
        self.reasoning = StopStringStream(stop)
        self.num_reasoning_tokens = 0

    @property
    def stopped(self) -> bool:
        return self.content.stopped or self.reasoning.stopped

    def add_token(self, token_id: int) -> TextDelta:
        reasoning, content = self.stream.add_token(token_id)
        if self.stream.last_channel == "reasoning":
            self.num_reasoning_tokens += 1
        return TextDelta(self.content.push(content), self.reasoning.push(reasoning))

    def finish(self) -> TextDelta:
        reasoning, content = self.stream.finalize()
        return TextDelta(
            self.content.push(content) + self.content.flush(), self.reasoning.push(reasoning) + self.reasoning.flush()
        )
