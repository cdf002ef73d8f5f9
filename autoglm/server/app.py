"""FastAPI app factory. The lifespan loads the model (unless one is handed in), logs one line per module, starts the
engine loop, then logs `Server listening on http://HOST:PORT` and `All modules loaded successfully`.

`autoglm serve` binds the socket before the app starts, so a taken port fails at once and clients that connect while
the model loads wait in the listen backlog instead of being refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from autoglm.engine.openmp import ReleasingExecutor
from autoglm.errors import AutoGLMError
from autoglm.server import audio_api, health_api, ollama_api, openai_api, status_page
from autoglm.server.browser import CORSMiddleware, HeadAsGetMiddleware, cors_options
from autoglm.server.config import ServerConfig
from autoglm.server.engine_client import EngineClient
from autoglm.server.errors_http import RequestIdMiddleware, SafeJSONResponse, install_error_handlers
from autoglm.server.health import HealthChecker
from autoglm.server.limits import BodyLimitMiddleware
from autoglm.server.metrics import Metrics
from autoglm.server.openapi_doc import install_openapi
from autoglm.server.state import ServerState, get_state

if TYPE_CHECKING:
    from autoglm.models.loaded import LoadedModel, ModuleInfo

log = logging.getLogger("autoglm.server")


class StartupFailed(Exception):
    """Start-up stopped on an error already logged in one line (`commands/serve.py` keeps its traceback out)."""


def create_app(
    config: ServerConfig, *, model: LoadedModel | None = None, engine: EngineClient | None = None
) -> FastAPI:
    """`model`/`engine` may be given (tests, embedding); otherwise the lifespan loads `config.model` and builds the
    engine from it."""
    state = ServerState(config=config, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await _start(state, model, engine)
        except AutoGLMError as e:  # a bad file or setting: one clear line, not the ASGI traceback
            log.error("autoglm serve: error: %s", e.message)
            raise StartupFailed(e.message) from None
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        default_response_class=SafeJSONResponse,
        title="autoglm",
        version=_version(),
        description="OpenAI-compatible server for AutoGLM-Phone-class (GLM-4.1V) models",
        lifespan=lifespan,
        docs_url=None,  # Swagger/ReDoc pages load their scripts from a CDN; we stay offline (openapi.json stays)
        redoc_url=None,
    )
    app.state.autoglm = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outside the limit: its errors carry the request id
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(CORSMiddleware, **cors_options(config.allowed_origins))  # outermost: errors get CORS too
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(health_api.router)
    app.include_router(status_page.router)
    app.include_router(audio_api.router)  # speech (issue 12)
    install_openapi(app)  # the document says what the routes answer (no 422, error schema, SSE)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _start(state: ServerState, model: LoadedModel | None, engine: EngineClient | None) -> None:
    # to_thread jobs (loading, packing, probes) free their OpenMP team: the engine thread's stays the only one
    asyncio.get_running_loop().set_default_executor(ReleasingExecutor(thread_name_prefix="autoglm-worker"))
    config = state.config
    if model is None:
        from autoglm.loader import load_model

        target = config.model or "the built-in default model"
        log.info("Loading %s", target)
        started = time.monotonic()
        model = await asyncio.to_thread(
            load_model, config.model, mmproj=config.mmproj, dtype=config.dtype, device=config.device,
            no_vision=config.no_vision, quantization=config.quantization, chat_template=config.chat_template,
            cpu_isa=config.cpu_isa,
        )
        log.info("Model %s (%s) loaded in %.2f s", model.name, model.architecture, time.monotonic() - started)
    for info in model.modules:
        log.info("%s", module_line(info))
    if engine is None:
        await asyncio.to_thread(_prepare_weights, model)
        engine = await asyncio.to_thread(build_engine, model, config)
    state.model = model
    state.engine = engine
    state.metrics.set_stats_source(engine.stats)
    from autoglm.server.speech_startup import start_speech  # speech module (issue 12)

    await start_speech(state, module_line)
    state.health = HealthChecker(model, engine, speech=state.speech)
    log.info("Server listening on http://%s:%d", config.host, config.port)
    log.info("Serving %s as %s (context %d tokens)", model.path or model.name, ", ".join(state.served_names),
             state.max_model_len)
    log.info("All modules loaded successfully")


def _prepare_weights(model: LoadedModel) -> None:
    """Repack GGUF weights for their kernels before listening (the explicit `prepare_weights` step; the engine's
    runner would otherwise do it while the first request waits)."""
    from autoglm.layers.linear.gguf import prepare_weights

    started = time.monotonic()
    log.info("Packing GGUF weights for the CPU kernels (once per start)")
    n = prepare_weights(model.decoder)
    if n:
        # Unique tensors only: a tied lm_head shares its embedding's packed copy.
        packed = {t.data_ptr(): t.nbytes for t in model.decoder.state_dict(keep_vars=True).values()}
        log.info("Packed %d GGUF weights for the CPU kernels (%.1f MB in the model) in %.2f s", n,
                 sum(packed.values()) / 1e6, time.monotonic() - started)


async def _stop(state: ServerState) -> None:
    from autoglm.server.speech_startup import stop_speech

    stop_speech(state)
    if state.engine is not None:
        state.engine.shutdown()


def build_engine(model: LoadedModel, config: ServerConfig) -> EngineClient:
    from autoglm.config import EngineConfig
    from autoglm.engine.async_engine import AsyncEngine
    from autoglm.engine.engine import Engine

    engine_config = EngineConfig.from_sources(
        {
            "max_model_len": config.max_model_len,
            "max_num_seqs": config.max_num_seqs,
            "kv_cache_memory": config.kv_cache_memory,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "long_prefill_token_threshold": config.long_prefill_token_threshold,
            "max_waiting": config.max_waiting,
            "request_timeout": config.request_timeout,
            "enable_prefix_caching": False if config.no_prefix_caching else None,
            "default_max_tokens": config.default_max_tokens,
            "deterministic": True if config.deterministic else None,
        },
        # no model_values max_model_len: an unset context lets the KV default rule size it (engine/memory.py)
        defaults={"enable_prefix_caching": True},  # agents resend the same prefix every step (EngineConfig says why)
    )
    return AsyncEngine(Engine(model, engine_config))


def module_line(info: ModuleInfo) -> str:
    """`decoder: /m/model.safetensors | safetensors float32 | cpu | 9.40B params | 18.8 GB | 3.21 s`"""
    return (
        f"Loaded module {info.name}: {info.path} | {info.format} {info.quantization} | {info.device} | "
        f"{_human(info.parameters, '')} params | {_human(info.bytes, 'B')} | {info.load_seconds:.2f} s"
        + (f" | kernels {info.kernels}" if info.kernels else "")
    )


def _human(n: int, unit: str) -> str:
    for suffix, scale in (("T", 1e12), ("G" if unit else "B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n}{unit}"


def _version() -> str:
    from autoglm import __version__

    return __version__
