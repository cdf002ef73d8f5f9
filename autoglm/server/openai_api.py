"""`/v1/*` routes: chat and text completions (SSE or JSON) and the model list — OpenAI wire formatting only.

A request flows: validate (protocol.py) -> resolve model name and reasoning mode -> build the prompt (chat template,
media routed to its encoder, off the event loop) -> `generation.Generation` (context check, admission, the engine,
disconnects, metrics) -> its typed events formatted here as SSE chunks or one JSON body. The first engine output is
awaited before the response starts, so a request the engine rejects is still a clean 4xx; after that, errors travel
in-band (`data: {"error": ...}` then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from autoglm.engine.prompt import build_chat_prompt, build_text_prompt
from autoglm.engine.sampler import TokenLogprob
from autoglm.server import responses
from autoglm.server.errors_http import REQUEST_ID_HEADER, request_id_of, stream_error_event
from autoglm.server.generation import Admitted, Delta, Failed, Finished, Generation, Usage
from autoglm.server.limits import ParsedJSONRoute
from autoglm.server.protocol import ChatCompletionRequest, CompletionRequest
from autoglm.server.reasoning_format import resolve_mode
from autoglm.server.state import get_state

log = logging.getLogger("autoglm.server")


def _authorized(request: Request) -> None:
    get_state(request).check_api_key(request)


router = APIRouter(prefix="/v1", dependencies=[Depends(_authorized)], route_class=ParsedJSONRoute)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    root = state.model.path if state.model is not None else (state.config.model or "default")
    created = int(state.started)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "autoglm", "root": root,
         "parent": None if i == 0 else state.served_names[0], "max_model_len": state.max_model_len}
        for i, name in enumerate(state.served_names)
    ]
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    arrival = time.monotonic()  # TTFT counts prompt building and media decoding too
    state = get_state(request)
    rid = request_id_of(request)
    name = state.resolve_model_name(body.model)
    _log_unknown(rid, body)
    params = body.sampling_params()
    thinking = body.thinking()
    mode = resolve_mode(state.config.reasoning_format, reasoning_format=body.reasoning_format,
                        return_reasoning=body.return_reasoning, enable_thinking=thinking)
    model = state.ready_model()
    kwargs = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k != "enable_thinking"}
    messages = [m.to_engine() for m in body.messages]
    prompt = await asyncio.to_thread(
        build_chat_prompt, model, messages, enable_thinking=thinking, chat_template_kwargs=kwargs,
        content_format="string", media_policy=state.media, max_media=state.config.limit_mm_per_prompt,
    )
    gen = Generation(state, request, rid=rid, endpoint="chat", model_name=name, stream=body.stream, mode=mode,
                     arrival=arrival)
    await gen.start(prompt, params)
    fmt = _OpenAIFormat(gen, chat=True, include_usage=body.include_usage)
    return fmt.stream() if body.stream else await fmt.json()


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    arrival = time.monotonic()
    state = get_state(request)
    rid = request_id_of(request)
    name = state.resolve_model_name(body.model)
    _log_unknown(rid, body)
    params = body.sampling_params()
    model = state.ready_model()
    prompt = await asyncio.to_thread(build_text_prompt, model, body.single_prompt())
    gen = Generation(state, request, rid=rid, endpoint="completions", model_name=name, stream=body.stream,
                     mode="merged", arrival=arrival)
    await gen.start(prompt, params)
    fmt = _OpenAIFormat(gen, chat=False, include_usage=body.include_usage)
    return fmt.stream() if body.stream else await fmt.json()


def _log_unknown(rid: str, body: Any) -> None:
    unknown = body.unknown_keys()
    if unknown:
        log.info("request %s: ignoring unknown field(s) %s", rid, ", ".join(unknown))


class _OpenAIFormat:
    """Generation events -> OpenAI chat / text-completion chunks (SSE) or one JSON body."""

    def __init__(self, gen: Generation, *, chat: bool, include_usage: bool) -> None:
        self.gen = gen
        self.chat = chat
        self.include_usage = include_usage
        self.created = int(gen.started_wall)
        self.cid = ("chatcmpl-" if chat else "cmpl-") + gen.rid
        model = gen.state.model
        self.tokenizer = model.tokenizer if model is not None else None

    def stream(self) -> StreamingResponse:
        return StreamingResponse(
            self._sse(), media_type="text/event-stream",
            headers={REQUEST_ID_HEADER: self.gen.rid, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def json(self) -> JSONResponse:
        done = await self.gen.collect()
        usage = _usage(done.usage)
        name = self.gen.model_name
        if self.chat:
            body = responses.chat_completion(
                self.cid, self.created, name, done.content, done.reasoning, done.finish_reason, usage,
                responses.chat_logprobs(done.logprobs, self.tokenizer) if done.logprobs else None,
            )
        else:
            body = responses.text_completion(
                self.cid, self.created, name, done.content, done.finish_reason, usage,
                responses.completion_logprobs(done.logprobs, self.tokenizer) if done.logprobs else None,
            )
        return JSONResponse(body, headers={REQUEST_ID_HEADER: self.gen.rid})

    async def _sse(self) -> AsyncIterator[str]:
        name = self.gen.model_name
        async with contextlib.aclosing(self.gen.events()) as events:
            async for event in events:
                if isinstance(event, Admitted):
                    if self.chat:
                        yield _event(responses.chat_chunk(self.cid, self.created, name,
                                                          {"role": "assistant", "content": ""}))
                elif isinstance(event, Delta):
                    yield _event(self._chunk(event.content, event.reasoning, event.logprobs, None))
                elif isinstance(event, Finished):
                    yield _event(self._chunk("", "", [], event.reason))
                    if self.include_usage:
                        cls = responses.chat_chunk if self.chat else responses.completion_chunk
                        yield _event(cls(self.cid, self.created, name, None, usage=_usage(event.usage)))
                    yield "data: [DONE]\n\n"
                elif isinstance(event, Failed):
                    yield _event(stream_error_event(event.error, self.gen.rid))
                    yield "data: [DONE]\n\n"

    def _chunk(self, content: str, reasoning: str, lp: list[TokenLogprob], finish_reason: str | None) -> dict[str, Any]:
        name = self.gen.model_name
        if self.chat:
            delta: dict[str, Any] = {}
            if content:
                delta["content"] = content
            if reasoning:
                delta["reasoning_content"] = reasoning
                delta["reasoning"] = reasoning
            return responses.chat_chunk(
                self.cid, self.created, name, delta, finish_reason=finish_reason,
                logprobs=responses.chat_logprobs(lp, self.tokenizer) if lp else None,
            )
        return responses.completion_chunk(
            self.cid, self.created, name, content, finish_reason=finish_reason,
            logprobs=responses.completion_logprobs(lp, self.tokenizer) if lp else None,
        )


def _usage(usage: Usage) -> dict[str, Any]:
    return responses.usage(usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens)


def _event(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"
