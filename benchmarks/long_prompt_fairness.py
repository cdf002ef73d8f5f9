"""A short request beside a long prompt's prefill, with the scheduler's prefill cap off and on (outside CI).

    python benchmarks/long_prompt_fairness.py

Starts the default server (built-in model, --no-speech) twice on free loopback ports, once with
AUTOGLM_LONG_PREFILL_TOKEN_THRESHOLD=0 (a prompt may take the whole step) and once with 512 (the default). Each time
it sends a ~7k-token chat, then 2 s later a short one (max_tokens 2), and prints both latencies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LONG_TEXT = " ".join(f"word{i}" for i in range(2400))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chat(base: str, text: str) -> float:
    t = time.monotonic()
    r = httpx.post(base + "/v1/chat/completions", timeout=300, json={
        "model": "autoglm-phone-9b", "messages": [{"role": "user", "content": text}], "max_tokens": 2})
    r.raise_for_status()
    return time.monotonic() - t


def run(threshold: int) -> dict[str, float]:
    port = _free_port()
    env = {**os.environ, "AUTOGLM_LONG_PREFILL_TOKEN_THRESHOLD": str(threshold)}
    cmd = [str(ROOT / ".venv/bin/autoglm"), "serve", "--host", "127.0.0.1", "--port", str(port), "--no-speech"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the server did not become ready in 180 s")
            time.sleep(0.5)
        out: dict[str, float] = {}
        worker = threading.Thread(target=lambda: out.__setitem__("long_s", _chat(base, LONG_TEXT)))
        worker.start()
        time.sleep(2)
        out["short_s"] = _chat(base, "hi")
        worker.join(300)
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    for threshold in (0, 512):
        print(f"long_prefill_token_threshold={threshold}: {run(threshold)}", flush=True)


if __name__ == "__main__":
    main()
