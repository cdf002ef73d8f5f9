"""Observability: the status page rendered by headless Chromium (module rows present, screenshot saved under
test-artifacts/), its JSON feed, /metrics in Prometheus format, /health and /health/ready, /openapi.json."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import REPO_ROOT, SERVED_NAMES, ServerProcess

ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900"]


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), "chromium is required (installed by .ci/run / run_tests.sh)"
    return path


def _traffic(server: ServerProcess) -> None:
    body = {"model": SERVED_NAMES[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert httpx.post(server.v1 + "/chat/completions", json=body, timeout=60).status_code == 200
    assert httpx.post(server.v1 + "/chat/completions", json={**body, "model": "nope"}, timeout=60).status_code == 404


def test_status_page_in_headless_chromium(server: ServerProcess, tmp_path: Path) -> None:
    _traffic(server)
    chromium = _chromium()
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-dom'}", "--virtual-time-budget=5000",
         "--dump-dom", server.base_url + "/"],
        capture_output=True, text=True, timeout=120,
    ).stdout
    rows = re.findall(r'<tr class="module-row" data-module="([^"]+)">', dom)
    assert rows == ["decoder", "vision"], dom[-3000:]
    assert dom.count("healthy") >= 2  # each module row shows its passing check
    assert SERVED_NAMES[0] in dom and SERVED_NAMES[1] in dom  # name and alias
    assert re.search(r'id="requests">\d+<', dom)
    assert re.search(r'id="kv">\d+ / [1-9]\d*<', dom)  # KV blocks used / total from the engine
    assert re.search(r'id="prefix">(off|\d+\.\d %)<', dom) and re.search(r'id="preemptions">\d+<', dom)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status_page.png"
    shot.unlink(missing_ok=True)
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}", "--virtual-time-budget=5000",
         f"--screenshot={shot}", server.base_url + "/"],
        capture_output=True, timeout=120, check=False,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_page_has_no_external_assets(server: ServerProcess) -> None:
    html = httpx.get(server.base_url + "/", timeout=30).text
    js = httpx.get(server.base_url + "/status/app.js", timeout=30).text
    css = httpx.get(server.base_url + "/status/style.css", timeout=30).text
    for text in (html, js, css):
        assert not re.search(r"(src|href)=\"https?://", text)
        assert "url(http" not in text and "@import" not in text
    assert "fetch(\"/status/data\"" in js and "setTimeout(refresh" in js  # it refreshes itself


def test_status_data(server: ServerProcess) -> None:
    _traffic(server)
    data = httpx.get(server.base_url + "/status/data", timeout=60).json()
    assert data["model"]["name"] == SERVED_NAMES[0] and data["model"]["aliases"] == list(SERVED_NAMES[1:])
    names = [m["name"] for m in data["modules"]]
    assert names == ["decoder", "vision"]
    for module in data["modules"]:
        assert module["parameters"] > 0 and module["bytes"] > 0 and module["health"]["ok"] is True
    assert data["uptime_s"] > 0 and data["totals"]["requests"] >= 2 and data["totals"]["errors"] >= 1
    assert data["process"]["rss_bytes"] > 0
    statuses = {r["status"] for r in data["recent"]}
    assert {200, 404} <= statuses


def test_metrics(server: ServerProcess) -> None:
    _traffic(server)
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert re.search(r'autoglm_requests_total\{endpoint="chat",status="200"\} [1-9]', text)
    assert re.search(r'autoglm_requests_total\{endpoint="chat",status="404"\} [1-9]', text)
    for name in ("autoglm_prompt_tokens_total", "autoglm_completion_tokens_total"):
        assert float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) > 0
    assert float(re.search(r"^autoglm_time_to_first_token_seconds_count (\S+)$", text, re.M).group(1)) >= 1
    assert float(re.search(r"^autoglm_inter_token_latency_seconds_count (\S+)$", text, re.M).group(1)) >= 1
    assert re.search(r"^autoglm_requests_running \d", text, re.M)
    assert re.search(r"^autoglm_requests_waiting \d", text, re.M)


def test_health_endpoints(server: ServerProcess) -> None:
    live = httpx.get(server.base_url + "/health", timeout=30)
    assert live.status_code == 200 and live.json()["status"] == "ok"
    ready = httpx.get(server.base_url + "/health/ready", params={"force": "1"}, timeout=60)
    assert ready.status_code == 200
    modules = {m["name"]: m for m in ready.json()["modules"]}
    assert set(modules) == {"decoder", "vision"} and all(m["ok"] for m in modules.values())
    assert "token" in modules["decoder"]["detail"] and "encoded" in modules["vision"]["detail"]


def test_openapi(server: ServerProcess) -> None:
    spec = httpx.get(server.base_url + "/openapi.json", timeout=30).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/health/ready"} <= set(spec["paths"])


@pytest.mark.parametrize("path", ["/status/../../etc/passwd", "/status/secret.py"])
def test_status_assets_only_serve_known_files(server: ServerProcess, path: str) -> None:
    assert httpx.get(server.base_url + path, timeout=30).status_code == 404
