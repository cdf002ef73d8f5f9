"""`HealthChecker`: asks every loaded module for a tiny forward — the decoder generates one token through the engine
(so the engine loop is proven alive too), each encoder encodes its own `sample()` — for `/health/ready`
(`health_api.py`) and the status page.

Results are cached for `ttl` seconds so that probes and the status page do not load the CPU.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from autoglm.engine.prompt import build_text_prompt
from autoglm.engine.sampling_params import SamplingParams
from autoglm.multimodal.encoder import Encoder

if TYPE_CHECKING:
    from autoglm.models.loaded import LoadedModel
    from autoglm.server.engine_client import EngineClient


@dataclass
class ModuleHealth:
    name: str
    ok: bool
    detail: str
    latency_ms: float
    checked_at: float


class HealthChecker:
    def __init__(self, model: LoadedModel, engine: EngineClient, ttl: float = 10.0, timeout: float = 120.0) -> None:
        self.model = model
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
            for encoder in self.model.encoders.values():
                results.append(await self._probe_encoder(encoder))
            self._last = results
            self._last_time = time.monotonic()
            return list(results)

    async def _probe_decoder(self) -> ModuleHealth:
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

    async def _probe_encoder(self, encoder: Encoder) -> ModuleHealth:
        start = time.monotonic()
        name = encoder.module_name
        try:
            def run() -> str:
                inputs = encoder.preprocess(encoder.sample())
                out = encoder.encode(inputs)  # [n_slots, hidden]
                if out.shape[0] != inputs.n_slots:
                    raise RuntimeError(f"encoded {out.shape[0]} slots, expected {inputs.n_slots}")
                if not bool(out.float().isfinite().all()):
                    raise RuntimeError("non-finite embeddings")
                return f"encoded a test {encoder.modality} into {tuple(out.shape)}"

            detail = await asyncio.wait_for(asyncio.to_thread(run), self.timeout)
            ok = True
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return ModuleHealth(name, ok, detail, (time.monotonic() - start) * 1000, time.time())


def health_payload(results: list[ModuleHealth]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
