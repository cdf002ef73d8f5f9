"""SpeechService over the real tiny Parakeet CTC recognizer: batching gives the same results as one at a time, one
job's error stays its own, a full queue is a 429, a cancelled caller's waiting job is skipped, waits are bounded."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autoglm.errors import MediaError, Overloaded, RequestTimeout
from autoglm.multimodal.audio import AudioLimits
from autoglm.server.speech_service import SpeechRequest, SpeechService
from tests.fixtures.conformer import tone_clip


class _Gated:
    """The real recognizer, held at a gate so tests can fill the queue while the worker is busy."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.name, self.format, self.quantization = inner.name, inner.format, inner.quantization
        self.multilingual, self.supports_translation = False, False
        self.batch_sizes: list[int] = []

    def transcribe(self, samples: np.ndarray, **kw: Any) -> Any:
        self.entered.set()
        self.gate.wait(60)
        return self.inner.transcribe(samples, **kw)

    def transcribe_batch(self, clips: list[np.ndarray], **kw: Any) -> Any:
        self.entered.set()
        self.gate.wait(60)
        self.batch_sizes.append(len(clips))
        return self.inner.transcribe_batch(clips, **kw)


@pytest.fixture(scope="module")
def recognizer(parakeet_dir: Path) -> Any:
    from autoglm.speech.conformer import load_conformer

    rec, info = load_conformer(parakeet_dir)
    return rec, info


def _service(recognizer: Any, **kw: Any) -> tuple[SpeechService, _Gated]:
    rec, info = recognizer
    gated = _Gated(rec)
    limits = AudioLimits(max_seconds=15.0)
    return SpeechService(gated, info, chat_limits=limits, file_limits=limits, **kw), gated  # type: ignore[arg-type]


def test_batched_results_equal_single_and_errors_stay_alone(recognizer: Any) -> None:
    service, gated = _service(recognizer)
    clips = [tone_clip(1.0 + 0.5 * i, seed=i) for i in range(4)]
    bad = np.zeros((2, 100), np.float32)  # not mono: the recognizer raises MediaError for this job only

    async def main() -> list[Any]:
        blocker = asyncio.ensure_future(service.transcribe(tone_clip(0.5, seed=9)))
        await asyncio.to_thread(gated.entered.wait, 30)  # worker busy: the next jobs queue up together
        jobs = [asyncio.ensure_future(service.transcribe(c)) for c in clips[:2]]
        jobs.append(asyncio.ensure_future(service.transcribe(bad)))
        jobs += [asyncio.ensure_future(service.transcribe(c)) for c in clips[2:]]
        await asyncio.sleep(0.1)
        gated.gate.set()
        await blocker
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        service.close()
    assert isinstance(out[2], MediaError)
    good = [out[0], out[1], out[3], out[4]]
    assert [t.text for t in good] == [recognizer[0].transcribe(c).text for c in clips]
    assert max(gated.batch_sizes) > 1  # the queued jobs shared a forward pass (then re-ran alone after the error)


def test_full_queue_is_429_and_waits_are_bounded(recognizer: Any) -> None:
    service, gated = _service(recognizer, max_queue=1, timeout=0.5)

    async def main() -> None:
        first = asyncio.ensure_future(service.transcribe(tone_clip(0.5)))
        await asyncio.to_thread(gated.entered.wait, 30)
        second = asyncio.ensure_future(service.transcribe(tone_clip(0.5)))  # fills the queue
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await service.transcribe(tone_clip(0.5))
        with pytest.raises(RequestTimeout):
            await first
        with pytest.raises(RequestTimeout):
            await second  # timed out waiting: cancelled, so the worker skips it
        gated.gate.set()

    try:
        asyncio.run(main())
    finally:
        service.close()
    assert gated.batch_sizes in ([], [1])  # the cancelled job never ran


def test_request_options_reach_the_recognizer(recognizer: Any) -> None:
    service, gated = _service(recognizer)
    gated.gate.set()

    async def main() -> Any:
        return await service.transcribe(tone_clip(2.0, seed=3), SpeechRequest(timestamps=True))

    try:
        out = asyncio.run(main())
    finally:
        service.close()
    assert out.segments and out.text == recognizer[0].transcribe(tone_clip(2.0, seed=3)).text


def test_probe_transcribes_when_idle_and_is_ready_when_busy(recognizer: Any) -> None:
    service, gated = _service(recognizer)

    async def main() -> tuple[str, str]:
        job = asyncio.ensure_future(service.transcribe(tone_clip(0.5)))
        await asyncio.to_thread(gated.entered.wait, 30)
        busy = await service.probe(30.0)  # the worker holds a request: no probe queued behind it
        gated.gate.set()
        await job
        return busy, await service.probe(30.0)

    try:
        busy, idle = asyncio.run(main())
    finally:
        service.close()
    assert busy.startswith("busy: 1 running") and idle.startswith("transcribed 1 s of test tone")
