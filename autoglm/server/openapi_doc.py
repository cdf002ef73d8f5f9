"""The `/openapi.json` document, made to say what the server does.

FastAPI documents every body route with a 422 `HTTPValidationError` and a bare 200. The server never answers 422
(validation errors are OpenAI-shaped 400s, `errors_http`), so that is replaced: every `/v1` operation lists the
statuses it can answer with the OpenAI error object (`ErrorResponse`), the completion routes document both their
JSON body and their `text/event-stream` stream, and the health routes their small bodies. Request schemas stay
pydantic's (`protocol.py`: minItems/minLength, token ids as integers).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_NULLABLE_STR = {"anyOf": [{"type": "string"}, {"type": "null"}]}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "ErrorResponse",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": _NULLABLE_STR,
                "code": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
            },
        }
    },
}

_ERRORS = {
    "400": "invalid request: malformed JSON, a wrong field, a prompt or max_tokens over the context, bad media",
    "401": "missing or wrong API key (--api-key)",
    "404": "the model name is not served",
    "413": "request body over --max-request-body-bytes",
    "429": "waiting queue full (--max-waiting); retry after Retry-After seconds",
    "500": "internal error (the message carries the request id; the traceback is in the log)",
    "503": "model loading, or the server is draining after SIGTERM",
    "504": "the request ran past --request-timeout",
}
_POST_ERRORS = ("400", "401", "404", "413", "429", "500", "503", "504")
_GET_ERRORS = ("401", "500")

_COMPLETION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": "object"},
    },
}
_MODEL_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"type": "string"},
        "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object"],
            "properties": {"id": {"type": "string"}, "object": {"type": "string"}},
        }},
    },
}
# OpenAPI 3.1 (no `itemSchema` yet): the `schema` of an event stream describes one event.
_SSE = {
    "schema": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "contentMediaType": "application/json",
                     "description": "a chunk object, then {\"error\": ...} on a failure, and last `[DONE]`"},
            "event": {"type": "string"},
        },
    },
    "example": 'data: {"object": "chat.completion.chunk", ...}\n\n: keep-alive\n\ndata: [DONE]\n\n',
}
_HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string"}, "uptime_s": {"type": "number"}},
}
_READY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "modules"],
    "properties": {"status": {"type": "string"}, "reason": {"type": "string"},
                   "modules": {"type": "array", "items": {"type": "object"}}},
}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and `/openapi.json`) return the corrected document, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = correct(doc)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def correct(doc: dict[str, Any]) -> dict[str, Any]:
    """Rewrite FastAPI's generated responses to the server's real ones (in place; returned)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            op["responses"] = _responses(path, method, op.get("responses", {}))
    return doc


def _responses(path: str, method: str, generated: dict[str, Any]) -> dict[str, Any]:
    if path in ("/v1/chat/completions", "/v1/completions"):
        ok = {"description": "the completion (JSON), or with `stream: true` server-sent events: `data: {chunk}` "
                             "lines, `: keep-alive` comments while waiting, then `data: [DONE]`",
              "content": {"application/json": {"schema": _COMPLETION_SCHEMA}, "text/event-stream": _SSE}}
        return {"200": ok, **_errors(_POST_ERRORS)}
    if path == "/v1/models":
        return {"200": {"description": "the served model names", "content": {"application/json": {
            "schema": _MODEL_LIST_SCHEMA}}}, **_errors(_GET_ERRORS)}
    if path == "/health":
        return {"200": {"description": "the process is serving HTTP (status ok, loading or error)",
                        "content": {"application/json": {"schema": _HEALTH_SCHEMA}}}}
    if path == "/health/ready":
        body = {"content": {"application/json": {"schema": _READY_SCHEMA}}}
        return {"200": {"description": "every loaded module answers", **body},
                "503": {"description": "loading, failing or draining", **body}}
    generated.pop("422", None)
    return generated


def _errors(codes: tuple[str, ...]) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": {"application/json": {"schema": _ERROR_REF}}} for c in codes}
