"""The synchronous engine: add requests, `step()` the batch, read `RequestOutput`s. Not thread-safe by itself
(`AsyncEngine` drives it from one thread).

A step: the scheduler picks tokens for this step -> the runner packs, runs and samples -> each sampled token goes
through the request's detokenizer (never half a UTF-8 character), its reasoning splitter (tag tokens dropped) and
stop checks (stop ids are never emitted; stop strings are cut exactly) -> finished requests free their KV blocks.
Before scheduling, requests past their deadline (`request_timeout`) are ended with a `RequestTimeout` error output.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from autoglm.config import EngineConfig
from autoglm.engine.kv_cache import KVCacheManager, plan_num_blocks
from autoglm.engine.prompt import PromptInputs
from autoglm.engine.request import Request, RequestStatus
from autoglm.engine.runner import ModelRunner, decoder_dtype_device, kv_bytes_per_block
from autoglm.engine.sampler import TokenLogprob
from autoglm.engine.sampling_params import SamplingParams
from autoglm.engine.scheduler import Scheduler
from autoglm.errors import AutoGLMError, ContextTooLong, InvalidRequest, Overloaded, RequestTimeout
from autoglm.models.loaded import LoadedModel
from autoglm.tokenizer.detokenizer import IncrementalDetokenizer
from autoglm.tokenizer.reasoning import ReasoningSplitter, ReasoningTokens

_DTYPE_BYTES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config = config or EngineConfig()
        model_len = config.max_model_len or model.max_model_len
        dtype, _ = decoder_dtype_device(model)
        cache_dtype = dtype if config.kv_cache_dtype == "auto" else _DTYPE_BYTES[config.kv_cache_dtype]
        bytes_per_block = kv_bytes_per_block(model, config.block_size, cache_dtype)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            budget = config.kv_cache_memory or int(psutil.virtual_memory().available * config.kv_cache_fraction)
            num_blocks = plan_num_blocks(
                block_size=config.block_size,
                bytes_per_block=bytes_per_block,
                max_model_len=model_len,
                max_num_seqs=config.max_num_seqs,
                budget_bytes=budget,
            )
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # A sequence can never outgrow the whole cache: that bounds the context too.
        self.max_model_len = min(model_len, self.kv.capacity_tokens)
        self.kv_cache_bytes = num_blocks * bytes_per_block
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens
        )
        self.runner = ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=config.block_size,
            kv_cache_dtype=config.kv_cache_dtype,
            encoder_cache_memory=config.encoder_cache_memory,
        )
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
        n_prompt = len(prompt.token_ids)
        if n_prompt == 0:
            raise InvalidRequest("the prompt is empty", param="messages")
        vocab = int(getattr(self.model.decoder, "vocab_size", 0) or 0)
        if vocab and (bad := [t for t in prompt.token_ids if not 0 <= t < vocab]):
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        params = params.resolve(self.model.generation_defaults)
        if vocab and (bad := [t for t in params.logit_bias or {} if t >= vocab]):
            raise InvalidRequest(
                f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="logit_bias"
            )
        n_max = self.max_model_len
        if params.max_tokens is not None and n_prompt + params.max_tokens > n_max:
            raise ContextTooLong(
                f"This model's maximum context length is {n_max} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the messages, {params.max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        if n_prompt >= n_max:
            raise ContextTooLong(
                f"This model's maximum context length is {n_max} tokens. However, your messages resulted in "
                f"{n_prompt} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else n_max - n_prompt
        if params.max_tokens is None and self.config.default_max_tokens:  # bounded default (EngineConfig says why)
            max_tokens = min(max_tokens, self.config.default_max_tokens)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        timeout = timeout if timeout is not None else self.config.request_timeout
        if timeout is not None and timeout <= 0:
            raise InvalidRequest(f"timeout must be > 0 seconds, got {timeout}", param="timeout")
        tok = self.model.tokenizer
        req = Request(
            request_id=request_id,
            prompt=prompt,
            params=params,
            max_tokens=max_tokens,
            stop_token_ids=stop_ids,
            generator=torch.Generator().manual_seed(seed),
            detokenizer=IncrementalDetokenizer(tok, skip_special_tokens=params.skip_special_tokens),
            reasoning_detokenizer=IncrementalDetokenizer(tok, skip_special_tokens=params.skip_special_tokens),
            reasoning=ReasoningSplitter(
                self._reasoning_tokens, prompt_ids=prompt.token_ids, special_ids=tok.special_ids
            ),
            return_prompt_logits=return_prompt_logits,
        )
        if timeout is not None:
            req.deadline = req.arrival_time + timeout
        return req

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
        return self._output(req, [], "", "", [])

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
        expired = self.expire() if self._has_deadlines else []
        batch = self.scheduler.schedule()
        if not batch.requests:
            return expired
        sampled = self.runner.run(batch)
        self.num_steps += 1
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            req.num_computed_tokens += n
            if self.kv.enable_prefix_caching:
                self.kv.register_full_blocks(
                    req.block_table, req.full_block_hashes(req.num_computed_tokens, self.kv.block_size)
                )
            if req.media_embeds and not req.is_prefilling:
                req.media_embeds.clear()  # cached only until the prompt's slots are in the KV cache
        now = time.monotonic()
        outputs = expired
        for req, token, logprob in sampled:
            outputs.append(self._process_token(req, token, logprob, now))
        return outputs

    def _process_token(self, req: Request, token: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        self.num_generated_tokens += 1
        req.num_generated += 1
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        content, reasoning = "", ""
        new_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        status: RequestStatus | None = None
        if token in req.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED  # never emitted
        else:
            new_ids.append(token)
            req.token_ids.append(token)
            req.output_token_ids.append(token)
            if logprob is not None:
                logprobs.append(logprob)
                req.logprobs.append(logprob)
            channel = req.reasoning.add_token(token)  # None: a reasoning tag, dropped from both channels
            if channel == "reasoning":
                req.num_reasoning_tokens += 1
                req.reasoning_detokenizer.add_token(token)
                reasoning = req.reasoning_text.push(req.reasoning_detokenizer.last_segment)
            elif channel == "content":
                req.detokenizer.add_token(token)
                content = req.content.push(req.detokenizer.last_segment)
            if req.content.stopped or req.reasoning_text.stopped:
                status = RequestStatus.FINISHED_STOPPED
            elif req.num_generated >= req.max_tokens or req.num_tokens >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            req.detokenizer.finalize()
            req.reasoning_detokenizer.finalize()
            content += req.content.push(req.detokenizer.last_segment) + req.content.flush()
            reasoning += req.reasoning_text.push(req.reasoning_detokenizer.last_segment) + req.reasoning_text.flush()
            self.scheduler.finish(req, status)
            self.requests.pop(req.request_id, None)
        return self._output(req, new_ids, content, reasoning, logprobs)

    def _output(
        self, req: Request, new_ids: list[int], content: str, reasoning: str, logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        finished = req.status.finished
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            content_delta=content,
            reasoning_delta=reasoning,
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
