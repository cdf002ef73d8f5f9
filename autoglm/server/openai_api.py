"""`/v1/*` routes: chat and text completions (SSE or JSON) and the model list — OpenAI wire formatting only.

A request flows: validate (protocol.py) -> resolve model name and reasoning mode -> build the prompt (chat template,
media routed to its encoder, off the event loop) -> `generation.Generation` (context check, admission, the engine,
disconnects, metrics) -> its typed events formatted here as SSE chunks or one JSON body. Admission is synchronous,
so a request the engine rejects is still a clean 4xx; a stream then starts at once (headers and the role chunk),
sends `: keep-alive` comments every `--sse-keepalive` seconds while it waits (prefill, queue), and errors travel
in-band (`data: {"error": ...}` then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from autoglm.engine.prompt import PromptInputs, build_chat_prompt, build_text_prompt
from autoglm.engine.sampler import TokenLogprob
from autoglm.engine.sampling_params import SamplingParams
from autoglm.server import responses
from autoglm.server.constraints import ChatConstraints
from autoglm.server.errors_http import REQUEST_ID_HEADER, request_id_of, stream_error_event
from autoglm.server.generation import Admitted, Delta, Event, Failed, Finished, Generation, KeepAlive, Usage
from autoglm.server.limits import ParsedJSONRoute
from autoglm.server.protocol import ChatCompletionRequest, CompletionRequest
from autoglm.server.reasoning_format import resolve_mode
from autoglm.server.speech_chat import capabilities, transcribe_audio_parts
from autoglm.server.state import get_state
from autoglm.tokenizer.tool_calls import StreamDelta
from autoglm.tokenizer.tool_parsers import ToolCallStream, ToolFormat

log = logging.getLogger("autoglm.server")

T = TypeVar("T")


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


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """The SDK's `models.retrieve`: one entry of the list, 404 (model_not_found) for a name we do not serve."""
    listing = await list_models(request)
    for entry in listing["data"]:
        if entry["id"] == model_id:
            return entry
    get_state(request).resolve_model_name(model_id)  # raises ModelNotFound naming the served models
    return listing["data"][0]


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
    messages = await transcribe_audio_parts(messages, state)  # input_audio -> text (speech module)
    constraints = await asyncio.to_thread(ChatConstraints.build, body, state.output_constraints(), messages)
    params.grammar = constraints.grammar
    if constraints.keep_special_tokens:  # else `<tool_call>` would vanish before the parser sees it (as vLLM does)
        params.skip_special_tokens = False
    prompt = await asyncio.to_thread(
        build_chat_prompt, model, constraints.messages, enable_thinking=thinking, chat_template_kwargs=kwargs,
        content_format="string", media_policy=state.media, max_media=state.config.limit_mm_per_prompt,
        tools=constraints.tools, max_len=state.max_model_len,
    )
    gens = await _start_choices(body.n, prompt, params, lambda i: Generation(
        state, request, rid=rid, endpoint="chat", model_name=name, stream=body.stream, mode=mode, arrival=arrival,
        keepalive=state.config.sse_keepalive, choice=i))
    tools = _ToolParsing(constraints.tool_format, constraints.tools) if constraints.tool_format else None
    fmt = _OpenAIFormat(gens, chat=True, include_usage=body.include_usage, tools=tools)
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
    prompt = await asyncio.to_thread(build_text_prompt, model, body.single_prompt(), max_len=state.max_model_len)
    if (spec := body.output_spec()) is not None:
        params.grammar = await asyncio.to_thread(state.output_constraints().compile, spec)
    gens = await _start_choices(body.n, prompt, params, lambda i: Generation(
        state, request, rid=rid, endpoint="completions", model_name=name, stream=body.stream, mode="merged",
        arrival=arrival, keepalive=state.config.sse_keepalive, choice=i))
    fmt = _OpenAIFormat(gens, chat=False, include_usage=body.include_usage)
    return fmt.stream() if body.stream else await fmt.json()


