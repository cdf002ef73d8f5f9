"""Liveness and readiness routes: `/health` answers while the process lives; `/health/ready` is 200 only when every
loaded module answers a tiny forward (`health.HealthChecker`), 503 while loading, failing or draining."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from autoglm.server.health import health_payload
from autoglm.server.state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the process serves HTTP (even while the model loads)."""
    state = get_state(request)
    loaded = state.model is not None and state.engine is not None
    status = "ok" if loaded else ("error" if state.load_error else "loading")
    return JSONResponse({"status": status, "uptime_s": round(time.time() - state.started, 3)})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 only when every loaded module answers a tiny forward; 503 otherwise."""
    state = get_state(request)
    if state.engine is not None and state.engine.draining:  # SIGTERM: take this instance out of rotation
        return JSONResponse({"status": "draining", "reason": "the server is shutting down", "modules": []},
                            status_code=503)
    if state.health is None:
        reason = state.load_error or "the model is still loading"
        return JSONResponse({"status": "not_ready", "reason": reason, "modules": []}, status_code=503)
    force = request.query_params.get("force") in ("1", "true")
    results = await state.health.check(force=force)
    ok = all(r.ok for r in results)
    return JSONResponse({"status": "ready" if ok else "not_ready", "modules": health_payload(results)},
                        status_code=200 if ok else 503)
