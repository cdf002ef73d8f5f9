"""The phone-agent step as a benchmark: ours vs llama-server on the same GLM-4.1V-architecture model (outside CI).

    flock /tmp/autoglm-bench.lock python benchmarks/phone_agent.py [--preset synthetic|tiny] [--work DIR]
        [--image-max-tokens N] [--gen-tokens 16] [--llama-server PATH] [--json OUT] [--weights f32|q8_0]

Four Open-AutoGLM-style steps (benchmarks/phone_agent_request.py: ~3,500-character system prompt, one new
1080x2400 PNG per step, history without old screenshots). Each side gets the same messages; per step we record time
to first token (wall clock, request sent -> first generated token), vision-encoder time, prompt tokens, tokens
served from the prefix cache and encoder-cache hits.
  ours: autoglm's LLM in this process on the HF checkpoint (f32), prefix caching on (as `autoglm serve` runs),
        the encoder cache at its default; vision time = the image encoder's `encode` (the tower + merger).
        `--weights q8_0`: both sides load the same llama.cpp-converted Q8_0 GGUF + Q8_0 mmproj instead (ours: the
        int8 kernels for the decoder and the tower's linears).
  llama-server: the llama.cpp-converted GGUF + mmproj (f32), `-t 2`, streamed /v1/chat/completions; prefix reuse
        = `timings.cache_n`; vision time = its log (`-lv 4`), "encoding mtmd batch" -> "decoding image batch 1/".
Random weights never emit a stop token on purpose: Open-AutoGLM sends `max_tokens` 3000, both sides here get
`--gen-tokens` (16) so the run measures the first token plus a short answer, not 3000 tokens of noise.
`--image-max-tokens` caps the image at N merged tokens on both sides (ours: preprocessor max_pixels = N*28*28;
llama-server: --image-max-tokens N); 0 keeps GLM-4.1V's own limit (a 1080x2400 screenshot -> 3354 tokens).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.phone_agent_model import make  # noqa: E402
from benchmarks.phone_agent_request import conversation, corpus, screenshot  # noqa: E402

STEPS = 4
LLAMA_SERVER = "/work/llamacpp/build-native/bin/llama-server"


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def set_image_cap(hf: Path, max_tokens: int) -> None:
    """Write the image-token cap into the checkpoint's preprocessor_config.json (0: GLM-4.1V's published limit)."""
    from tests.fixtures.models import PREPROCESSOR_CONFIG

    cfg = json.loads(json.dumps(PREPROCESSOR_CONFIG))
    if max_tokens:
        cfg["size"]["longest_edge"] = max_tokens * 28 * 28
    (hf / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def run_ours(hf: Path, shots: list[bytes], gen: int, gguf: tuple[Path, Path] | None = None,
             cap: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    import dataclasses

    import torch

    from autoglm.llm import LLM

    if gguf is None:
        llm = LLM(str(hf), dtype="float32", enable_prefix_caching=True, max_model_len=16384)
    else:
        llm = LLM(str(gguf[0]), mmproj=str(gguf[1]), enable_prefix_caching=True, max_model_len=16384)
    enc = llm.model.encoders["image"]
    if gguf is not None and cap:  # the HF side reads the cap from preprocessor_config.json (set_image_cap)
        enc.image_processor = dataclasses.replace(enc.image_processor, max_pixels=cap * 28 * 28)
    spent = {"encode": 0.0, "preprocess": 0.0}
    encode, preprocess = enc.encode, enc.preprocess

    def timed_encode(inputs: Any) -> Any:
        t = time.perf_counter()
        out = encode(inputs)
        spent["encode"] += time.perf_counter() - t
        return out

    def timed_preprocess(media: Any) -> Any:
        t = time.perf_counter()
        out = preprocess(media)
        spent["preprocess"] += time.perf_counter() - t
        return out

    enc.encode, enc.preprocess = timed_encode, timed_preprocess  # instance attributes: this LLM only
    # warm-up: a different tiny image and text, so nothing of it is a prefix or encoder hit for step 1
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    warm = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "warm up"}]}]  # fmt: skip
    for _ in llm.stream(warm, max_tokens=2, temperature=0.0, ignore_eos=True):
        pass
    rows = []
    for step in range(STEPS):
        msgs = conversation(step, shots)
        before = llm.engine.stats()
        spent.update(encode=0.0, preprocess=0.0)
        t0 = time.perf_counter()
        ttft = None
        usage: dict[str, int] = {}
        for d in llm.stream(msgs, max_tokens=gen, temperature=0.0, ignore_eos=True):
            if ttft is None and d.token_ids:
                ttft = time.perf_counter() - t0
            if d.usage:
                usage = d.usage
        total = time.perf_counter() - t0
        after = llm.engine.stats()
        rows.append({
            "step": step + 1, "ttft_s": ttft, "total_s": total, "vision_s": spent["encode"],
            "preprocess_s": spent["preprocess"], "prompt_tokens": usage.get("prompt_tokens"),
            "prefix_hit_tokens": after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"],
            "encoder_runs": after["encoder_runs"] - before["encoder_runs"],
            "encoder_cache_hits": after["encoder_cache_hits"] - before["encoder_cache_hits"],
            "load": _load(),
        })  # fmt: skip
        print("ours", rows[-1], flush=True)
    import resource

    # peak RSS of this process (the llama-server side runs in a child, not counted): for `autoglm plan` vs reality
    rows.append({"torch_threads": torch.get_num_threads(),
                 "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    print("ours", rows[-1], flush=True)
    llm.close()
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I "


def _encode_seconds(log: str) -> list[float]:
    """Vision-encoder time per image from llama-server's log: "encoding mtmd batch" (clip starts) to "decoding
    image batch 1/" (clip done, the LLM decodes the image tokens). Stamps are M.SS.mmm.uuu since start."""

    def sec(m: re.Match[str]) -> float:
        mi, se, ms, us = (int(g) for g in m.groups())
        return mi * 60 + se + ms / 1e3 + us / 1e6

    starts = [sec(m) for m in re.finditer(_STAMP + r"slot process_mtmd", log)]
    ends = [sec(m) for m in re.finditer(_STAMP + r"decoding image batch 1/", log)]
    return [e - b for b, e in zip(starts, ends, strict=False)]


