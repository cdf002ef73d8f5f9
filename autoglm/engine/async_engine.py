"""`AsyncEngine`: the engine loop in its own thread, one asyncio queue per request.

The loop thread is the only one that touches the `Engine`: adds and aborts from the asyncio side go through an inbox
the loop drains before every step (kernels release the GIL, so the event loop stays responsive meanwhile). Outputs go
back with `loop.call_soon_threadsafe`. Closing or cancelling a request's iterator aborts it, which frees its KV
blocks at the loop's next turn.

Backpressure: beyond `max_waiting` queued requests `add_request` raises Overloaded (429); a request past its
`request_timeout` ends with RequestTimeout. `drain(grace)` (SIGTERM): new requests get ServiceUnavailable (503),
admitted ones run on until the grace period ends, then each still open ends with a ServiceUnavailable error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from autoglm.engine.engine import Engine
from autoglm.engine.output import RequestOutput
from autoglm.engine.prompt import PromptInputs
from autoglm.engine.request import Request
from autoglm.engine.sampling_params import SamplingParams
from autoglm.errors import AutoGLMError, InvalidRequest, Overloaded, RequestAborted, ServiceUnavailable
from autoglm.models.loaded import LoadedModel

log = logging.getLogger("autoglm.engine")

_IDLE_WAIT_S = 0.5  # idle loop re-checks this often even without a wake-up (shutdown safety)


class RequestStream:
    """Async iterator over one request's outputs; ends after the output with `finished=True`.

    Errors raised by the engine for this request (or at shutdown) are raised from `__anext__`.
    `aclose()` (or leaving an `async for` early through `generate`) aborts the request.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    # called from the engine thread
    def _put(self, item: RequestOutput | BaseException) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is closed: nobody is listening
            return False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """The engine as the server sees it (implements `autoglm.server.engine_client.EngineClient`)."""

    def __init__(self, engine: Engine, *, start: bool = True) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._active: set[str] = set()  # ids in flight (any thread, under _lock)
        self._lock = threading.Lock()
        self.num_finished = 0
        self.num_aborted = 0
        self.num_rejected = 0  # Overloaded / draining refusals
        self.num_drain_aborted = 0  # ended by the end of a drain's grace period
        self._drain_deadline: float | None = None  # time.monotonic(); set once by begin_drain
        self._drain_grace = 0.0
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="autoglm-engine", daemon=True)
        if start:
            self._thread.start()

    @property
    def model(self) -> LoadedModel:
        return self.engine.model

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # --- asyncio side ---------------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: PromptInputs, params: SamplingParams, **kw: Any
    ) -> RequestStream:
        """Validate now (raises InvalidRequest / ContextTooLong / Overloaded in the caller) and queue the request.

        Must be called from a running event loop; outputs are delivered to it."""
        if self._stop.is_set():
            raise RequestAborted("the engine is shutting down")
        if self._drain_deadline is not None:
            self.num_rejected += 1
            raise ServiceUnavailable("the server is shutting down (draining) and admits no new requests; "
                                     "retry on another instance or after the restart", code="draining")
        req: Request = self.engine.make_request(request_id, prompt, params, **kw)
        with self._lock:
            if request_id in self._active:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            # approximate (read from another thread) but only ever conservative by the inbox size
            if len(self._active) - len(self.engine.scheduler.running) >= self.engine.config.max_waiting:
                self.num_rejected += 1
                raise Overloaded(f"the waiting queue is full ({self.engine.config.max_waiting} requests); retry later",
                                 code="queue_full")
            self._active.add(request_id)
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        self._inbox.put(("add", req, stream))
        self._wake.set()
        return stream

    async def generate(
        self, request_id: str, prompt: PromptInputs, params: SamplingParams, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; cancelling or closing the iterator aborts the request at once."""
        stream = self.add_request(request_id, prompt, params, **kw)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        """Thread-safe; a no-op for unknown or finished ids."""
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        s = self.engine.stats()
        s.update(
            requests_finished=self.num_finished,
            requests_aborted=self.num_aborted,
            requests_rejected=self.num_rejected,
            requests_drain_aborted=self.num_drain_aborted,
            in_flight=self.num_in_flight,
            draining=self.draining,
            alive=self._thread.is_alive(),
        )
        return s

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._active)

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def begin_drain(self, grace_seconds: float) -> None:
        """Thread- and signal-safe, idempotent: stop admitting now; end what is still open after `grace_seconds`."""
        if self._drain_deadline is None:
            self._drain_grace = max(0.0, grace_seconds)
            self._drain_deadline = time.monotonic() + self._drain_grace
            log.info("draining: no new requests; %d in flight get %.1f s to finish", self.num_in_flight,
                     self._drain_grace)
        self._wake.set()

    async def drain(self, grace_seconds: float) -> bool:
        """`begin_drain`, then wait until every admitted request has ended (finished, or ended at the deadline).
        -> True when all of them finished within the grace period."""
        self.begin_drain(grace_seconds)
        aborted_before = self.num_drain_aborted
        while self.num_in_flight and self._thread.is_alive():
            await asyncio.sleep(0.02)
        return self.num_drain_aborted == aborted_before

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; pending requests get RequestAborted; KV caches are released."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:
            self._finish_all(RequestAborted("the engine is shutting down"))

    # --- engine thread --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.engine.has_unfinished():
                    self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
                self._drain_inbox()
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                    self._end_drain()
                if self.engine.has_unfinished():
                    self._step()
        finally:
            self._finish_all(RequestAborted("the engine is shutting down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, a, b = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                req, stream = a, b
                if stream.finished:  # closed before it reached the loop
                    self._release(req.request_id)
                    continue
                try:
                    self.engine.add(req)
                except AutoGLMError as e:
                    self._release(req.request_id)
                    stream._put(e)
                    continue
                self._streams[req.request_id] = stream
            elif kind == "abort":
                out = self.engine.abort(a)
                stream = self._streams.pop(a, None)
                if out is not None:
                    self.num_aborted += 1
                self._release(a)
                if stream is not None and out is not None:
                    stream._put(out)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a model error must not kill the server: fail the batch, keep the loop
            log.exception("engine step failed; aborting %d request(s)", len(self._streams))
            self.last_error = e
            self._finish_all(e)
            return
        # Bookkeeping before the last item is handed over: a client that sees its request end sees it released.
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.error is not None:  # the engine ended it (timeout): blocks are already free
                self.num_aborted += 1
                self._streams.pop(out.request_id, None)
                self._release(out.request_id)
                stream._put(out.error)
                continue
            if stream.finished and not out.finished:  # closed by its reader
                self._abort_unread(out.request_id)
                continue
            if out.finished:
                self.num_finished += 1
                self._streams.pop(out.request_id, None)
                self._release(out.request_id)
            if not stream._put(out) and not out.finished:  # its event loop is gone: nobody is reading
                self._abort_unread(out.request_id)

    def _abort_unread(self, request_id: str) -> None:
        if self.engine.abort(request_id) is not None:
            self.num_aborted += 1
        self._streams.pop(request_id, None)
        self._release(request_id)

    def _end_drain(self) -> None:
        if not self._streams and self._inbox.empty():
            return
        n = len(self._streams)
        self.num_drain_aborted += n
        self.num_aborted += n
        log.warning("drain grace period (%.1f s) over: ending %d open request(s)", self._drain_grace, n)
        self._finish_all(ServiceUnavailable(
            f"the server shut down before this request finished (drain grace period {self._drain_grace:g} s)",
            code="shutdown",
        ))

    def _finish_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            self._release(rid)
            stream._put(error)
        self._streams.clear()
        while True:  # requests still in the inbox
            try:
                kind, a, b = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._release(a.request_id)
                b._put(error)
        for rid in list(self.engine.requests):
            self.engine.abort(rid)

    def _release(self, request_id: str) -> None:
        with self._lock:
            self._active.discard(request_id)
