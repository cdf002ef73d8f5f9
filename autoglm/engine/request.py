"""Per-request state: prompt and media, positions, sampling settings, output so far, text streams, timings.

Token bookkeeping (vLLM v1 style): `token_ids` = prompt + generated tokens; `num_computed_tokens` of them have K/V in
the cache. Every step the scheduler runs `token_ids[num_computed_tokens : num_computed_tokens + n]`; when that
reaches the end of `token_ids` the logits of the last one give the next token. A preempted request keeps its
generated tokens and recomputes everything (num_computed_tokens = 0).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from autoglm.engine.kv_cache import block_hash
from autoglm.engine.sampler import TokenLogprob
from autoglm.engine.sampling_params import SamplingParams
from autoglm.tokenizer.detokenizer import IncrementalDetokenizer
from autoglm.tokenizer.reasoning import ReasoningSplitter

if TYPE_CHECKING:
    from autoglm.engine.prompt import PromptInputs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class StopStringStream:
    """One text channel (content or reasoning) with stop-string hold-back.

    Text that could still turn into a stop string is held back until it cannot; on a match the text is cut right
    before the stop string and the channel is done. The detokenizer upstream never yields half a UTF-8 character,
    so stop strings containing multi-byte characters match exactly too.
    """

    def __init__(self, stops: list[str]) -> None:
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


@dataclass
class Request:
    request_id: str
    prompt: PromptInputs
    params: SamplingParams  # resolved (no None sampling fields)
    max_tokens: int  # resolved: params.max_tokens or the rest of the context
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) + params.stop_token_ids
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer  # content channel
    reasoning_detokenizer: IncrementalDetokenizer
    reasoning: ReasoningSplitter  # token id -> "reasoning" | "content" | None (a tag, dropped)
    return_prompt_logits: bool = False  # LLM.score: logits for every prompt position

    token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(default_factory=list)  # emitted tokens (never the stop token)
    num_generated: int = 0  # sampled tokens, incl. a final stop token (usage counts it, as vLLM)
    num_reasoning_tokens: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    media_embeds: dict[int, Tensor] = field(default_factory=dict)  # media index -> [n_slots, D], until prefilled
    prompt_logits: list[Tensor] = field(default_factory=list)  # chunks of [n, V] float32 when requested
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # tokens served from the prefix cache (all admissions)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix caching: chained hash per full block

    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() past which the request is ended (request_timeout)
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt.token_ids)
        self.content = StopStringStream(self.params.stop)
        self.reasoning_text = StopStringStream(self.params.stop)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_generated

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def positions(self, start: int, end: int) -> Tensor:
        """Positions of tokens [start, end): [n] for 1-D rotary, [3, n] for M-RoPE prompts."""
        mrope = self.prompt.positions
        if mrope is None:
            return torch.arange(start, end)
        n_prompt = mrope.shape[1]
        parts = []
        if start < n_prompt:
            parts.append(mrope[:, start : min(end, n_prompt)])
        if end > n_prompt:
            lo = max(start, n_prompt)
            parts.append((torch.arange(lo, end) + self.prompt.mrope_delta).expand(3, end - lo))
        return torch.cat(parts, 1)

    def full_block_hashes(self, num_tokens: int, block_size: int) -> list[bytes]:
        """Hashes of the full blocks among the first `num_tokens` tokens (computed once, extended as it grows)."""
        n_full = num_tokens // block_size
        while len(self.block_hashes) < n_full:
            i = len(self.block_hashes)
            lo, hi = i * block_size, (i + 1) * block_size
            media = [m.inputs.content_hash for m in self.prompt.media if m.offset < hi and m.offset + m.n_slots > lo]
            prev = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.append(block_hash(prev, self.token_ids[lo:hi], media))
        return self.block_hashes[:n_full]

    def reset_for_recompute(self) -> None:
        """Preempted: the cache is gone, the generated tokens stay and are recomputed with the prompt."""
        self.num_computed_tokens = 0
        self.media_embeds.clear()
        self.prompt_logits.clear()
        self.num_preemptions += 1
