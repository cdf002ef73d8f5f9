"""`/v1/*` routes: chat and text completions (SSE or JSON) and the model list.

A request flows: validate (protocol.py) -> resolve model name, reasoning mode, media caps -> build the prompt (chat
template + image decoding, off the event loop) -> context-length check -> `AsyncEngine.generate` -> wire chunks.
The first engine output is awaited before the response starts, so a request the engine rejects is still a clean
4xx; after that, errors travel in-band (`data: {"error": ...}` then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import ContextTooLong, MediaError, RequestAborted
from autoglm.server import responses
from autoglm.server.errors_http import REQUEST_ID_HEADER, request_id_of, stream_error_event
from autoglm.server.limits import ParsedJSONRoute
from autoglm.server.metrics import RequestRecord
from autoglm.server.protocol import ChatCompletionRequest, CompletionRequest
from autoglm.server.reasoning_format import ReasoningFormatter, resolve_mode
from autoglm.server.speech_chat import capabilities, transcribe_audio_parts
from autoglm.server.state import ServerState, get_state

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
         "parent": None if i == 0 else state.served_names[0], "max_model_len": state.max_model_len,
         "capabilities": capabilities(state)}
        for i, name in enumerate(state.served_names)
    ]
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    arrival = time.monotonic()  # TTFT counts prompt building and image decoding too
    state = get_state(request)
    rid = request_id_of(request)
    name = state.resolve_model_name(body.model)
    _log_unknown(rid, body)
    params = body.sampling_params()
    thinking = body.thinking()
    mode = resolve_mode(state.config.reasoning_format, reasoning_format=body.reasoning_format,
                        return_reasoning=body.return_reasoning, enable_thinking=thinking)
    model = state.ready_model()
    _check_media(state, body)

    from autoglm.engine.prompt import build_chat_prompt  # engine import kept out of app start-up

    kwargs = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k != "enable_thinking"}
    messages = [m.to_engine() for m in body.messages]
    messages = await transcribe_audio_parts(messages, state)  # input_audio -> text (speech module)
    prompt = await asyncio.to_thread(
        build_chat_prompt, model, messages, enable_thinking=thinking, chat_template_kwargs=kwargs,
        content_format="string", image_loader=state.media.load,
    )
    call = _Call(state, request, rid, "chat", name, body.stream, body.include_usage, mode, arrival)
    return await call.run(prompt, params, chat=True)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    arrival = time.monotonic()
    state = get_state(request)
    rid = request_id_of(request)
    name = state.resolve_model_name(body.model)
    _log_unknown(rid, body)
    params = body.sampling_params()
    model = state.ready_model()
    prompt_in = body.single_prompt()

    from autoglm.engine.prompt import build_text_prompt

    prompt = await asyncio.to_thread(build_text_prompt, model, prompt_in)
    call = _Call(state, request, rid, "completions", name, body.stream, body.include_usage, "merged", arrival)
    return await call.run(prompt, params, chat=False)


def _log_unknown(rid: str, body: Any) -> None:
    unknown = body.unknown_keys()
    if unknown:
        log.info("request %s: ignoring unknown field(s) %s", rid, ", ".join(unknown))


def _check_media(state: ServerState, body: ChatCompletionRequest) -> None:
    counts = body.media_counts()
    limit = state.config.limit_mm_per_prompt
    if counts["image"] > limit:
        raise MediaError(f"At most {limit} image(s) may be provided in one prompt.", param="messages")
    # input_audio parts: transcribe_audio_parts (speech module) takes them, or refuses naming why


class _Call:
    """One completion request in flight: drives the engine, formats chunks, records metrics."""

    def __init__(self, state: ServerState, request: Request, rid: str, endpoint: str, model_name: str,
                 stream: bool, include_usage: bool, mode: str, arrival: float) -> None:
        self.state = state
        self.request = request
        self.rid = rid
        self.endpoint = endpoint
        self.model_name = model_name
        self.stream = stream
        self.include_usage = include_usage
        self.formatter = ReasoningFormatter(mode)
        self.arrival = arrival
        self.started_wall = time.time() - (time.monotonic() - arrival)
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.created = int(self.started_wall)
        self.cid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + rid
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.tokenizer = state.model.tokenizer if state.model is not None else None

    # --- engine -----------------------------------------------------------------------------------------------
    async def run(self, prompt: Any, params: SamplingParams, *, chat: bool) -> JSONResponse | StreamingResponse:
        max_len = self.state.max_model_len
        n_prompt = len(prompt.token_ids)
        self.prompt_tokens = n_prompt
        if params.max_tokens is not None and n_prompt + params.max_tokens > max_len:
            raise ContextTooLong(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the messages, {params.max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        if n_prompt >= max_len:
            raise ContextTooLong(
                f"This model's maximum context length is {max_len} tokens. However, your messages resulted in "
                f"{n_prompt} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        model = self.state.ready_model()
        params = params.resolve(model.generation_defaults)
        gen = self.state.engine.generate(self.rid, prompt, params)
        self.state.metrics.in_flight.inc()
        try:
            # Engine-side rejections surface here, before any byte is sent; a client that leaves while the request
            # waits for its first token aborts it too.
            first = await _until_disconnect(self.request, _first_or_none(gen))
        except BaseException as exc:
            self.state.metrics.in_flight.dec()
            await _close(gen)
            self._record(getattr(exc, "status", 500))
            raise
        if self.stream:
            return StreamingResponse(
                self._sse(gen, first, chat), media_type="text/event-stream",
                headers={REQUEST_ID_HEADER: self.rid, "cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        return await self._collect(gen, first, chat)

    def _on_output(self, out: Any) -> None:
        now = time.monotonic()
        n = len(getattr(out, "new_token_ids", ()) or ())
        ttft = itl = None
        if n:
            if self.first_token is None:
                self.first_token = now
                ttft = now - self.arrival
            elif self.last_token is not None:
                itl = now - self.last_token
            self.last_token = now
        self.state.metrics.observe_tokens(n, ttft=ttft, itl=itl)
        self.prompt_tokens = getattr(out, "num_prompt_tokens", self.prompt_tokens) or self.prompt_tokens
        self.completion_tokens = getattr(out, "num_output_tokens", self.completion_tokens)
        self.reasoning_tokens = getattr(out, "num_reasoning_tokens", self.reasoning_tokens) or 0
        if getattr(out, "finished", False):
            self.finish_reason = out.finish_reason

    def _record(self, status: int) -> None:
        self.request.state.metrics_recorded = True  # errors_http records only what we did not
        now = time.monotonic()
        self.state.metrics.record(RequestRecord(
            request_id=self.rid, endpoint=self.endpoint, model=self.model_name, status=status,
            started=self.started_wall, duration_s=now - self.arrival,
            ttft_s=None if self.first_token is None else self.first_token - self.arrival,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            reasoning_tokens=self.reasoning_tokens, finish_reason=self.finish_reason, stream=self.stream,
        ))

    def _usage(self) -> dict[str, Any]:
        return responses.usage(self.prompt_tokens, self.completion_tokens, self.reasoning_tokens)

    # --- non-streaming ------------------------------------------------------------------------------------------
    async def _collect(self, gen: AsyncIterator[Any], first: Any, chat: bool) -> JSONResponse:
        content: list[str] = []
        reasoning: list[str] = []
        logprobs: list[Any] = []

        def take(out: Any) -> None:
            self._on_output(out)
            delta = self.formatter.feed(out.reasoning_delta or "", out.content_delta or "")
            content.append(delta.content)
            if delta.reasoning:
                reasoning.append(delta.reasoning)
            logprobs.extend(getattr(out, "logprobs", None) or [])

        async def consume() -> None:
            if first is not None:
                take(first)
            async for out in gen:
                take(out)

        status = 200
        try:
            await _until_disconnect(self.request, consume())
            tail = self.formatter.finish()
            content.append(tail.content)
        except RequestAborted:
            status = 499
            raise
        except BaseException as exc:
            status = getattr(exc, "status", 500)
            raise
        finally:
            await _close(gen)
            self.state.metrics.in_flight.dec()
            self._record(status)
        text = "".join(content)
        if chat:
            body = responses.chat_completion(
                self.cid, self.created, self.model_name, text,
                ("".join(reasoning) or None) if self.formatter.emits_reasoning else False,
                self.finish_reason, self._usage(),
                responses.chat_logprobs(logprobs, self.tokenizer) if logprobs else None,
            )
        else:
            body = responses.text_completion(
                self.cid, self.created, self.model_name, text, self.finish_reason, self._usage(),
                responses.completion_logprobs(logprobs, self.tokenizer) if logprobs else None,
            )
        return JSONResponse(body, headers={REQUEST_ID_HEADER: self.rid})

    # --- streaming ----------------------------------------------------------------------------------------------
    async def _sse(self, gen: AsyncIterator[Any], first: Any, chat: bool) -> AsyncIterator[str]:
        status = 200
        try:
            if chat:
                yield _event(responses.chat_chunk(self.cid, self.created, self.model_name, {"role": "assistant",
                                                                                             "content": ""}))
            outputs = _prepend(first, gen)
            async for out in outputs:
                self._on_output(out)
                delta = self.formatter.feed(out.reasoning_delta or "", out.content_delta or "")
                lp = getattr(out, "logprobs", None) or []
                finished = bool(getattr(out, "finished", False))
                if finished:
                    tail = self.formatter.finish()
                    delta.content += tail.content
                if delta.content or delta.reasoning or lp:
                    yield _event(self._delta_chunk(delta.content, delta.reasoning, lp, chat, None))
                if finished:
                    yield _event(self._delta_chunk("", None, [], chat, self.finish_reason))
            if self.include_usage:
                cls = responses.chat_chunk if chat else responses.completion_chunk
                yield _event(cls(self.cid, self.created, self.model_name, None, usage=self._usage()))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # client went away: the engine request is aborted in `finally`
            raise
        except Exception as exc:
            status = getattr(exc, "status", 500)
            if status >= 500 and status not in (503, 504):  # drain / timeout ends are expected, not bugs
                log.exception("request %s: error mid-stream", self.rid)
            else:
                log.info("request %s: %s", self.rid, exc)
            yield _event(stream_error_event(exc, self.rid))
            yield "data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):
                await _close(gen)
            self.state.metrics.in_flight.dec()
            self._record(status)

    def _delta_chunk(self, content: str, reasoning: str | None, lp: list[Any], chat: bool,
                     finish_reason: str | None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {}
            if content:
                delta["content"] = content
            if reasoning:
                delta["reasoning_content"] = reasoning
                delta["reasoning"] = reasoning
            return responses.chat_chunk(
                self.cid, self.created, self.model_name, delta, finish_reason=finish_reason,
                logprobs=responses.chat_logprobs(lp, self.tokenizer) if lp else None,
            )
        return responses.completion_chunk(
            self.cid, self.created, self.model_name, content, finish_reason=finish_reason,
            logprobs=responses.completion_logprobs(lp, self.tokenizer) if lp else None,
        )


def _event(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"


async def _prepend(first: Any, gen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
        if getattr(first, "finished", False):
            return
    async for out in gen:
        yield out


async def _close(gen: Any) -> None:
    """Closing the engine's iterator aborts the request and frees its KV blocks at once."""
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # already finished or closed
            log.debug("closing a finished generation failed", exc_info=True)


async def _first_or_none(gen: AsyncIterator[Any]) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Run `work` and return its result; if the client disconnects first, cancel it and raise RequestAborted."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise RequestAborted("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()

