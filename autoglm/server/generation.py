"""The generation layer: one request driven through the engine once, as a stream of typed events.

Protocol surfaces (`openai_api.py` now, an Ollama one next) only format events; everything else lives here:
context check, admission, waiting for the first output, client-disconnect watching, reasoning mode, TTFT/ITL and
token metrics, the request record, abort (closing the engine iterator) and in-band errors.

Contract for a protocol formatter:
1. `gen = Generation(state, request, rid=..., endpoint=..., model_name=..., stream=..., mode=..., arrival=...)`.
   `mode` is a reasoning mode of `reasoning_format.py` ("merged", "separate", "inline", "hidden"): the layer
   applies it, so a `Delta.reasoning` is non-empty only when that mode sends reasoning apart from the content.
2. `await gen.start(prompt, params)`: validates the context and admits the request. Every rejection (4xx/5xx error
   from `autoglm.errors`; RequestAborted when the client left) is raised here, before the formatter has sent a
   byte; metrics are recorded and the engine request is gone. Non-streaming, it also waits for the first engine
   output; streaming, it returns as soon as the engine has validated and queued the request (synchronously, in
   the first step of `EngineClient.generate`), so headers and the first chunk go out before a long prefill.
3. Streaming: `async with contextlib.aclosing(gen.events()) as events: async for event in events: ...`
   (aclosing, so that a response cancelled between two events still aborts at once): `Admitted` once, then
   `Delta`s, then exactly one of `Finished` (reason + usage) or `Failed` (the error, for an in-band error chunk;
   already logged). With `keepalive=S`, a `KeepAlive` comes whenever S seconds pass without an engine output
   (queueing, prefill), so proxies and SDK read timeouts see bytes. Leaving early (client gone: the ASGI server
   cancels the response) aborts the request and records status 499.
   Non-streaming: `await gen.collect()` -> `Completion` (the deltas joined), under disconnect watching; errors
   are raised (errors_http maps them), never in-band.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from fastapi import Request

from autoglm.engine.engine import check_context
from autoglm.engine.output import RequestOutput
from autoglm.engine.prompt import PromptInputs
from autoglm.engine.sampler import TokenLogprob
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import RequestAborted
from autoglm.server.metrics import RequestRecord
from autoglm.server.reasoning_format import ReasoningFormatter
from autoglm.server.state import ServerState

log = logging.getLogger("autoglm.server")

T = TypeVar("T")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int


@dataclass(frozen=True)
class Admitted:
    """The engine accepted the request (first event; a stream's headers and role chunk go out now)."""

    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    """New text since the previous event (content; reasoning when the mode sends it apart), new token ids and
    their logprobs (when asked for). Never all empty."""

    content: str
    reasoning: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class Finished:
    reason: str | None  # "stop" | "length" | "abort"
    usage: Usage


@dataclass(frozen=True)
class Failed:
    """The request ended with an error after it was admitted (in-band for streams)."""

    error: BaseException
    status: int


@dataclass(frozen=True)
class KeepAlive:
    """No engine output for `keepalive` seconds (long prefill, queueing): send the protocol's idle marker."""


Event = Admitted | Delta | Finished | Failed | KeepAlive


@dataclass
class Completion:
    """A whole non-streamed answer. reasoning: the joined reasoning text (None when empty) if the mode sends it
    apart, else False (the field is left out)."""

    content: str
    reasoning: str | None | bool
    finish_reason: str | None
    usage: Usage
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Generation:
    """One completion request in flight (see the module docstring for the contract)."""

    def __init__(self, state: ServerState, request: Request, *, rid: str, endpoint: str, model_name: str,
                 stream: bool, mode: str, arrival: float, keepalive: float | None = None, choice: int = 0) -> None:
        self.state = state
        self.request = request
        self.rid = rid
        self.choice = choice  # n > 1: choice i is engine request `rid-i` (choice 0 keeps `rid`)
        self.engine_id = rid if choice == 0 else f"{rid}-{choice}"
        self.endpoint = endpoint
        self.model_name = model_name
        self.stream = stream
        self.keepalive = keepalive if keepalive and stream else None  # seconds; None: no KeepAlive events
        self.formatter = ReasoningFormatter(mode)
        self.arrival = arrival
        self.started_wall = time.time() - (time.monotonic() - arrival)
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self._outputs: AsyncGenerator[RequestOutput, None] | None = None
        self._first: RequestOutput | None = None
        self._pending: asyncio.Future[RequestOutput | None] | None = None  # the next engine output, being awaited

    @property
    def emits_reasoning(self) -> bool:
        return self.formatter.emits_reasoning

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.reasoning_tokens)

    # --- admission ------------------------------------------------------------------------------------------------
    async def start(self, prompt: PromptInputs, params: SamplingParams) -> None:
        self.prompt_tokens = len(prompt.token_ids)
        check_context(self.prompt_tokens, params.max_tokens, self.state.max_model_len,
                      "prompt" if self.endpoint == "completions" else "messages")
        model = self.state.ready_model()
        params = params.resolve(model.generation_defaults)
        engine = self.state.ready_engine()
        self._outputs = engine.generate(self.engine_id, prompt, params)
        self.state.metrics.in_flight.inc()
        try:
            if self.stream:
                # generate() validates and queues synchronously in its first step (before its first await): one
                # loop turn runs it, so an admission error is raised here while waiting for a token is not.
                self._pending = asyncio.ensure_future(_first_or_none(self._outputs))
                await asyncio.sleep(0)
                if self._pending.done():
                    pending, self._pending = self._pending, None
                    self._first = pending.result()
            else:
                # Engine-side rejections surface here, before any byte is sent; a client that leaves while the
                # request waits for its first token aborts it too.
                self._first = await self._until_disconnect(_first_or_none(self._outputs))
        except BaseException as exc:
            await self._cancel_pending()
            self.state.metrics.in_flight.dec()
            await self._close()
            self._record(getattr(exc, "status", 500))
            raise

    async def cancel(self) -> None:
        """Abort a started generation whose events will never be read (another choice of its request failed)."""
        if self._outputs is None:
            return
        await self._cancel_pending()
        await self._close()
        self._outputs = None
        self.state.metrics.in_flight.dec()
        self._record(499)

    # --- events ---------------------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[Event]:
        assert self._outputs is not None, "start() first"
        status = 200
        try:
            yield Admitted(self.prompt_tokens)
            async for out in self._engine_outputs():
                if isinstance(out, KeepAlive):
                    yield out
                    continue
                self._observe(out)
                text = self.formatter.feed(out.reasoning_delta or "", out.content_delta or "")
                if out.finished:
                    text.content += self.formatter.finish().content
                if text.content or text.reasoning or out.logprobs:
                    yield Delta(text.content, text.reasoning or "", list(out.new_token_ids), list(out.logprobs))
                if out.finished:
                    break
            yield Finished(self.finish_reason, self.usage)
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # client went away: the engine request is aborted in `finally`
            raise
        except Exception as exc:
            status = getattr(exc, "status", 500)
            if self.stream:
                if status >= 500 and status not in (503, 504):  # drain / timeout ends are expected, not bugs
                    log.exception("request %s: error mid-stream", self.rid)
                else:
                    log.info("request %s: %s", self.rid, exc)
            yield Failed(exc, status)
        finally:
            with anyio.CancelScope(shield=True):
                await self._cancel_pending()
                await self._close()
            self.state.metrics.in_flight.dec()
            self._record(status)

    async def collect(self) -> Completion:
        content: list[str] = []
        reasoning: list[str] = []
        logprobs: list[TokenLogprob] = []

        async def consume() -> None:
            async with contextlib.aclosing(self.events()) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        content.append(event.content)
                        reasoning.append(event.reasoning)
                        logprobs.extend(event.logprobs)
                    elif isinstance(event, Failed):
                        raise event.error

        await self._until_disconnect(consume())
        joined = "".join(reasoning)
        return Completion(
            "".join(content), (joined or None) if self.emits_reasoning else False, self.finish_reason, self.usage,
            logprobs,
        )

    # --- internals ------------------------------------------------------------------------------------------------
    async def _engine_outputs(self) -> AsyncIterator[RequestOutput | KeepAlive]:
        outputs = self._outputs
        assert outputs is not None
        if self._first is not None:
            yield self._first
            if self._first.finished:
                return
        if self._pending is None and self.keepalive is None:
            async for out in outputs:
                yield out
            return
        while True:
            nxt = self._pending = self._pending or asyncio.ensure_future(_first_or_none(outputs))
            while not nxt.done():
                await asyncio.wait({nxt}, timeout=self.keepalive)
                if not nxt.done():
                    yield KeepAlive()
            self._pending = None
            out = nxt.result()
            if out is None:
                return
            yield out
            if out.finished:
                return

    async def _cancel_pending(self) -> None:
        """Cancel an engine read still in flight (that aborts the request in the engine's iterator)."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending

    def _observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        n = len(out.new_token_ids)
        ttft = itl = None
        if n:
            if self.first_token is None:
                self.first_token = now
                ttft = now - self.arrival
            elif self.last_token is not None:
                itl = now - self.last_token
            self.last_token = now
        self.state.metrics.observe_tokens(n, ttft=ttft, itl=itl)
        self.prompt_tokens = out.num_prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.num_output_tokens
        self.reasoning_tokens = out.num_reasoning_tokens or 0
        if out.finished:
            self.finish_reason = out.finish_reason

    def _record(self, status: int) -> None:
        self.request.state.metrics_recorded = True  # errors_http records only what we did not
        now = time.monotonic()
        self.state.metrics.record(RequestRecord(
            request_id=self.engine_id, endpoint=self.endpoint, model=self.model_name, status=status,
            started=self.started_wall, duration_s=now - self.arrival,
            ttft_s=None if self.first_token is None else self.first_token - self.arrival,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            reasoning_tokens=self.reasoning_tokens, finish_reason=self.finish_reason, stream=self.stream,
        ))

    async def _close(self) -> None:
        """Closing the engine's iterator aborts the request and frees its KV blocks at once."""
        if self._outputs is not None:
            try:
                await self._outputs.aclose()
            except Exception:  # already finished or closed
                log.debug("closing a finished generation failed", exc_info=True)

    async def _until_disconnect(self, work: Awaitable[T]) -> T:
        """Run `work` and return its result; if the client disconnects first, cancel it and raise RequestAborted."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while True:
                message = await self.request.receive()
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


async def _first_or_none(outputs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    try:
        return await outputs.__anext__()
    except StopAsyncIteration:
        return None
