"""The synchronous engine: add requests, `step()` the batch, read `RequestOutput`s. Not thread-safe by itself
(`AsyncEngine` drives it from one thread).

A step: expire requests past their deadline -> the scheduler picks tokens -> the runner packs, runs and samples ->
each sampled token goes through its request's `OutputStream` (`output.py`: detokenizer, reasoning split, stop
strings; stop ids are never emitted) -> finished requests free their KV blocks. KV sizing is `memory.py`'s; a
request's positions are its decoder's (`prompt_positions`), computed once when the request is made.
"""

from __future__ import annotations

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
from autoglm.engine.scheduler import Scheduler
from autoglm.errors import ContextTooLong, InvalidRequest, Overloaded, RequestTimeout
from autoglm.models.loaded import LoadedModel
from autoglm.tokenizer.reasoning import ReasoningTokens

__all__ = ["Engine", "RequestOutput"]


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config = config or EngineConfig()
        plan = plan_kv_cache(model, config, config.max_model_len or model.max_model_len)
        self.kv = KVCacheManager(plan.num_blocks, plan.block_size, config.enable_prefix_caching)
        # A sequence can never outgrow the whole cache: that bounds the context too.
        self.max_model_len = min(config.max_model_len or model.max_model_len, self.kv.capacity_tokens)
        self.kv_cache_bytes = plan.bytes
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens
        )
        self.runner = ModelRunner(model, plan, encoder_cache_memory=config.encoder_cache_memory)
        self.requests: dict[str, Request] = {}
        self.num_generated_tokens = 0
        self.num_timeouts = 0
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
        self._check_logit_bias(params)
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
        return req

    def _check_prompt(self, prompt: PromptInputs) -> None:
        if not prompt.token_ids:
            raise InvalidRequest("the prompt is empty", param="messages")
        vocab = self.model.decoder.vocab_size
        if bad := [t for t in prompt.token_ids if not 0 <= t < vocab]:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")

    def _check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.model.decoder.vocab_size
        if bad := [t for t in params.logit_bias or {} if t >= vocab]:
            raise InvalidRequest(
                f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="logit_bias"
            )

    def _max_tokens(self, n_prompt: int, params: SamplingParams) -> int:
        """params.max_tokens, or the rest of the context; ContextTooLong when the two do not fit."""
        check_context(n_prompt, params.max_tokens, self.max_model_len)
        return params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt

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
        sampled = self.runner.run(batch)
        self.num_steps += 1
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            self._advance(req, n)
        now = time.monotonic()
        outputs.extend(self._process_token(req, token, logprob, now) for req, token, logprob in sampled)
        return outputs

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
        if status is not None:
            delta += req.output.finish()
            self.scheduler.finish(req, status)
            self.requests.pop(req.request_id, None)
        return self._output(req, new_ids, delta, logprobs)

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
            "steps": self.num_steps,
            "max_model_len": self.max_model_len,
        }

    def close(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)
        self.runner.release()


def check_context(n_prompt: int, max_tokens: int | None, max_model_len: int) -> None:
    """ContextTooLong (OpenAI's wording) when the prompt, or the prompt plus `max_tokens`, exceeds the context."""
    if max_tokens is not None and n_prompt + max_tokens > max_model_len:
        raise ContextTooLong(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="max_tokens",
        )
    if n_prompt >= max_model_len:
        raise ContextTooLong(
            f"This model's maximum context length is {max_model_len} tokens. However, your messages resulted in "
            f"{n_prompt} tokens. Please reduce the length of the messages.",
            param="messages",
        )
