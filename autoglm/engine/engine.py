"""The synchronous engine: add requests, `step()` the batch, read `RequestOutput`s. Not thread-safe by itself
(`AsyncEngine` drives it from one thread).

A step: expire requests past their deadline -> the scheduler picks tokens -> the runner packs, runs and samples ->
each sampled token goes through its request's `OutputStream` (`output.py`: detokenizer, reasoning split, stop
strings; stop ids are never emitted) -> finished requests free their KV blocks. KV sizing is `memory.py`'s; a
request's positions are its decoder's (`prompt_positions`), computed once when the request is made.

Isolation: when the runner raises, the step is re-run on halves of the batch (recursively) until the request(s)
that make it fail are alone; only those end (their output carries the error), the others continue with the tokens
they would have had alone. Re-running is safe: a retried token writes the same K/V to the same slots, and each
request's random generator and score logits are restored to their state before the failed attempt.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import torch

from autoglm.config import EngineConfig
from autoglm.engine.kv_cache import KVCacheManager
from autoglm.engine.memory import plan_kv_cache
from autoglm.engine.output import OutputStream, RequestOutput, TextDelta
from autoglm.engine.prompt import PromptInputs
from autoglm.engine.request import Request, RequestStatus
from autoglm.engine.runner import ModelRunner
from autoglm.engine.sampler import TokenLogprob
from autoglm.engine.sampling_params import SamplingParams
from autoglm.engine.scheduler import ScheduledBatch, Scheduler
from autoglm.errors import AutoGLMError, ContextTooLong, InvalidRequest, Overloaded, RequestFailed, RequestTimeout
from autoglm.models.loaded import LoadedModel
from autoglm.tokenizer.reasoning import ReasoningTokens

__all__ = ["Engine", "RequestOutput"]

log = logging.getLogger("autoglm.engine")

Sampled = list[tuple[Request, int, TokenLogprob | None]]


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config = config or EngineConfig()
        plan = plan_kv_cache(model, config, config.max_model_len or model.max_model_len)
        self.kv = KVCacheManager(plan.num_blocks, plan.block_size, config.enable_prefix_caching)
        # A sequence can never outgrow the whole cache: that bounds the context too.
        self.max_model_len = min(config.max_model_len or model.max_model_len, self.kv.capacity_tokens)
        self.kv_cache_bytes = plan.bytes
        self.kv_cache_rule = plan.rule
        log.info("KV cache: %s; context %d tokens", plan.rule, self.max_model_len)
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
        )
        self.runner = ModelRunner(
            model, plan, encoder_cache_memory=config.encoder_cache_memory,
            attention_backend=config.attention_backend, cuda_graphs=config.cuda_graphs,
            deterministic=config.deterministic,
        )
        self.requests: dict[str, Request] = {}
        self.num_generated_tokens = 0
        self.num_timeouts = 0
        self.num_failed = 0  # requests ended alone because their step raised
        self.num_isolation_retries = 0  # failed step attempts that were split to find the failing request
        self._has_deadlines = False  # skip the per-step deadline scan until some request has one
        self.num_steps = 0
        self._eos = frozenset(model.eos_token_ids)
        self._reasoning_tokens = ReasoningTokens.from_tokenizer(model.tokenizer)

    # --- requests -------------------------------------------------------------------------------------------------
    def make_request(
        self,
        request_id: str,
        prompt: PromptInputs,
        params: SamplingParams,
        *,
        return_prompt_logits: bool = False,
        timeout: float | None = None,
    ) -> Request:
        """Validate and build a request without touching engine state (safe from any thread).

        timeout: seconds from now until the request is ended with RequestTimeout (default: `request_timeout`)."""
        self._check_prompt(prompt)
        params = params.resolve(self.model.generation_defaults)
        self._check_token_ids(params)
        max_tokens = self._max_tokens(len(prompt.token_ids), params)
        timeout = self._timeout(timeout)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        req = Request(
            request_id=request_id,
            prompt=prompt,
            params=params,
            max_tokens=max_tokens,
            stop_token_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos),
            generator=torch.Generator().manual_seed(seed),
            output=OutputStream(
                self.model.tokenizer, prompt_ids=prompt.token_ids, stop=params.stop,
                skip_special_tokens=params.skip_special_tokens, reasoning_tokens=self._reasoning_tokens,
            ),
            positions=self.model.decoder.prompt_positions(len(prompt.token_ids), prompt.spans),
            return_prompt_logits=return_prompt_logits,
        )
        if timeout is not None:
            req.deadline = req.arrival_time + timeout
        if params.grammar is not None:
            req.grammar_state = params.grammar.new_state()
        return req

    def _check_prompt(self, prompt: PromptInputs) -> None:
        if not prompt.token_ids:
            raise InvalidRequest("the prompt is empty", param="messages")
        vocab = self.model.decoder.vocab_size
        if bad := [t for t in prompt.token_ids if not 0 <= t < vocab]:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.model.decoder.vocab_size
        if bad := [t for t in params.logit_bias or {} if t >= vocab]:
            raise InvalidRequest(
                f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="logit_bias"
            )
        if bad := [t for t in params.stop_token_ids if t >= vocab]:  # could never match: a client mistake
            raise InvalidRequest(
                f"stop_token_ids: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="stop_token_ids"
            )

    def _max_tokens(self, n_prompt: int, params: SamplingParams) -> int:
        """params.max_tokens, or the rest of the context bounded by `default_max_tokens` (EngineConfig says why);
        ContextTooLong when the prompt and params.max_tokens do not fit."""
        check_context(n_prompt, params.max_tokens, self.max_model_len)
        if params.max_tokens is not None:
            return params.max_tokens
        rest = self.max_model_len - n_prompt
        return min(rest, self.config.default_max_tokens) if self.config.default_max_tokens else rest

    def _timeout(self, timeout: float | None) -> float | None:
        timeout = timeout if timeout is not None else self.config.request_timeout
        if timeout is not None and timeout <= 0:
            raise InvalidRequest(f"timeout must be > 0 seconds, got {timeout}", param="timeout")
        return timeout

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise Overloaded(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        self._has_deadlines = self._has_deadlines or request.deadline is not None

    def add_request(
        self, request_id: str, prompt: PromptInputs, params: SamplingParams | None = None, **kw: Any
    ) -> Request:
        req = self.make_request(request_id, prompt, params or SamplingParams(), **kw)
        self.add(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (None if unknown or done)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        return self._output(req, [], TextDelta(), [])

    def expire(self, now: float | None = None) -> list[RequestOutput]:
        """End every request past its deadline (blocks freed); their outputs carry a RequestTimeout `error`."""
        now = time.monotonic() if now is None else now
        out = []
        for req in [r for r in self.requests.values() if r.deadline is not None and r.deadline <= now]:
            final = self.abort(req.request_id)
            assert final is not None
            limit = req.deadline - req.arrival_time  # type: ignore[operator]
            final.error = RequestTimeout(
                f"request {req.request_id} timed out after {limit:g} s ({req.num_generated} tokens generated)",
                param="timeout",
            )
            self.num_timeouts += 1
            out.append(final)
        self._has_deadlines = any(r.deadline is not None for r in self.requests.values())
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop -------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self.expire() if self._has_deadlines else []
        batch = self.scheduler.schedule()
        if not batch.requests:
            return outputs
        sampled, failed = self._run_isolated(batch.requests, batch.num_new_tokens)
        self.num_steps += 1
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            if req.request_id not in failed:
                self._advance(req, n)
        for req, exc in failed.values():
            outputs.append(self._fail(req, exc))
        now = time.monotonic()
        outputs.extend(self._process_token(req, token, logprob, now) for req, token, logprob in sampled)
        return outputs

    def _run_isolated(
        self, reqs: list[Request], ns: list[int]
    ) -> tuple[Sampled, dict[str, tuple[Request, Exception]]]:
        """runner.run on these rows; on an exception, bisect until each failing request is alone.
        -> (sampled tokens of the rows that ran, {request id: (request, its error)})."""
        # What a failed attempt may have consumed or appended, restored before the retry (K/V writes are idempotent).
        saved = [(r.generator.get_state(), len(r.prompt_logits)) for r in reqs]
        try:
            return self.runner.run(ScheduledBatch(list(reqs), list(ns))), {}
        except Exception as exc:  # noqa: BLE001 - any model/sampler error: isolate it to its request
            for r, (state, n_logits) in zip(reqs, saved, strict=True):
                r.generator.set_state(state)
                del r.prompt_logits[n_logits:]
            if len(reqs) == 1:
                return [], {reqs[0].request_id: (reqs[0], exc)}
            self.num_isolation_retries += 1
            mid = len(reqs) // 2
            sampled_a, failed_a = self._run_isolated(reqs[:mid], ns[:mid])
            sampled_b, failed_b = self._run_isolated(reqs[mid:], ns[mid:])
            return sampled_a + sampled_b, failed_a | failed_b

    def _fail(self, req: Request, exc: Exception) -> RequestOutput:
        """End one request whose step raised (blocks freed); its output carries the error, naming the cause."""
        self.num_failed += 1
        log.error("request %s failed in the model step; ending it alone (%d other request(s) continue)",
                  req.request_id, len(self.requests) - 1, exc_info=exc)
        final = self.abort(req.request_id)
        assert final is not None
        if isinstance(exc, AutoGLMError):
            final.error = exc
        else:
            final.error = RequestFailed(
                f"request {req.request_id} failed in the model step ({type(exc).__name__}: {exc}); "
                "only this request was ended", code="engine_step_failed",
            )
        return final

    def _advance(self, req: Request, n: int) -> None:
        """`n` more of the request's tokens are in the KV cache."""
        req.num_computed_tokens += n
        if self.kv.enable_prefix_caching:
            self.kv.register_full_blocks(
                req.block_table, req.full_block_hashes(req.num_computed_tokens, self.kv.block_size)
            )
        if req.media_embeds and not req.is_prefilling:
            req.media_embeds.clear()  # cached only until the prompt's slots are in the KV cache

    def _process_token(self, req: Request, token: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        self.num_generated_tokens += 1
        req.num_generated += 1
        req.first_token_time = req.first_token_time or now
        req.last_token_time = now
        if token in req.stop_token_ids:  # never emitted
            new_ids, logprobs, delta, status = [], [], TextDelta(), RequestStatus.FINISHED_STOPPED
        else:
            new_ids, logprobs = [token], [logprob] if logprob is not None else []
            req.token_ids.append(token)
            req.output_token_ids.append(token)
            req.logprobs.extend(logprobs)
            delta = req.output.add_token(token)
            status = self._status(req)
            grammar = req.grammar_state
            if grammar is not None and status is None:
                if not grammar.accept(token):
                    return self._grammar_failed(req, token)
                if grammar.is_terminated():  # complete: only end-of-sequence could follow
                    status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            delta += req.output.finish()
            self.scheduler.finish(req, status)
            self.requests.pop(req.request_id, None)
        return self._output(req, new_ids, delta, logprobs)

    def _grammar_failed(self, req: Request, token: int) -> RequestOutput:
        """The sampled token broke the request's grammar (the mask should make this impossible): end it alone."""
        from autoglm.engine.grammar import is_limit_error, short_error  # here: the engine does not need llguidance

        why = req.grammar_state.error if req.grammar_state is not None else None
        final = self.abort(req.request_id)
        assert final is not None
        if why is not None and is_limit_error(why):  # the client's grammar outgrew the parser: theirs to fix
            grammar = req.params.grammar
            param = grammar.spec.param if grammar is not None else None
            final.error = InvalidRequest(
                f"{param or 'grammar'}: the grammar is too large or complex for the output parser: {short_error(why)}",
                param=param, code="grammar_too_complex",
            )
        else:
            final.error = RequestFailed(
                f"request {req.request_id}: token {token} does not follow the output grammar "
                f"({short_error(why) if why else 'refused'})",
                code="grammar_violation",
            )
        self.num_failed += 1
        return final

    def _status(self, req: Request) -> RequestStatus | None:
        if req.output.stopped:
            return RequestStatus.FINISHED_STOPPED
        if req.num_generated >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _output(
        self, req: Request, new_ids: list[int], delta: TextDelta, logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        finished = req.status.finished
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            content_delta=delta.content,
            reasoning_delta=delta.reasoning,
            finished=finished,
            finish_reason=req.finish_reason,
            logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_reasoning_tokens=req.num_reasoning_tokens,
            prompt_logits=torch.cat(req.prompt_logits) if finished and req.prompt_logits else None,
            first_token_time=req.first_token_time,
            arrival_time=req.arrival_time,
        )

    def stats(self) -> dict[str, Any]:
        queried = self.scheduler.num_prefix_query_tokens
        enc = self.runner.encoder_cache
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_used": self.kv.num_used_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_block_size": self.kv.block_size,
            "kv_cache_bytes": self.kv_cache_bytes,
            "tokens_generated": self.num_generated_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_enabled": self.kv.enable_prefix_caching,
            "prefix_cache_hit_tokens": self.scheduler.num_cached_tokens,
            "prefix_cache_query_tokens": queried,
            "prefix_cache_hit_rate": self.scheduler.num_cached_tokens / queried if queried else 0.0,
            "encoder_runs": self.runner.num_encoder_runs,
            "encoder_cache_hits": enc.hits,
            "encoder_cache_items": len(enc),
            "encoder_cache_bytes": enc.bytes,
            "timeouts": self.num_timeouts,
            "requests_failed": self.num_failed,
            "isolation_retries": self.num_isolation_retries,
            "steps": self.num_steps,
            "max_model_len": self.max_model_len,
        }

    def close(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)
        self.runner.release()


def check_context(n_prompt: int, max_tokens: int | None, max_model_len: int, what: str = "messages") -> None:
    """ContextTooLong (OpenAI's wording) when the prompt, or the prompt plus `max_tokens`, exceeds the context.
    `what` names the input ("messages" for chat, "prompt" for completions): the prompt alone is blamed on it."""
    if n_prompt >= max_model_len:
        raise ContextTooLong(
            f"This model's maximum context length is {max_model_len} tokens. However, your {what} resulted in "
            f"{n_prompt} tokens. Please reduce the length of the {what}.",
            param=what,
        )
    if max_tokens is not None and n_prompt + max_tokens > max_model_len:
        raise ContextTooLong(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param="max_tokens",
        )