async def _start_choices(n: int, prompt: PromptInputs, params: SamplingParams,
                         make: Callable[[int], Generation]) -> list[Generation]:
    """n engine requests for one prompt (choice i seeded seed + i when a seed is given). They are admitted together:
    the scheduler lets the later ones wait a step for the prompt blocks the first prefills (prefix cache), so the
    prompt's full KV blocks are shared. One failing admission aborts the ones already started."""
    gens: list[Generation] = []
    try:
        for i in range(n):
            p = replace(params, seed=params.seed + i if params.seed is not None else None)
            gen = make(i)
            await gen.start(prompt, p)
            gens.append(gen)
    except BaseException:
        for gen in gens:
            await gen.cancel()
        raise
    return gens


def _log_unknown(rid: str, body: Any) -> None:
    unknown = body.unknown_keys()
    if unknown:
        log.info("request %s: ignoring unknown field(s) %s", rid, ", ".join(unknown))


class _ToolParsing:
    """A tool-call format and the request's tools: one streaming parser per choice."""

    def __init__(self, fmt: ToolFormat, tools: list[dict[str, Any]] | None) -> None:
        self.fmt = fmt
        self.tools = tools

    def stream(self) -> ToolCallStream:
        return self.fmt.stream(self.tools)


class _OpenAIFormat:
    """Generation events of a request's choices -> OpenAI chat / text-completion chunks (SSE) or one JSON body."""

    def __init__(self, gens: list[Generation], *, chat: bool, include_usage: bool,
                 tools: _ToolParsing | None = None) -> None:
        self.gens = gens
        self.gen = gen = gens[0]
        self.chat = chat
        self.include_usage = include_usage
        self.tools = tools
        self._parsers: dict[int, ToolCallStream] = {}  # choice -> its tool-call stream parser
        self._called: set[int] = set()  # choices that emitted a tool call (finish_reason "tool_calls")
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
        done = await _all_or_none([g.collect() for g in self.gens])
        usage = _usage(_total([d.usage for d in done]))
        name = self.gen.model_name
        choices: list[dict[str, Any]] = []
        for i, d in enumerate(done):
            if self.chat:
                choice = responses.chat_completion(
                    self.cid, self.created, name, d.content, d.reasoning, d.finish_reason, usage,
                    responses.chat_logprobs(d.logprobs, self.tokenizer) if d.logprobs else None,
                )["choices"][0]
                if self.tools is not None:
                    parsed = self.tools.fmt.parse(d.content, self.tools.tools)
                    choice["message"]["content"] = parsed.content
                    if parsed.tool_calls:
                        choice["message"]["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
                        if d.finish_reason == "stop":
                            choice["finish_reason"] = "tool_calls"
            else:
                choice = responses.text_completion(
                    self.cid, self.created, name, d.content, d.finish_reason, usage,
                    responses.completion_logprobs(d.logprobs, self.tokenizer) if d.logprobs else None,
                )["choices"][0]
            choice["index"] = i
            choices.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        body = {"id": self.cid, "object": kind, "created": self.created, "model": name, "choices": choices,
                "usage": usage}
        return JSONResponse(body, headers={REQUEST_ID_HEADER: self.gen.rid})

    async def _sse(self) -> AsyncIterator[str]:
        if len(self.gens) == 1:
            async with contextlib.aclosing(self.gen.events()) as events:
                async for event in events:
                    for text in self._on_event(0, event, None):
                        yield text
            return
        async with contextlib.aclosing(_merged([g.events() for g in self.gens])) as merged:
            finished: list[Usage] = []
            async for i, event in merged:
                if isinstance(event, Admitted) and i != 0:
                    if self.chat:
                        yield _event(self._role_chunk(i))
                    continue
                if isinstance(event, Finished):
                    finished.append(event.usage)
                    last = len(finished) == len(self.gens)
                    for text in self._on_event(i, event, _total(finished) if last else False):
                        yield text
                    continue
                for text in self._on_event(i, event, None):
                    yield text
                if isinstance(event, Failed):
                    return

    def _role_chunk(self, index: int) -> dict[str, Any]:
        return responses.chat_chunk(self.cid, self.created, self.gen.model_name,
                                    {"role": "assistant", "content": ""}, index=index)

    def _on_event(self, i: int, event: Event, total: Usage | None | bool) -> list[str]:
        """SSE texts for one choice's event. total: for Finished, the usage to report (None: this one's; False: not
        the last choice, no usage or [DONE] yet)."""
        name = self.gen.model_name
        if isinstance(event, Admitted):
            return [_event(self._role_chunk(i))] if self.chat else []
        if isinstance(event, KeepAlive):
            return [": keep-alive\n\n"]  # an SSE comment: clients ignore it, read timeouts see bytes
        if isinstance(event, Delta):
            return [_event(c) for c in self._chunks(i, event.content, event.reasoning, event.logprobs, None)]
        if isinstance(event, Finished):
            out = [_event(c) for c in self._chunks(i, "", "", [], event.reason, final=True)]
            if total is False:
                return out
            if self.include_usage:
                cls = responses.chat_chunk if self.chat else responses.completion_chunk
                out.append(_event(cls(self.cid, self.created, name, None,
                                      usage=_usage(event.usage if total is None else total))))
            out.append("data: [DONE]\n\n")
            return out
        if isinstance(event, Failed):
            return [_event(stream_error_event(event.error, self.gen.rid)), "data: [DONE]\n\n"]
        return []

    def _chunks(self, i: int, content: str, reasoning: str, lp: list[TokenLogprob], finish_reason: str | None,
                *, final: bool = False) -> list[dict[str, Any]]:
        name = self.gen.model_name
        if not self.chat:
            return [responses.completion_chunk(
                self.cid, self.created, name, content, finish_reason=finish_reason, index=i,
                logprobs=responses.completion_logprobs(lp, self.tokenizer) if lp else None,
            )]
        delta: dict[str, Any] = {}
        parser = self._parsers.get(i) if self.tools is not None else None
        if self.tools is not None and parser is None:
            parser = self._parsers[i] = self.tools.stream()
        calls: list[dict[str, Any]] = []
        if parser is not None:
            piece = parser.feed(content) if content else StreamDelta()
            if final:
                end = parser.finish()
                piece.content += end.content
                piece.tool_calls += end.tool_calls
            content = piece.content
            calls = [c.to_openai() for c in piece.tool_calls]
            if calls:
                self._called.add(i)
            if final and finish_reason == "stop" and i in self._called:
                finish_reason = "tool_calls"
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        if reasoning:
            delta["reasoning_content"] = reasoning
            delta["reasoning"] = reasoning
        if not delta and not lp and finish_reason is None:
            return []  # the parser held everything back (a possible tag)
        return [responses.chat_chunk(
            self.cid, self.created, name, delta, finish_reason=finish_reason, index=i,
            logprobs=responses.chat_logprobs(lp, self.tokenizer) if lp else None,
        )]


async def _merged(streams: list[AsyncGenerator[Event, None]]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several choices as they come, tagged with the choice index; closing this closes every stream
    (each aborts its engine request)."""
    queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[Event, None]) -> None:
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                await queue.put((i, event))
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
                continue
            yield i, event
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def _all_or_none(works: list[Awaitable[T]]) -> list[T]:
    """Every result, or the first error with the other works cancelled (their engine requests aborted)."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        raise


def _total(usages: list[Usage]) -> Usage:
    """All choices of one request: the prompt counted once, the completions summed."""
    return Usage(usages[0].prompt_tokens, sum(u.completion_tokens for u in usages),
                 sum(u.reasoning_tokens for u in usages))


def _usage(usage: Usage) -> dict[str, Any]:
    return responses.usage(usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens)


def _event(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"
