"""Prometheus metrics plus the small in-memory request log the status page shows.

Each app owns its own `CollectorRegistry` (tests start several apps in one process). Running/waiting counts and
KV-cache usage are read from the engine's `stats()` at scrape time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class RequestRecord:
    """One finished request, as the status page lists it."""

    request_id: str
    endpoint: str
    model: str
    status: int
    started: float  # unix time
    duration_s: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    finish_reason: str | None
    stream: bool


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]] | None = None, recent: int = 50) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "autoglm_requests", "Finished HTTP requests on the inference endpoints", ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter("autoglm_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter(
            "autoglm_completion_tokens", "Completion tokens generated (reasoning included)", registry=self.registry
        )
        self.reasoning_tokens = Counter(
            "autoglm_reasoning_tokens", "Completion tokens that were reasoning", registry=self.registry
        )
        self.ttft = Histogram(
            "autoglm_time_to_first_token_seconds", "Time from request arrival to the first generated token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.itl = Histogram(
            "autoglm_inter_token_latency_seconds", "Time between consecutive generated tokens of one request",
            buckets=_ITL_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "autoglm_e2e_request_latency_seconds", "Time from request arrival to its last token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge("autoglm_http_requests_in_flight", "Open inference HTTP requests",
                               registry=self.registry)
        self._stats = stats
        self.registry.register(_EngineCollector(self))
        self.started = time.time()
        self._lock = threading.Lock()
        self.recent: deque[RequestRecord] = deque(maxlen=recent)
        self._token_times: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens/s over a window
        self.total_requests = 0
        self.total_errors = 0
        self.total_completion_tokens = 0
        self.total_prompt_tokens = 0

    def set_stats_source(self, stats: Callable[[], dict[str, Any]] | None) -> None:
        self._stats = stats

    def engine_stats(self) -> dict[str, Any]:
        if self._stats is None:
            return {}
        try:
            return dict(self._stats())
        except Exception:  # metrics must never fail a scrape
            return {}

    # --- recording ---------------------------------------------------------------------------------------------
    def observe_tokens(self, n: int, ttft: float | None = None, itl: float | None = None) -> None:
        """Called as tokens stream out: feeds the latency histograms and the tokens/s window."""
        if ttft is not None:
            self.ttft.observe(ttft)
        if itl is not None and n > 0:
            # Several tokens may arrive in one delta; spread the gap evenly across them.
            for _ in range(n):
                self.itl.observe(itl / n)
        if n > 0:
            with self._lock:
                self._token_times.append((time.time(), n))

    def record(self, record: RequestRecord) -> None:
        self.requests.labels(record.endpoint, str(record.status)).inc()
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.inc(record.completion_tokens)
        if record.reasoning_tokens:
            self.reasoning_tokens.inc(record.reasoning_tokens)
        if record.status < 400:
            self.e2e.observe(record.duration_s)
        with self._lock:
            self.recent.appendleft(record)
            self.total_requests += 1
            self.total_errors += int(record.status >= 400)
            self.total_prompt_tokens += record.prompt_tokens
            self.total_completion_tokens += record.completion_tokens

    # --- reading -----------------------------------------------------------------------------------------------
    def tokens_per_second(self, window: float = 30.0) -> float:
        now = time.time()
        with self._lock:
            while self._token_times and self._token_times[0][0] < now - window:
                self._token_times.popleft()
            total = sum(n for _, n in self._token_times)
        return total / window

    def summary(self) -> dict[str, Any]:
        with self._lock:
            recent = [asdict(r) for r in self.recent]
            totals = {
                "requests": self.total_requests,
                "errors": self.total_errors,
                "prompt_tokens": self.total_prompt_tokens,
                "completion_tokens": self.total_completion_tokens,
            }
        return {
            "uptime_s": time.time() - self.started,
            "totals": totals,
            "tokens_per_second": self.tokens_per_second(),
            "engine": self.engine_stats(),
            "recent": recent,
        }

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Scrape-time gauges from the engine: running / waiting requests, KV blocks."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self):  # noqa: ANN201 (prometheus collector protocol)
        stats = self.metrics.engine_stats()
        for key, help_text in (
            ("running", "Requests being decoded or prefilled"),
            ("waiting", "Requests queued for admission"),
            ("kv_blocks_used", "KV-cache blocks in use"),
            ("kv_blocks_free", "KV-cache blocks free"),
        ):
            family = GaugeMetricFamily(f"autoglm_requests_{key}" if key in ("running", "waiting")
                                       else f"autoglm_{key}", help_text)
            family.add_metric([], float(stats.get(key, 0) or 0))
            yield family
        # concurrency: KV capacity, prefix caching, backpressure (engine stats; absent keys read as 0)
        for name, key, help_text in _ENGINE_GAUGES:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], float(stats.get(key, 0) or 0))
            yield family
        for name, key, help_text in _ENGINE_COUNTERS:
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], float(stats.get(key, 0) or 0))
            yield counter


_ENGINE_GAUGES = (
    ("autoglm_kv_blocks_total", "kv_blocks_total", "KV-cache blocks in all"),
    ("autoglm_prefix_cache_hit_rate", "prefix_cache_hit_rate",
     "Prompt tokens served from the prefix cache / prompt tokens looked up, since start"),
    ("autoglm_engine_requests_in_flight", "in_flight", "Requests admitted to the engine and not yet ended"),
    ("autoglm_draining", "draining", "1 while the server drains after SIGTERM (new requests get 503)"),
    ("autoglm_encoder_cache_bytes", "encoder_cache_bytes", "Bytes of cached encoder outputs"),
)
_ENGINE_COUNTERS = (
    ("autoglm_preemptions", "preemptions", "Requests preempted (KV cache full) and later recomputed"),
    ("autoglm_prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache"),
    ("autoglm_prefix_cache_query_tokens", "prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache"),
    ("autoglm_request_timeouts", "timeouts", "Requests ended by --request-timeout"),
    ("autoglm_requests_rejected", "requests_rejected", "Requests refused by backpressure (429) or draining (503)"),
    ("autoglm_encoder_runs", "encoder_runs", "Media items run through an encoder"),
    ("autoglm_encoder_cache_hits", "encoder_cache_hits", "Media items whose encoder output came from the cache"),
)
