"""`GET /` the status page (static HTML/CSS/JS shipped in `autoglm/server/status/`, no external assets) and
`GET /status/data`, the JSON it polls: model and aliases, modules with health and memory, uptime, traffic."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from autoglm.server.state import ServerState, get_state

router = APIRouter(include_in_schema=False)

_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _asset(name: str) -> str:
    return resources.files("autoglm.server").joinpath("status", name).read_text(encoding="utf-8")


@router.get("/")
async def index() -> HTMLResponse:
    return HTMLResponse(_asset("index.html"), headers={"cache-control": "no-cache"})


@router.get("/status/data")
async def status_data(request: Request) -> JSONResponse:
    # Declared before /status/{name} so that "data" is never taken for an asset name.
    return JSONResponse(await collect(get_state(request)), headers={"cache-control": "no-store"})


@router.get("/status/{name}")
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        return JSONResponse({"error": {"message": f"no status asset {name!r}", "type": "not_found_error",
                                       "param": None, "code": 404}}, status_code=404)
    return Response(_asset(name), media_type=media_type, headers={"cache-control": "no-cache"})


async def collect(state: ServerState) -> dict[str, Any]:
    health_by_name: dict[str, dict[str, Any]] = {}
    if state.health is not None:
        results = state.health.last
        if not results:
            results = await state.health.check()
        elif time.time() - max(r.checked_at for r in results) > state.health.ttl:
            asyncio.get_running_loop().create_task(state.health.check())  # refresh in the background
        health_by_name = {r.name: asdict(r) for r in results}
    modules = []
    model = state.model
    if model is not None:
        for info in model.modules:
            row = asdict(info)
            row["health"] = health_by_name.get(info.name)
            modules.append(row)
    summary = state.metrics.summary()
    return {
        "model": {
            "name": state.served_names[0],
            "aliases": state.served_names[1:],
            "path": model.path if model is not None else state.config.model,
            "architecture": model.architecture if model is not None else None,
            "max_model_len": state.max_model_len,
            "modalities": sorted(e.modality for e in model.encoders.values()) if model is not None else [],
            "status": "ready" if model is not None else ("error" if state.load_error else "loading"),
        },
        "modules": modules,
        "process": _process(),
        "server": {"host": state.config.host, "port": state.config.port,
                   "reasoning_format": state.config.reasoning_format, "api_key": bool(state.config.api_key)},
        **summary,
    }


def _process() -> dict[str, Any]:
    try:
        import psutil

        proc = psutil.Process(os.getpid())
        mem = proc.memory_info()
        return {"pid": proc.pid, "rss_bytes": mem.rss, "threads": proc.num_threads(),
                "cpu_percent": proc.cpu_percent(interval=None)}
    except Exception:
        return {"pid": os.getpid()}
