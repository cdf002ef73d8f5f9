"""Liveness and readiness: `/health` answers while the process lives; `/health/ready` asks every loaded module for a
tiny forward (the decoder generates one token through the engine, so the engine loop is proven alive too; each
encoder encodes a tiny sample) and is 200 only when all of them answer.

Results are cached for `ttl` seconds so that probes and the status page do not load the CPU.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from autoglm.server.state import get_state

if TYPE_CHECKING:
    from autoglm.models.loaded import LoadedModel

router = APIRouter()

# ModuleInfo.name values that belong to each encoder modality.
_MODALITY_NAMES = {"image": ("vision", "image", "mmproj", "visual"), "audio": ("speech", "audio", "whisper")}


@dataclass
class ModuleHealth:
    name: str
    ok: bool
    detail: str
    latency_ms: float
    checked_at: float


class HealthChecker:
    def __init__(self, model: LoadedModel, engine: Any, ttl: float = 10.0, timeout: float = 120.0,
                 speech: Any = None) -> None:
        self.model = model
        self.speech = speech  # autoglm.server.speech_service.SpeechService or None
        self.engine = engine
        self.ttl = ttl
        self.timeout = timeout
        self._last: list[ModuleHealth] = []
        self._last_time = 0.0
        self._lock = asyncio.Lock()
        self._seq = 0

    @property
    def last(self) -> list[ModuleHealth]:
        return list(self._last)

    async def check(self, force: bool = False) -> list[ModuleHealth]:
        async with self._lock:
            if not force and self._last and time.monotonic() - self._last_time < self.ttl:
                return list(self._last)
            results = [await self._probe_decoder()]
            for modality, encoder in self.model.encoders.items():
                results.append(await self._probe_encoder(modality, encoder))
            if self.speech is not None:
                results.append(await self._probe_speech())
            self._last = results
            self._last_time = time.monotonic()
            return list(results)

    def module_name(self, modality: str) -> str:
        names = _MODALITY_NAMES.get(modality, (modality,))
        for info in self.model.modules:
            if info.name in names or info.name == modality:
                return info.name
        return names[0]

    async def _probe_decoder(self) -> ModuleHealth:
        from autoglm.engine.prompt import build_text_prompt
        from autoglm.engine.sampling_params import SamplingParams

        start = time.monotonic()
        self._seq += 1
        try:
            prompt = build_text_prompt(self.model, "ok")
            params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True).resolve()
            tokens = 0

            async def run() -> None:
                nonlocal tokens
                async for out in self.engine.generate(f"health-{self._seq}", prompt, params):
                    tokens += len(out.new_token_ids or ())

            await asyncio.wait_for(run(), self.timeout)
            ok = tokens >= 1
            detail = "generated 1 token" if ok else "engine returned no token"
        except Exception as exc:  # a failing module is reported, not raised
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return ModuleHealth("decoder", ok, detail, (time.monotonic() - start) * 1000, time.time())

    async def _probe_encoder(self, modality: str, encoder: Any) -> ModuleHealth:
        start = time.monotonic()
        name = self.module_name(modality)
        try:
            sample = _sample_media(modality)
            if sample is None:
                return ModuleHealth(name, True, "loaded (no probe for this modality)", 0.0, time.time())

            def run() -> str:
                inputs = encoder.preprocess(sample)
                out = encoder.encode(inputs)  # [n_slots, hidden]
                if out.shape[0] != inputs.n_slots:
                    raise RuntimeError(f"encoded {out.shape[0]} slots, expected {inputs.n_slots}")
                if not bool(out.float().isfinite().all()):
                    raise RuntimeError("non-finite embeddings")
                return f"encoded a test {modality} into {tuple(out.shape)}"

            detail = await asyncio.wait_for(asyncio.to_thread(run), self.timeout)
            ok = True
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return ModuleHealth(name, ok, detail, (time.monotonic() - start) * 1000, time.time())


    async def _probe_speech(self) -> ModuleHealth:
        start = time.monotonic()
        try:
            ok, detail = True, await self.speech.probe(self.timeout)
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return ModuleHealth("speech", ok, detail, (time.monotonic() - start) * 1000, time.time())


def _sample_media(modality: str) -> Any:
    if modality == "image":
        from PIL import Image

        # Smallest image that survives GLM-4.1V's resize (factor 28) without upscaling artifacts mattering.
        return Image.new("RGB", (56, 56), (127, 127, 127))
    if modality == "audio":
        import numpy as np

        t = np.arange(16000, dtype=np.float32) / 16000.0  # 1 s of a 440 Hz tone at 16 kHz
        return np.sin(2 * math.pi * 440.0 * t).astype(np.float32)
    return None


def health_payload(results: list[ModuleHealth]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


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
    if getattr(state.engine, "draining", False) is True:  # SIGTERM: take this instance out of rotation
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
