"""Faults under concurrency against the live server: clients vanishing mid-stream, malformed requests in between, and
(slow) the committed load test end to end (`benchmarks/load_test.py`)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.load_test import MALFORMED, Sample, settle, stream_chat
from tests.fixtures.server import REPO_ROOT, SERVED_NAMES, ServerProcess, server_env, start_server


def body(i: int, max_tokens: int = 48) -> dict[str, object]:
    words = "open the settings app and tap wifi then go back home".split()
    return {"model": SERVED_NAMES[0], "temperature": 0.0, "ignore_eos": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": " ".join(words[: 2 + i % len(words)]) * (1 + i % 4)}]}


def test_clients_disconnecting_mid_stream_leave_no_trace(server: ServerProcess) -> None:
    rng = random.Random(11)

    async def main() -> tuple[list[Sample], list[Sample], list[int], dict[str, object]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            base = await settle(client)

            async def dropper(i: int) -> Sample:
                await asyncio.sleep(rng.random() * 0.3)
                return await stream_chat(client, body(i), disconnect_after=rng.randint(1, 6))

            async def bad(i: int) -> int:
                name, payload = MALFORMED[i % len(MALFORMED)]
                if isinstance(payload, bytes):
                    r = await client.post("/v1/chat/completions", content=payload,
                                          headers={"content-type": "application/json"})
                else:
                    r = await client.post("/v1/chat/completions", json=payload)
                return r.status_code

            drops = [asyncio.ensure_future(dropper(i)) for i in range(10)]
            bads = [asyncio.ensure_future(bad(i)) for i in range(len(MALFORMED))]
            goods = [asyncio.ensure_future(stream_chat(client, body(100 + i, 6))) for i in range(3)]
            dropped = await asyncio.gather(*drops)
            statuses = await asyncio.gather(*bads)
            ok = await asyncio.gather(*goods)
            after = await settle(client)
            assert base.get("kv_blocks_used") == 0
            return dropped, ok, statuses, after

    dropped, ok, statuses, after = asyncio.run(main())
    assert sum(s.disconnected for s in dropped) == 10, [s.error for s in dropped]
    assert all(400 <= c < 500 for c in statuses), statuses
    assert all(s.done and not s.error and s.tokens == 6 for s in ok), [s.error for s in ok]
    assert after["kv_blocks_used"] == 0 and after["running"] == 0 and after["waiting"] == 0
    assert after.get("in_flight", 0) == 0 and after["prefix_cache_enabled"] is True  # the server's default
    assert httpx.get(server.base_url + "/health/ready", timeout=30).status_code == 200
    assert server.alive()


@pytest.mark.slow
def test_load_test_script_small(tmp_path: Path) -> None:
    """The committed load test, small: load + 1-vs-8 decode, phone agent on/off, faults, SIGTERM during 8 streams."""
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/load_test.py", "--small", "--load", "--phone-agent", "--faults", "--sigterm",
         "--threads", "1", "--max-seconds", "1200", "--json", str(out)],
        cwd=REPO_ROOT, env=server_env(), capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failed_checks"] == []
    assert report["load"]["errors"] == 0 and report["load"]["kv_blocks_used_after"] == 0
    assert report["decode"]["ratio"] > 1.0  # HTTP-bound on this tiny model; BENCHMARKS.md has real-model ratios
    on, off = report["phone_agent"]["prefix_on"], report["phone_agent"]["prefix_off"]
    assert on["prefix_hit_rate"] > 0.05 and off["prefix_hit_rate"] == 0
    assert report["faults"]["kv_blocks_used_after"] == 0 and report["faults"]["health_ready"] == 200
    assert report["sigterm"]["cut_without_event"] == 0


def test_backpressure_429_then_sigterm_drains_live_streams(tiny_glm4v_dir: Path,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """One request runs, one waits, the rest get 429 + Retry-After; then SIGTERM during 8 live streams: each ends
    with [DONE] (finished, or a clean error event at the end of the drain grace), and the process exits."""
    handle = start_server(tiny_glm4v_dir, tmp_path_factory.mktemp("backpressure"), "--served-model-name",
                          SERVED_NAMES[0], "--max-num-seqs", "1", "--max-waiting", "1", "--drain-grace", "1.5")
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=handle.base_url, timeout=120) as client:
                return list(await asyncio.gather(*(client.post("/v1/chat/completions", json=body(i, 60))
                                                   for i in range(6))))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers.get("retry-after") == "1"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert "waiting queue is full" in limited.json()["error"]["message"]
        metrics = httpx.get(handle.base_url + "/metrics", timeout=30).text
        assert "autoglm_requests_rejected_total" in metrics and "autoglm_prefix_cache_hit_rate" in metrics
    finally:
        handle.stop()

    handle = start_server(tiny_glm4v_dir, tmp_path_factory.mktemp("drain"), "--served-model-name", SERVED_NAMES[0],
                          "--max-num-seqs", "8", "--drain-grace", "1.5")
    try:
        async def live() -> tuple[list[Sample], float]:
            async with httpx.AsyncClient(base_url=handle.base_url, timeout=120) as client:
                tasks = [asyncio.create_task(stream_chat(client, body(i, 900))) for i in range(8)]
                for _ in range(600):
                    stats = (await client.get("/status/data")).json()["engine"]
                    if stats["running"] == 8 and stats["tokens_generated"] >= 16:
                        break
                    await asyncio.sleep(0.02)
                started = time.monotonic()
                handle.process.send_signal(signal.SIGTERM)
                samples = await asyncio.wait_for(asyncio.gather(*tasks), 60)
                return samples, time.monotonic() - started

        samples, took = asyncio.run(live())
        assert all(s.done for s in samples), [s.error for s in samples]  # nothing cut without its [DONE]
        for s in samples:
            assert s.error is None or "drain grace period" in s.error, s.error
        assert took < 15
        assert handle.process.wait(30) in (0, -signal.SIGTERM)
        assert "draining" in handle.log()
    finally:
        handle.stop()
