"""Request-body limits, checked before FastAPI parses anything: size (413), UTF-8 and JSON nesting depth (400).

The body is buffered up to `max_bytes` (a larger Content-Length is refused before reading it), checked and parsed
as JSON off the event loop, then replayed to the app unchanged; routes declared with `route_class=ParsedJSONRoute`
take the parsed document instead of parsing it again on the loop. So a 10 MB upload never stalls `/health`, and a
10k-deep JSON document gets a message that says so instead of a parser's stack overflow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import numpy as np
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autoglm.server.errors_http import REQUEST_ID_HEADER, SafeJSONResponse, error_body

_PARSED = "autoglm.parsed_json"  # scope["state"] key of the document parsed off the loop
MAX_JSON_DEPTH = 64  # OpenAI-style bodies nest < 10 levels; json/pydantic recursion trouble starts near 1000


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text, brackets inside strings ignored. Vectorized over the few
    structural bytes only (a regex over the strings took seconds for 10 MB)."""
    # Drop escaped backslashes, then escaped quotes: every quote left opens or closes a string.
    skeleton = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    arr = np.frombuffer(skeleton, dtype=np.uint8)
    quotes = np.flatnonzero(arr == ord('"'))
    opens = (arr == ord("[")) | (arr == ord("{"))
    brackets = np.flatnonzero(opens | (arr == ord("]")) | (arr == ord("}")))
    if brackets.size == 0:
        return 0
    outside = (np.searchsorted(quotes, brackets) & 1) == 0  # an even number of quotes before it
    steps = np.where(opens[brackets], 1, -1)[outside]
    return int(np.cumsum(steps).max(initial=0))


def body_problem(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why a JSON request body cannot be taken (not UTF-8, nested too deep), or None."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"The request body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r})"
    depth = json_depth(body)
    if depth > max_depth:
        return f"The request body's JSON nests {depth} levels deep; at most {max_depth} are accepted"
    return None


def _check_and_parse(body: bytes, max_depth: int) -> tuple[str | None, Any]:
    problem = body_problem(body, max_depth)
    if problem is not None:
        return problem, None
    try:
        return None, json.loads(body)
    except ValueError:
        return None, None  # malformed: FastAPI parses again and reports it in its own words


class _ParsedJSONRequest(Request):
    async def json(self) -> Any:
        state = self.scope.get("state") or {}
        if _PARSED in state:
            return state[_PARSED]
        return await super().json()


class ParsedJSONRoute(APIRoute):
    """An APIRoute whose JSON body is the document the middleware parsed off the event loop (if it did)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parsed(request: Request) -> Response:
            return await handler(_ParsedJSONRequest(request.scope, request.receive))

        return parsed


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, 400 for non-UTF-8 or too deeply nested JSON bodies (OpenAI error shape)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH") or \
                str(scope.get("path", "")).startswith("/api/blobs/"):  # binary uploads, streamed to disk by the route
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send, 413, self._too_large(int(length)))
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, 413, self._too_large(size, at_least=True))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and content_type in (b"application/json", b""):
            problem, document = await anyio.to_thread.run_sync(_check_and_parse, body, self.max_depth)
            if problem is not None:
                await self._reject(scope, receive, send, 400, problem)
                return
            if document is not None:
                scope.setdefault("state", {})[_PARSED] = document
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client's disconnect, as Starlette expects

        await self.app(scope, replay, send)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (f"The request body is {'over ' if at_least else ''}{size} bytes; this server accepts at most "
                f"{self.max_bytes} (--max-request-body-bytes)")

    async def _reject(self, scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        rid = scope.get("state", {}).get("request_id", "")
        kind = "invalid_request_error"
        body = error_body(message, kind, code="request_too_large" if status == 413 else "invalid_body")
        await SafeJSONResponse(body, status_code=status, headers={REQUEST_ID_HEADER: rid} if rid else None)(
            scope, receive, send
        )
