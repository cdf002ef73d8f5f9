"""Continuous batching policy. Never touches tensors.

Each step is a token budget (`max_num_batched_tokens`) shared by the running requests and newly admitted ones:
1. running requests in arrival order, decodes first, then unfinished prefills (chunked: a prompt longer than the
   remaining budget gets a chunk and continues next step). A request that needs a new KV block when none is free
   preempts the newest running request (its blocks are freed; it goes back to the front of the waiting queue and is
   recomputed later), or itself when it is the newest.
2. waiting requests in order while there is budget, a batch slot (`max_num_seqs`) and KV blocks for their whole
   remaining prompt (so admitted prompts are not preempted by their own prefill). With prefix caching, a request
   whose next uncached block is being prefilled by a running request waits for it (FIFO, usually one step) and then
   shares it: N phone agents arriving together with the same system prompt compute it once, not N times.
A request's scheduled tokens are `num_tokens - num_computed_tokens` (capped by the budget): the whole prompt,
the rest of a chunked prompt, a recompute after preemption, or the single last token when decoding. In a step that
others share (another request runs, or one waits for admission with a slot free), each prefill chunk is also capped
at `long_prefill_token_threshold`: a long prompt no longer takes the whole budget while a short one waits behind it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from autoglm.engine.kv_cache import KVCacheManager
from autoglm.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """requests[i] runs num_new_tokens[i] tokens starting at its num_computed_tokens."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold  # 0: a prefill may take the whole budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # arrival (admission) order: newest last
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.num_prefix_waits = 0  # admissions held back a step to share a block being prefilled
        self.num_prefix_query_tokens = 0  # tokens looked up in the prefix cache at admission (hit-rate denominator)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # decodes first (one token each, latency-critical), then unfinished prefills
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        shared = len(self.running) > 1 or (bool(self.waiting) and len(self.running) < self.max_num_seqs)
        cap = self.long_prefill_token_threshold or budget
        scheduled: set[str] = set()
        for req in order:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if shared and n > 1:
                n = min(n, cap)
            while not self.kv.can_allocate(req.block_table, req.num_computed_tokens + n):
                victim = self._newest_unscheduled(scheduled)
                self._preempt(victim, batch)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            self.kv.allocate(req.block_table, req.num_computed_tokens + n)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            scheduled.add(req.request_id)
            budget -= n
        # admission: only when nothing was preempted this step (the cache is full) and in strict FIFO order
        pending: set[bytes] | None = None  # hashes of prompt blocks running requests have yet to compute
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            req = self.waiting[0]
            matched = self._cached_prefix(req)
            if self.kv.enable_prefix_caching and not req.return_prompt_logits:
                pending = self._pending_prefix_hashes() if pending is None else pending
                hashes = req.full_block_hashes(req.num_tokens - 1, self.kv.block_size)  # as _cached_prefix
                if len(matched) < len(hashes) and hashes[len(matched)] in pending:
                    self.num_prefix_waits += 1
                    break
            if not self.kv.can_allocate_with_prefix(matched, req.num_tokens):
                break
            self.waiting.popleft()
            self.kv.share(req.block_table, matched)
            req.num_computed_tokens = len(matched) * self.kv.block_size
            if self.kv.enable_prefix_caching and not req.return_prompt_logits:
                self.num_prefix_query_tokens += req.num_tokens
            req.num_cached_tokens += req.num_computed_tokens
            self.num_cached_tokens += req.num_computed_tokens
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if batch.requests or self.waiting:  # others share this step
                n = min(n, cap)
            self.kv.allocate(req.block_table, req.num_tokens)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
            if pending is not None:  # its prompt blocks are now being prefilled too
                pending.update(self._uncomputed_hashes(req))
        return batch

    def _cached_prefix(self, req: Request) -> list[int]:
        if not self.kv.enable_prefix_caching or req.return_prompt_logits:  # scoring needs every position computed
            return []
        # at least the last token is computed: its logits give the next token
        return self.kv.match_prefix(req.full_block_hashes(req.num_tokens - 1, self.kv.block_size))

    def _pending_prefix_hashes(self) -> set[bytes]:
        out: set[bytes] = set()
        for r in self.running:
            out.update(self._uncomputed_hashes(r))
        return out

    def _uncomputed_hashes(self, r: Request) -> list[bytes]:
        if not r.is_prefilling or r.return_prompt_logits:
            return []
        bs = self.kv.block_size
        return r.full_block_hashes(r.num_prompt_tokens, bs)[r.num_computed_tokens // bs :]

    def _newest_unscheduled(self, scheduled: set[str]) -> Request:
        # Running requests are visited oldest first, so the newest ones are not scheduled yet (or it is `req` itself).
        for r in reversed(self.running):
            if r.request_id not in scheduled:
                return r
        raise RuntimeError("scheduler: no request left to preempt")

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.running.remove(req)
        self.kv.free(req.block_table)
        req.reset_for_recompute()
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        batch.preempted.append(req)
        self.num_preemptions += 1

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request wherever it is and free its blocks at once (finish, abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.block_table)
        req.status = status
