"""`SpeechService`: the loaded speech module behind /v1/audio/* and chat `input_audio` parts.

Transcriptions run on the service's own worker thread, never on the event loop or the decoder's engine thread. The
queue is bounded (a full one is a 429), every wait is bounded (`timeout`, then 504), and waiting jobs the recognizer
can batch (`transcribe_batch`, e.g. CTC Conformers) go through one forward pass together. A failing job fails alone:
when a batch raises, its jobs are re-run one by one so each gets its own result or error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from autoglm.engine.openmp import release_thread_pool
from autoglm.errors import Overloaded, RequestTimeout
from autoglm.models.loaded import ModuleInfo
from autoglm.multimodal.audio import AudioLimits
from autoglm.speech.recognizer import SAMPLE_RATE, SpeechRecognizer, Transcription

log = logging.getLogger("autoglm.server")


@dataclass(frozen=True)
class SpeechRequest:
    """One transcription's options (see SpeechRecognizer.transcribe)."""

    language: str | None = None
    task: str = "transcribe"
    prompt: str | None = None
    temperature: float = 0.0
    timestamps: bool = False

    @property
    def batch_key(self) -> tuple[str, bool]:
        # transcribe_batch takes only task + timestamps: jobs sharing them can share a forward pass
        return (self.task, self.timestamps)


@dataclass
class _Job:
    samples: np.ndarray  # [N] float32 at 16 kHz
    request: SpeechRequest
    future: concurrent.futures.Future[Transcription] = field(default_factory=concurrent.futures.Future)


class SpeechService:
    """Owns a `SpeechRecognizer` and its worker thread. `transcribe` is awaited from the event loop.

    `chat_limits` / `file_limits`: the decoding caps for chat clips and for /v1/audio/* files.
    """

    def __init__(
        self,
        recognizer: SpeechRecognizer,
        info: ModuleInfo,
        *,
        chat_limits: AudioLimits,
        file_limits: AudioLimits,
        max_queue: int = 32,
        max_batch: int = 8,
        timeout: float = 600.0,
    ) -> None:
        self.recognizer = recognizer
        self.info = info
        self.chat_limits = chat_limits
        self.file_limits = file_limits
        self.max_batch = max_batch
        self.timeout = timeout
        self._batch: Callable[..., list[Transcription]] | None = getattr(recognizer, "transcribe_batch", None)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._run, name="autoglm-speech", daemon=True)
        self._worker.start()
        self.completed = 0  # transcriptions finished (status page / tests)
        self.batches = 0  # forward passes that served more than one job
        self._running = 0  # jobs the worker holds now
        self._progress = time.monotonic()  # when the worker last took or finished a job

    @property
    def name(self) -> str:
        return self.recognizer.name

    @property
    def supports_translation(self) -> bool:
        return bool(self.recognizer.supports_translation)

    async def transcribe(self, samples: np.ndarray, request: SpeechRequest | None = None) -> Transcription:
        """Queue one transcription and await it; 429 when the queue is full, 504 after `timeout` seconds.

        A cancelled caller (client gone) cancels its job if it has not started yet.
        """
        job = _Job(np.ascontiguousarray(samples, dtype=np.float32), request or SpeechRequest())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(
                f"the speech module is busy ({self._queue.maxsize} transcriptions queued); retry shortly"
            ) from None
        try:
            # cancelling the wrapper (timeout, client gone) cancels the job too unless it is already running
            return await asyncio.wait_for(asyncio.wrap_future(job.future), self.timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the transcription did not finish within {self.timeout:g} s") from None

    async def probe(self, timeout: float) -> str:
        """Readiness: transcribe 1 s of a 440 Hz tone through the queue (proves the worker alive).

        A worker busy with requests that made progress within `timeout` is ready without a probe: queueing one
        behind them would turn load into a failed readiness check.
        """
        if self._running or self._queue.qsize():
            if time.monotonic() - self._progress < timeout:
                return f"busy: {self._running} running, {self._queue.qsize()} queued"
        t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
        tone = (0.1 * np.sin(2 * math.pi * 440.0 * t)).astype(np.float32)
        result = await asyncio.wait_for(self.transcribe(tone), timeout)
        return f"transcribed 1 s of test tone ({len(result.text)} chars)"

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the job it is running; queued jobs end with an error."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RequestTimeout("the server is shutting down"))
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._worker.join(timeout)

    # --- worker thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            stop = False
            while self._batch is not None and len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # skip jobs whose caller left
            self._running, self._progress = len(live), time.monotonic()
            groups: dict[tuple[str, bool], list[_Job]] = {}
            for j in live:
                groups.setdefault(j.request.batch_key, []).append(j)
            for group in groups.values():
                self._serve(group)
            release_thread_pool()  # the engine thread's OpenMP team must stay the only one (engine/openmp.py)
            if stop:
                return

    def _serve(self, jobs: Sequence[_Job]) -> None:
        if len(jobs) > 1 and self._batch is not None:
            req = jobs[0].request
            try:
                results = self._batch([j.samples for j in jobs], task=req.task, timestamps=req.timestamps)
            except Exception:
                log.info("a batch of %d transcriptions failed; running them one by one", len(jobs), exc_info=True)
            else:
                self.batches += 1
                for j, r in zip(jobs, results, strict=True):
                    self._done(j, r, None)
                return
        for j in jobs:
            try:
                r = self.recognizer.transcribe(j.samples, language=j.request.language, task=j.request.task,
                                               prompt=j.request.prompt, temperature=j.request.temperature,
                                               timestamps=j.request.timestamps)
            except BaseException as exc:  # one request's error never reaches another
                self._done(j, None, exc)
            else:
                self._done(j, r, None)

    def _done(self, job: _Job, result: Transcription | None, exc: BaseException | None) -> None:
        self.completed += 1
        self._running -= 1  # before the caller wakes: an idle worker reads as idle at once
        self._progress = time.monotonic()
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]

