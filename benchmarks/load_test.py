"""Load and fault test for `autoglm serve` over loopback HTTP. Bounded in requests and time; stops by itself.

    python benchmarks/load_test.py [--model DIR|GGUF | --url http://127.0.0.1:PORT] [--requests 256]
        [--concurrency 32] [--max-seconds 900] [--phone-agent] [--faults] [--sigterm] [--small] [--json out.json]

Without --model/--url it writes a small random GLM-4.1V checkpoint (hidden 256, 4 layers, 8k context; needs
transformers, the test oracle) and starts `python -m autoglm.commands.serve` on a free 127.0.0.1 port.

- load (default): `--concurrency` streaming clients over `--requests` mixed requests (short..long prompts, 8..96 new
  tokens, every 5th with an image) -> errors, p50/p99 TTFT and inter-token latency, KV blocks still used afterwards
  (/status/data); then aggregate decode tok/s at 1 and at 8 concurrent streams (same request) and their ratio.
- --phone-agent: 4 devices x `--steps` steps, each step the same long system prompt + a new 1080x2400 screenshot;
  run once against a server with prefix caching on and once with it off -> prefix hit rate, TTFT saving.
- --faults: 100 clients that disconnect mid-stream at random moments, malformed requests interleaved with valid ones
  -> no 5xx, valid ones complete, server healthy, KV blocks and RSS back to the baseline.
- --llama-server BINARY --model GGUF: llama-server (`-np 8 -t/-tb --threads -c 8192`) and ours back to back, same
  prompt, same `/v1/completions` stream, 1 and 8 streams, `--repeat` alternating rounds -> the ratio table.
- --sigterm: 8 live streams, then SIGTERM -> every stream ends (finished or a clean error event), the process exits.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
WORDS = ("open tap swipe the settings chrome wifi screen button back home search message contact photo album "
         "camera battery network notification calendar alarm").split()
SYSTEM = ("You are a phone-operating agent. Each step you get the task, the history and a screenshot. Think step by "
          "step about what is on the screen, then answer with exactly one action: do(action=\"Launch\", app=...), "
          "do(action=\"Tap\", element=[x,y]), do(action=\"Type\", text=...), do(action=\"Swipe\", start=[x1,y1], "
          "end=[x2,y2]), do(action=\"Back\"), do(action=\"Home\"), do(action=\"Wait\"), or finish(message=...). ")


# --- server process ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def start_server(model: str, extra: list[str], env_extra: dict[str, str], threads: int, log_dir: Path) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **env_extra)
    log_path = log_dir / f"server-{port}.log"
    args = [sys.executable, "-m", "autoglm.commands.serve", model, "--host", "127.0.0.1", "--port", str(port), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(server.url + "/health/ready", timeout=30).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError("server not ready after 300 s")


def start_llama_server(binary: str, model: str, threads: int, slots: int, ctx: int, log_dir: Path) -> Server:
    """llama.cpp's C++ server on a free loopback port: `-np slots -t threads -tb threads -c ctx`."""
    port = free_port()
    log_path = log_dir / f"llama-server-{port}.log"
    args = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-t", str(threads),
            "-tb", str(threads), "-c", str(ctx), "--no-webui"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}):\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=30).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError("llama-server not ready after 300 s")


