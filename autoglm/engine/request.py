"""Per-request state: prompt and media, positions, sampling settings, output so far, its output stream, timings.

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
from autoglm.engine.output import OutputStream
from autoglm.engine.sampler import TokenLogprob
from autoglm.engine.sampling_params import SamplingParams
from autoglm.models.positions import PromptPositions

if TYPE_CHECKING:
    from autoglm.engine.grammar import GrammarState
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


@dataclass(slots=True)  # declared state only: an undeclared attribute is an AttributeError
class Request:
    request_id: str
    prompt: PromptInputs
    params: SamplingParams  # resolved (no None sampling fields)
    max_tokens: int  # resolved: params.max_tokens or the rest of the context
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) + params.stop_token_ids
    generator: torch.Generator
    output: OutputStream  # emitted ids -> content / reasoning text, stop strings
    positions: PromptPositions  # the decoder's positions of the prompt (`span(start, end)` for any tokens)
    return_prompt_logits: bool = False  # LLM.score: logits for every prompt position

    token_ids: list[int] = field(init=False)  # prompt + emitted tokens
    output_token_ids: list[int] = field(default_factory=list)  # emitted tokens (never the stop token)
    num_generated: int = 0  # sampled tokens, incl. a final stop token (usage counts it, as vLLM)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    media_embeds: dict[int, Tensor] = field(default_factory=dict)  # media index -> [n_slots, D], until prefilled
    prompt_logits: list[Tensor] = field(default_factory=list)  # chunks of [n, V] float32 when requested
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # tokens served from the prefix cache (all admissions)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix caching: chained hash per full block
    grammar_state: GrammarState | None = None  # params.grammar's position for this sequence (new at admission)

    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() past which the request is ended (request_timeout)
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt.token_ids)

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
    def num_reasoning_tokens(self) -> int:
        return self.output.num_reasoning_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

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
