"""The one place exceptions become HTTP responses (OpenAI's `{"error": {...}}` shape).

- `AutoGLMError` subclasses carry their own status and type (autoglm/errors.py).
- Validation failures (malformed JSON, wrong types, missing fields) are 400 `invalid_request_error`.
- Anything else is a 500 whose body says only "internal error" plus a request id; the traceback goes to the log
  under that id (the `x-request-id` header carries it too). A client mistake is never a 5xx.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autoglm.errors import AutoGLMError

log = logging.getLogger("autoglm.server")

REQUEST_ID_HEADER = "x-request-id"


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate anywhere (echoed client text) becomes a `\\udXXX` escape."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace"
        )


def new_request_id() -> str:
    return secrets.token_hex(12)


def request_id_of(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = new_request_id()
        request.state.request_id = rid
    return rid


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: AutoGLMError, request_id: str | None = None) -> JSONResponse:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
    if exc.status == 429:
        headers["retry-after"] = "1"
    return SafeJSONResponse(exc.to_openai(), status_code=exc.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            return f"Malformed JSON in request body: {detail}", None
        if tuple(err.get("loc", ())) == ("body",) and err.get("type") in ("model_attributes_type", "dict_type"):
            return "The request body must be a JSON object (send Content-Type: application/json)", None
        if tuple(err.get("loc", ())) == ("body",) and err.get("type") == "missing":
            return "The request body is empty; expected a JSON object", None
    parts: list[str] = []
    first_param: str | None = None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Drop pydantic's union-member tags (e.g. "list[...]", "TextPart") from the location.
        loc = [x for x in loc if not (x[:1].isupper() or "[" in x or "-" in x or x in ("str", "int", "list"))]
        where = ".".join(loc) or "body"
        first_param = first_param or (where if where != "body" else None)
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "Invalid request: " + "; ".join(parts) + more, first_param


# Inference endpoints whose rejected requests count in the metrics and the status page's request list.
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def record_rejection(app: Any, scope: Scope, status: int) -> None:
    """Count a request that failed before (or instead of) producing a completion, once."""
    endpoint = _ENDPOINTS.get(scope.get("path", ""))
    state = scope.setdefault("state", {})
    if endpoint is None or state.get("metrics_recorded"):
        return
    state["metrics_recorded"] = True
    server = getattr(getattr(app, "state", None), "autoglm", None)
    if server is None:
        return
    from autoglm.server.metrics import RequestRecord

    server.metrics.record(RequestRecord(
        request_id=state.get("request_id", ""), endpoint=endpoint, model="", status=status, started=time.time(),
        duration_s=0.0, ttft_s=None, prompt_tokens=0, completion_tokens=0, reasoning_tokens=0, finish_reason=None,
        stream=False,
    ))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AutoGLMError)
    async def _autoglm_error(request: Request, exc: AutoGLMError) -> JSONResponse:
        rid = request_id_of(request)
        record_rejection(request.app, request.scope, exc.status)
        if exc.status >= 500:
            log.error("request %s failed: %s", rid, exc.message)
        else:
            log.info("request %s rejected (%d): %s", rid, exc.status, exc.message)
        return error_response(exc, rid)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        rid = request_id_of(request)
        record_rejection(request.app, request.scope, 400)
        message, param = _validation_message(exc)
        log.info("request %s rejected (400): %s", rid, message)
        return SafeJSONResponse(error_body(message, "invalid_request_error", param=param), status_code=400,
                            headers={REQUEST_ID_HEADER: rid})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        rid = request_id_of(request)
        error_type = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_error"
        )
        record_rejection(request.app, request.scope, exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"Not found: {request.method} {request.url.path}"
        headers = dict(exc.headers or {})
        headers[REQUEST_ID_HEADER] = rid
        return SafeJSONResponse(error_body(message, error_type, code=exc.status_code), status_code=exc.status_code,
                            headers=headers)


class RequestIdMiddleware:
    """Gives every HTTP request a fresh id, returns it in the `x-request-id` header, and turns
    an unhandled exception into an OpenAI-shaped 500 that leaks nothing but the id (the traceback is logged)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Always our own id: it also names the engine request, so a client-sent one could collide.
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: unhandled error on %s %s", rid, scope.get("method"), scope.get("path"))
            record_rejection(scope.get("app"), scope, 500)
            if started:
                return  # the status line is out; the stream itself reports the error
            body = error_body(
                f"Internal server error (request id {rid}); the details are in the server log.", "internal_error",
                code=500,
            )
            await SafeJSONResponse(body, status_code=500, headers={REQUEST_ID_HEADER: rid})(scope, receive, send)


def stream_error_event(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The `data: {"error": ...}` payload for an error after the SSE stream has started."""
    if isinstance(exc, AutoGLMError):
        return exc.to_openai()
    return error_body(
        f"Internal server error (request id {request_id}); the details are in the server log.", "internal_error",
        code=500,
    )