def write_small_model(path: Path, hidden: int = 256, layers: int = 4) -> Path:
    """A random GLM-4.1V with an 8k context (the test fixtures' writer, larger text part; 4 heads of hidden/4)."""
    sys.path.insert(0, str(REPO))
    from tests.fixtures.models import write_tiny_glm4v

    if not (path / "config.json").exists():
        rot = hidden // 4 // 4  # rotary pairs: head_dim * 0.5 / 2, split over (t, h, w)
        write_tiny_glm4v(path, 0, seed=3, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         mrope_section=[rot // 2, rot // 4, rot - rot // 2 - rot // 4])
        cfg = json.loads((path / "config.json").read_text())
        cfg["text_config"]["max_position_embeddings"] = 8192
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


# --- one streaming client ------------------------------------------------------------------------------------------
@dataclass
class Sample:
    status: int = 0
    error: str | None = None  # HTTP error body or in-band error event
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0  # usage.completion_tokens
    first: float | None = None  # perf_counter of the first token
    last: float | None = None
    done: bool = False  # saw [DONE]
    disconnected: bool = False


async def stream_chat(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    disconnect_after: int | None = None,
    path: str = "/v1/chat/completions",
) -> Sample:
    """POST a streaming chat completion (or, with `path` /v1/completions, a text completion); `disconnect_after`:
    close the connection after that many content chunks."""
    s = Sample()
    t0 = time.perf_counter()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", path, json=body) as r:
            s.status = r.status_code
            if r.status_code != 200:
                s.error = (await r.aread()).decode(errors="replace")[:300]
                return s
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    s.done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    s.error = str(obj["error"].get("message"))
                    continue
                if obj.get("usage"):
                    s.tokens = obj["usage"]["completion_tokens"]
                choice = (obj.get("choices") or [{}])[0]
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content") or choice.get("text"):
                    now = time.perf_counter()
                    if s.first is None:
                        s.first, s.ttft = now, now - t0
                    else:
                        s.itl.append(now - (s.last or now))
                    s.last = now
                    chunks += 1
                    if disconnect_after is not None and chunks >= disconnect_after:
                        s.disconnected = True
                        return s  # leaving the context closes the connection mid-stream
    except httpx.HTTPError as e:
        s.error = f"{type(e).__name__}: {e}"
    return s


def png_data_url(width: int, height: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    # a screenshot-like picture: flat bands plus noise (compresses like a UI, still unique per seed)
    base = np.repeat(rng.integers(0, 255, (height // 40 + 1, 1, 3), dtype=np.uint8), 40, axis=0)[:height]
    img = np.broadcast_to(base, (height, width, 3)).copy()
    img[rng.integers(0, height, 2000), rng.integers(0, width, 2000)] = rng.integers(0, 255, (2000, 3))
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


async def engine_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    data = (await client.get("/status/data", timeout=30)).json()
    return {**data.get("engine", {}), "rss_bytes": data.get("process", {}).get("rss_bytes")}


async def settle(client: httpx.AsyncClient, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until nothing runs or waits; -> the engine stats then."""
    deadline = time.monotonic() + timeout
    stats = await engine_stats(client)
    while time.monotonic() < deadline and (stats.get("running") or stats.get("waiting")):
        await asyncio.sleep(0.1)
        stats = await engine_stats(client)
    return stats


# --- phases --------------------------------------------------------------------------------------------------------
def mixed_body(i: int, model: str, vision: bool) -> dict[str, Any]:
    rng = random.Random(i)
    n_words = rng.choice([4, 16, 64, 200, 600])
    content: Any = " ".join(rng.choice(WORDS) for _ in range(n_words))
    if vision and i % 5 == 0:
        content = [{"type": "image_url", "image_url": {"url": png_data_url(224 + 28 * (i % 3), 168, i)}},
                   {"type": "text", "text": content}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0.0,
            "max_tokens": rng.choice([8, 32, 96]), "ignore_eos": True}


async def run_load(client: httpx.AsyncClient, model: str, vision: bool, n: int, conc: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(conc)

    async def one(i: int) -> Sample:
        async with sem:
            return await stream_chat(client, mixed_body(i, model, vision))

    t0 = time.perf_counter()
    samples = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    stats = await settle(client)
    errors = [s.error or f"HTTP {s.status}" for s in samples if s.error or s.status != 200 or not s.done]
    ttft = [s.ttft for s in samples if s.ttft is not None]
    itl = [x for s in samples for x in s.itl]
    return {
        "requests": n, "concurrency": conc, "wall_s": wall, "errors": len(errors), "error_examples": errors[:3],
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "tokens": sum(s.tokens for s in samples), "tok_per_s": sum(s.tokens for s in samples) / wall,
        "kv_blocks_used_after": stats.get("kv_blocks_used"), "kv_blocks_total": stats.get("kv_blocks_total"),
        "preemptions": stats.get("preemptions"), "prefix_cache_hit_rate": stats.get("prefix_cache_hit_rate"),
    }


async def decode_throughput(
    client: httpx.AsyncClient, model: str, streams: int, tokens: int, ban: list[int] | None = None, text: bool = False
) -> dict[str, Any]:
    prompt = "count slowly: " + " ".join(WORDS[:12])
    body: dict[str, Any] = {"model": model, "temperature": 0.0, "max_tokens": tokens, "ignore_eos": True}
    path = "/v1/completions" if text else "/v1/chat/completions"
    body.update({"prompt": prompt} if text else {"messages": [{"role": "user", "content": prompt}]})
    if ban:  # servers without `ignore_eos` (llama-cpp-python): forbid the end tokens instead
        body["logit_bias"] = {str(t): -100 for t in ban}
    samples = await asyncio.gather(*(stream_chat(client, body, path=path) for _ in range(streams)))
    firsts = [s.first for s in samples if s.first is not None]
    lasts = [s.last for s in samples if s.last is not None]
    # tokens after each stream's first: from usage when the server sends it, else one per content chunk
    decoded = sum(max((s.tokens or len(s.itl) + (s.first is not None)) - 1, 0) for s in samples)
    span = (max(lasts) - min(firsts)) if firsts and lasts else float("nan")
    return {"streams": streams, "decode_tokens": decoded, "decode_s": span, "tok_per_s": decoded / span,
            "errors": sum(1 for s in samples if s.error or not s.done)}


async def run_phone_agent(client: httpx.AsyncClient, model: str, devices: int, steps: int) -> dict[str, Any]:
    system = SYSTEM * 6  # a long agent prompt (~1k tokens with a real tokenizer)

    async def device(d: int) -> list[Sample]:
        history: list[dict[str, Any]] = [{"role": "system", "content": system}]
        out = []
        for step in range(steps):
            shot = png_data_url(1080, 2400, seed=1000 * d + step)
            msgs = [*history, {"role": "user", "content": [
                {"type": "text", "text": f"Task: set an alarm for 7:{d}0. Step {step}."},
                {"type": "image_url", "image_url": {"url": shot}}]}]
            s = await stream_chat(client, {"model": model, "messages": msgs, "temperature": 0.0, "max_tokens": 8,
                                           "ignore_eos": True})
            out.append(s)
            # the agent keeps the text of each step, not the old screenshots (as Open-AutoGLM does)
            history += [{"role": "user", "content": f"Step {step}"}, {"role": "assistant", "content": "do(...)"}]
        return out

    before = await engine_stats(client)
    results = await asyncio.gather(*(device(d) for d in range(devices)))
    stats = await settle(client)
    samples = [s for r in results for s in r]
    ttft = [s.ttft for s in samples if s.ttft is not None]
    hit = stats.get("prefix_cache_hit_tokens", 0) - before.get("prefix_cache_hit_tokens", 0)
    query = stats.get("prefix_cache_query_tokens", 0) - before.get("prefix_cache_query_tokens", 0)
    return {"devices": devices, "steps": steps, "errors": sum(1 for s in samples if s.error or not s.done),
            "ttft_mean_s": sum(ttft) / max(len(ttft), 1), "ttft_p50_s": pct(ttft, 50),
            "prefix_hit_rate": hit / query if query else 0.0, "prefix_enabled": stats.get("prefix_cache_enabled"),
            "kv_blocks_used_after": stats.get("kv_blocks_used")}


MALFORMED: list[tuple[str, Any]] = [
    ("bad json", b"{not json"),
    ("empty body", b""),
    ("no messages", {"model": "m"}),
    ("messages not a list", {"messages": "hi"}),
    ("negative max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}),
    ("temperature type", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
    ("unknown model", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    ("garbage image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
    ("context overflow", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}),
    ("array body", [1, 2, 3]),
]


async def run_faults(client: httpx.AsyncClient, model: str, n_clients: int) -> dict[str, Any]:
    # warm up with the largest requests first: the baseline RSS then already holds the allocator's working set
    await asyncio.gather(*(stream_chat(client, mixed_body(i, model, vision=False) | {"max_tokens": 64})
                           for i in range(40) if random.Random(i).choice([4, 16, 64, 200, 600]) == 600))
    base = await settle(client)
    rng = random.Random(5)

    async def disconnector(i: int) -> Sample:
        await asyncio.sleep(rng.random() * 0.5)
        body = mixed_body(i, model, vision=False) | {"max_tokens": 64}
        return await stream_chat(client, body, disconnect_after=rng.randint(1, 12))

    async def malformed(i: int) -> tuple[str, int]:
        name, payload = MALFORMED[i % len(MALFORMED)]
        if isinstance(payload, bytes):
            r = await client.post("/v1/chat/completions", content=payload,
                                  headers={"content-type": "application/json"})
        else:
            if isinstance(payload, dict) and "model" not in payload:
                payload = {**payload, "model": model}
            r = await client.post("/v1/chat/completions", json=payload)
        return name, r.status_code

    async def valid(i: int) -> Sample:
        return await stream_chat(client, mixed_body(10_000 + i, model, vision=False) | {"max_tokens": 8})

    drops = [asyncio.ensure_future(disconnector(i)) for i in range(n_clients)]
    bads = [asyncio.ensure_future(malformed(i)) for i in range(0, n_clients, 3)]
    goods = [asyncio.ensure_future(valid(i)) for i in range(0, n_clients, 5)]  # interleaved with the rest
    dropped, bad, ok = await asyncio.gather(asyncio.gather(*drops), asyncio.gather(*bads), asyncio.gather(*goods))
    after = await settle(client)
    health = (await client.get("/health/ready", timeout=30)).status_code
    return {
        "disconnecting_clients": n_clients,
        "disconnected_mid_stream": sum(1 for s in dropped if s.disconnected),
        "malformed": len(bad), "malformed_statuses": sorted({c for _, c in bad}),
        "malformed_not_4xx": [f"{n}: {c}" for n, c in bad if not 400 <= c < 500],
        "valid": len(ok), "valid_ok": sum(1 for s in ok if s.done and not s.error),
        "health_ready": health, "kv_blocks_used_before": base.get("kv_blocks_used"),
        "kv_blocks_used_after": after.get("kv_blocks_used"), "in_flight_after": after.get("in_flight"),
        "rss_before": base.get("rss_bytes"), "rss_after": after.get("rss_bytes"),
    }


async def run_sigterm(server: Server, model: str, streams: int, tokens: int) -> dict[str, Any]:
    assert server.process is not None, "--sigterm needs a server this script started"
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        body = {"model": model, "messages": [{"role": "user", "content": "write a long story"}], "temperature": 0.0,
                "max_tokens": tokens, "ignore_eos": True}
        tasks = [asyncio.create_task(stream_chat(client, body)) for _ in range(streams)]
        while not all(t.done() for t in tasks):  # wait until every stream has a token
            stats = await engine_stats(client)
            if stats.get("running", 0) >= streams or stats.get("tokens_generated", 0) > streams * 2:
                break
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        samples = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    rc = await asyncio.to_thread(server.process.wait, 60)
    return {"streams": streams, "ended_s": time.monotonic() - t0, "exit_code": rc,
            "finished": sum(1 for s in samples if s.done and not s.error),
            "clean_error_event": sum(1 for s in samples if s.done and s.error),
            "cut_without_event": sum(1 for s in samples if not s.done)}


async def versus_round(server: Server, tokens: int) -> dict[str, Any]:
    """One server's 1-stream and 8-stream decode over `/v1/completions` (a warm-up request first)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
        model = (await client.get("/v1/models", timeout=30)).json()["data"][0]["id"]
        await decode_throughput(client, model, 1, 4, text=True)  # warm-up: weights paged in, kernels packed
        one = await decode_throughput(client, model, 1, tokens, text=True)
        eight = await decode_throughput(client, model, 8, tokens, text=True)
    return {"one": one, "eight": eight}


def run_versus(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Ours and llama-server back to back on the same GGUF, same prompts, same protocol; `--repeat` alternating
    rounds. -> per-round tok/s and the ratios (ours / llama-server) of the medians."""
    rounds: dict[str, list[dict[str, Any]]] = {"llama-server": [], "autoglm": []}
    order = ["llama-server", "autoglm"]
    for r in range(args.repeat):
        for label in order if r % 2 == 0 else order[::-1]:
            if label == "llama-server":
                server = start_llama_server(args.llama_server, args.model, args.threads, 8, args.llama_ctx, log_dir)
            else:
                server = start_server(args.model, ["--max-num-seqs", "8", *args.server_arg], {}, args.threads,
                                      log_dir)
            try:
                rounds[label].append(asyncio.run(versus_round(server, args.decode_tokens)))
            finally:
                server.stop()

    def median(label: str, key: str) -> float:
        v = sorted(x[key]["tok_per_s"] for x in rounds[label])
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    table = {key: {"llama_server": median("llama-server", key), "autoglm": median("autoglm", key)}
             for key in ("one", "eight")}
    for row in table.values():
        row["ratio"] = row["autoglm"] / row["llama_server"]
    errors = sum(x[k]["errors"] for rs in rounds.values() for x in rs for k in ("one", "eight"))
    return {"model": args.model, "threads": args.threads, "rounds": rounds, "table": table, "errors": errors}


def print_versus(v: dict[str, Any]) -> None:
    print(f"\n{Path(v['model']).name}, {v['threads']} threads, median of {len(v['rounds']['autoglm'])} rounds "
          "(tok/s after each stream's first token)", file=sys.stderr)
    print("| streams | llama-server | autoglm | autoglm / llama-server | per round (llama-server ; autoglm) |",
          file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for key, n in (("one", 1), ("eight", 8)):
        row = v["table"][key]
        per = " ; ".join(" / ".join(f"{x[key]['tok_per_s']:.1f}" for x in v["rounds"][lab])
                         for lab in ("llama-server", "autoglm"))
        print(f"| {n} | {row['llama_server']:.1f} | {row['autoglm']:.1f} | {row['ratio']:.2f}x | {per} |",
              file=sys.stderr)


# --- main ----------------------------------------------------------------------------------------------------------
async def served_model(client: httpx.AsyncClient) -> tuple[str, bool]:
    name = (await client.get("/v1/models", timeout=30)).json()["data"][0]["id"]
    data = (await client.get("/status/data", timeout=30)).json()
    return name, bool(data.get("model", {}).get("vision"))


async def main_async(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"args": vars(args)}
    model_path = args.model
    if args.url is None and model_path is None:
        model_path = str(write_small_model(log_dir / "model", args.synthetic_hidden, args.synthetic_layers))
    common = ["--max-num-seqs", str(max(args.concurrency, 8))]

    def start(env: dict[str, str] | None = None) -> Server:
        if args.url:
            return Server(args.url)
        return start_server(model_path, common + list(args.server_arg), env or {}, args.threads, log_dir)

    if args.load or not (args.phone_agent or args.faults or args.sigterm):
        server = start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=args.max_seconds) as client:
                model, vision = await served_model(client)
                if args.requests > 0:
                    report["load"] = await run_load(client, model, vision, args.requests, args.concurrency)
                dt = (args.decode_tokens, args.ban_tokens, args.decode_completions)
                one = await decode_throughput(client, model, 1, *dt)
                eight = await decode_throughput(client, model, 8, *dt)
                report["decode"] = {"one": one, "eight": eight, "ratio": eight["tok_per_s"] / one["tok_per_s"]}
        finally:
            server.stop()
    if args.phone_agent:
        runs: dict[str, list[dict[str, Any]]] = {"prefix_on": [], "prefix_off": []}
        order = [("prefix_on", "1"), ("prefix_off", "0")]
        for r in range(args.repeat):  # alternate on/off so that machine noise hits both alike
            for label, flag in order if r % 2 == 0 else order[::-1]:
                server = start({"AUTOGLM_ENABLE_PREFIX_CACHING": flag})
                try:
                    async with httpx.AsyncClient(base_url=server.url, timeout=args.max_seconds) as client:
                        model, _ = await served_model(client)
                        await stream_chat(client, {"model": model, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "warm"}]})
                        runs[label].append(await run_phone_agent(client, model, args.devices, args.steps))
                finally:
                    server.stop()
        pa: dict[str, Any] = {}
        for label, rs in runs.items():
            pa[label] = {**rs[-1], "runs": len(rs), "ttft_mean_s": sum(x["ttft_mean_s"] for x in rs) / len(rs),
                         "ttft_p50_s": sum(x["ttft_p50_s"] or 0 for x in rs) / len(rs),
                         "errors": sum(x["errors"] for x in rs),
                         "kv_blocks_used_after": max(x["kv_blocks_used_after"] or 0 for x in rs)}
        pa["ttft_saving"] = 1 - pa["prefix_on"]["ttft_mean_s"] / pa["prefix_off"]["ttft_mean_s"]
        report["phone_agent"] = pa
    if args.faults:
        server = start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=args.max_seconds) as client:
                model, _ = await served_model(client)
                await stream_chat(client, {"model": model, "messages": [{"role": "user", "content": "warm"}],
                                           "max_tokens": 2})
                report["faults"] = await run_faults(client, model, args.fault_clients)
        finally:
            server.stop()
    if args.sigterm and not args.url:
        server = start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                model, _ = await served_model(client)
            report["sigterm"] = await run_sigterm(server, model, 8, 1000)
        finally:
            server.stop()
    return report


def checks(report: dict[str, Any]) -> list[str]:
    """Failed checks, as sentences."""
    bad = []
    if (load := report.get("load")) is not None:
        if load["errors"]:
            bad.append(f"load: {load['errors']} errors, e.g. {load['error_examples']}")
        if load["kv_blocks_used_after"]:
            bad.append(f"load: {load['kv_blocks_used_after']} KV blocks still used afterwards")
    if (f := report.get("faults")) is not None:
        if f["malformed_not_4xx"]:
            bad.append(f"faults: malformed requests not answered 4xx: {f['malformed_not_4xx']}")
        if f["health_ready"] != 200 or f["kv_blocks_used_after"] != f["kv_blocks_used_before"]:
            bad.append(f"faults: health {f['health_ready']}, KV blocks {f['kv_blocks_used_before']} -> "
                       f"{f['kv_blocks_used_after']}")
        if f["rss_before"] and f["rss_after"] and f["rss_after"] > 1.15 * f["rss_before"]:
            bad.append(f"faults: RSS grew from {f['rss_before'] >> 20} MiB to {f['rss_after'] >> 20} MiB")
        if f["valid_ok"] != f["valid"]:
            bad.append(f"faults: only {f['valid_ok']} of {f['valid']} valid requests completed")
    for label, pa in (report.get("phone_agent") or {}).items():
        if isinstance(pa, dict) and (pa["errors"] or pa["kv_blocks_used_after"]):
            bad.append(f"phone agent ({label}): {pa['errors']} errors, {pa['kv_blocks_used_after']} blocks used")
    # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is a clean exit too
    if (s := report.get("sigterm")) is not None and (s["cut_without_event"] or s["exit_code"] not in (0, -15)):
        bad.append(f"sigterm: {s}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model dir or .gguf for the server this script starts")
    p.add_argument("--synthetic-hidden", type=int, default=256, help="hidden size of the written model")
    p.add_argument("--synthetic-layers", type=int, default=4, help="layers of the written model")
    p.add_argument("--url", help="target an already running server instead (nothing is started)")
    p.add_argument("--load", action="store_true", help="run the load phase too when other modes are given")
    p.add_argument("--requests", type=int, default=256, help="requests of the load phase (0: throughput only)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--phone-agent", action="store_true")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2, help="phone agent: on/off server pairs (alternating order)")
    p.add_argument("--faults", action="store_true")
    p.add_argument("--fault-clients", type=int, default=100)
    p.add_argument("--sigterm", action="store_true")
    p.add_argument("--small", action="store_true", help="a quick run: 48 requests, 8 clients, 20 fault clients")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the server")
    p.add_argument("--server-arg", action="append", default=[], help="extra `autoglm serve` argument (repeat)")
    p.add_argument("--max-seconds", type=float, default=900.0, help="hard limit for the whole run")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--decode-completions", action="store_true", help="decode test on /v1/completions (raw prompt)")
    p.add_argument(
        "--ban-tokens",
        type=lambda v: [int(t) for t in v.split(",") if t],
        default=None,
        help="decode test: token ids given logit_bias -100 (for --url servers without ignore_eos), e.g. 1,106",
    )
    p.add_argument("--llama-server", metavar="BINARY",
                   help="versus mode: llama-server (-np 8 -t/-tb --threads) and ours back to back on --model, "
                        "1 and 8 streams on /v1/completions, --repeat alternating rounds; prints the ratio table")
    p.add_argument("--llama-ctx", type=int, default=8192, help="versus mode: llama-server -c")
    args = p.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        p.error("--url must be a loopback address")
    if args.small:
        args.requests, args.concurrency, args.fault_clients, args.steps, args.decode_tokens = 48, 8, 20, 2, 32
        args.repeat = 1
    if args.llama_server:
        if not args.model or args.url:
            p.error("--llama-server needs --model GGUF (and no --url)")
        with tempfile.TemporaryDirectory(prefix="autoglm-versus-") as tmp:
            v = run_versus(args, Path(tmp))
        print(json.dumps(v, indent=2))
        if args.json:
            args.json.write_text(json.dumps(v, indent=2))
        print_versus(v)
        return 1 if v["errors"] else 0
    with tempfile.TemporaryDirectory(prefix="autoglm-load-") as tmp:
        try:
            report = asyncio.run(asyncio.wait_for(main_async(args, Path(tmp)), args.max_seconds))
        except TimeoutError:
            print(f"load test: stopped after the --max-seconds limit ({args.max_seconds:.0f} s)", file=sys.stderr)
            return 1
    failed = checks(report)
    report["failed_checks"] = failed
    text = json.dumps(report, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    print(text)
    if args.json:
        args.json.write_text(text)
    for line in failed:
        print("FAILED:", line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
