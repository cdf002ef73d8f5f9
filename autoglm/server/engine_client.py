"""`EngineClient`: everything the server needs from the engine, and nothing more.

`autoglm.engine.async_engine.AsyncEngine` implements it; tests stand in small fakes. The server never reaches past
this interface (no getattr probing), so another engine (a remote one, a different backend) plugs in by implementing
these members.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from autoglm.engine.output import RequestOutput
    from autoglm.engine.prompt import PromptInputs
    from autoglm.engine.sampling_params import SamplingParams
    from autoglm.models.loaded import LoadedModel


@runtime_checkable
class EngineClient(Protocol):
    """generate: the request's outputs (deltas; the last has `finished=True`); validation and admission errors
    (InvalidRequest, ContextTooLong, Overloaded, ServiceUnavailable while draining) are raised by the first
    `__anext__`; closing the iterator early aborts the request and frees its KV blocks.
    abort: thread-safe, a no-op for unknown ids. stats: a flat dict of counters and gauges (metrics, status page).
    max_model_len: the context window the engine enforces. draining: True once `begin_drain` was called (SIGTERM:
    no new requests; open ones get the grace period). shutdown: stop, ending open requests."""

    @property
    def model(self) -> LoadedModel: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def draining(self) -> bool: ...

    def generate(
        self, request_id: str, prompt: PromptInputs, params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def begin_drain(self, grace_seconds: float) -> None: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