def run_llama(server: str, gguf: Path, mmproj: Path, shots: list[bytes], gen: int, cap: int,
              log: Path) -> list[dict[str, Any]]:  # fmt: skip
    port = _free_port()
    cmd = [server, "-m", str(gguf), "--mmproj", str(mmproj), "-t", "2", "-tb", "2", "-c", "16384", "-np", "1",
           "--port", str(port), "--jinja", "--no-webui", "-lv", "4"]  # fmt: skip  (-lv 4: mtmd timings)
    if cap:
        cmd += ["--image-max-tokens", str(cap)]
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(server).parent)}
    logf = log.open("w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # model load + warm-up; bounded
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy after 300 s; see {log}")
            time.sleep(0.5)
        rows = []
        for step in range(STEPS):
            seen = len(log.read_text(errors="replace"))
            body = {"messages": conversation(step, shots), "max_tokens": gen, "temperature": 0.0, "stream": True,
                    "cache_prompt": True}  # fmt: skip
            req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
            t0 = time.perf_counter()
            ttft = None
            timings: dict[str, Any] = {}
            with urllib.request.urlopen(req, timeout=600) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
                    if ttft is None and (delta.get("content") or delta.get("reasoning_content")):
                        ttft = time.perf_counter() - t0
                    timings = chunk.get("timings") or timings
            total = time.perf_counter() - t0
            time.sleep(0.2)  # let the log flush
            new = log.read_text(errors="replace")[seen:]
            enc_s = _encode_seconds(new)
            rows.append({
                "step": step + 1, "ttft_s": ttft, "total_s": total, "vision_s": sum(enc_s),
                "prompt_tokens": (timings.get("prompt_n") or 0) + (timings.get("cache_n") or 0),
                "prefix_hit_tokens": timings.get("cache_n"), "prompt_ms": timings.get("prompt_ms"),
                "encoder_runs": len(enc_s), "load": _load(),
            })  # fmt: skip
            print("llama-server", rows[-1], flush=True)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["synthetic", "tiny"], default="synthetic")
    ap.add_argument("--work", type=Path, default=Path("/tmp/phone"))
    ap.add_argument("--image-max-tokens", type=int, default=0)
    # GLM-4.1V's processor counts both temporal frames against max_pixels (a cap of N gives ~N/2 tokens), llama.cpp
    # counts tokens: pass the token count our side produced so both encode the same image size
    ap.add_argument("--llama-image-max-tokens", type=int, default=None)
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--llama-server", default=LLAMA_SERVER)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--weights", choices=["f32", "q8_0"], default="f32",
                    help="f32: ours on the HF checkpoint, llama-server on its f32 conversion; q8_0: both on one Q8_0 "
                         "GGUF + mmproj")  # fmt: skip
    a = ap.parse_args()
    out = a.work / a.preset
    hf, gguf, mmproj = make(out, a.preset, corpus(), a.weights)
    set_image_cap(hf, a.image_max_tokens)
    shots = [screenshot(k) for k in range(STEPS)]
    result: dict[str, Any] = {"preset": a.preset, "weights": a.weights, "image_max_tokens": a.image_max_tokens,
                              "gen_tokens": a.gen_tokens,
                              "uptime_before": _load()}  # fmt: skip
    if not a.skip_ours:
        result["ours"] = run_ours(hf, shots, a.gen_tokens, None if a.weights == "f32" else (gguf, mmproj),
                                  a.image_max_tokens)  # fmt: skip
    if not a.skip_llama:
        result["llama_server"] = run_llama(a.llama_server, gguf, mmproj, shots, a.gen_tokens,
                                           a.image_max_tokens if a.llama_image_max_tokens is None
                                           else a.llama_image_max_tokens, out / "llama-server.log")  # fmt: skip
    result["uptime_after"] = _load()
    if "ours" in result and "llama_server" in result:
        for o, ll in zip(result["ours"], result["llama_server"], strict=False):
            if o.get("ttft_s") and ll.get("ttft_s"):
                print(f"step {o['step']}: ttft ours/llama = {o['ttft_s'] / ll['ttft_s']:.2f}  "
                      f"vision ours/llama = {o['vision_s'] / ll['vision_s'] if ll['vision_s'] else float('nan'):.2f}")
    text = json.dumps(result, indent=1)
    if a.json:
        a.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
