"""Issue 15: decode/prefill of a real GGUF with the q8_K kernel (AUTOGLM_Q8K=1) vs our per-32 kernel and
llama.cpp (llama-cpp-python), threads 1 and 2, each engine in its own process with the DRAM read bandwidth measured
in that process (autoglm.bench); plus top-1 agreement with llama.cpp on teacher-forced real text. Outside CI.

    flock /tmp/autoglm-bench.lock python benchmarks/q8k_decode.py speed MODEL.gguf [--threads 1 2]
    flock /tmp/autoglm-bench.lock python benchmarks/q8k_decode.py agree MODEL.gguf [--tokens 500]
    python benchmarks/q8k_decode.py probe               # streaming-read GB/s at threads 1 and 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from autoglm.bench import BenchConfig, measure_read_bandwidth, render_table, run_isolated, set_threads

ROOT = Path(__file__).resolve().parents[1]


def speed(model: str, threads: list[int], prompt_len: int, gen_len: int) -> list[dict]:
    rows = []
    for t in threads:
        cfg = BenchConfig(model=model, prompt_len=prompt_len, gen_len=gen_len, threads=t)
        res = {"llama.cpp": run_isolated("llamacpp", cfg)}
        for name, flag in (("autoglm-q8_32", "0"), ("autoglm-q8_K", "1")):
            os.environ["AUTOGLM_Q8K"] = flag  # read by the spawned child's CpuKernels
            res[name] = run_isolated("autoglm", cfg)
        os.environ.pop("AUTOGLM_Q8K", None)
        lc = res["llama.cpp"]
        for name, r in res.items():
            bound = res["autoglm-q8_K"].weight_bytes and r.read_bandwidth_gbs * 1e9 / res["autoglm-q8_K"].weight_bytes
            rows.append({"threads": t, "engine": name, "decode_tok_s": r.decode_tok_s, "prefill_tok_s": r.prefill_tok_s,
                         "decode_vs_llamacpp": r.decode_tok_s / lc.decode_tok_s,
                         "prefill_vs_llamacpp": r.prefill_tok_s / lc.prefill_tok_s,
                         "bandwidth_gbs": r.read_bandwidth_gbs, "bound_tok_s": bound,
                         "pct_of_bound": 100 * r.decode_tok_s / bound if bound else None,
                         "peak_rss_mib": r.peak_rss_bytes / 2**20, "weight_bytes": r.weight_bytes})
            print(render_table([r]).splitlines()[1])
    return rows


def agree(model: str, n: int) -> dict:
    """Top-1 agreement on `n` teacher-forced README tokens; ours in prefill chunks of 8 (the decode GEMV path)."""
    import llama_cpp
    import numpy as np

    from autoglm.llm import LLM

    text = (ROOT / "README.md").read_text() * 4
    out: dict = {}
    ids = None
    for name, flag in (("q8_K", "1"), ("q8_32", "0")):
        os.environ["AUTOGLM_Q8K"] = flag
        llm = LLM(model, max_num_batched_tokens=8, max_model_len=n + 64)
        if ids is None:
            ids = llm.model.tokenizer.encode(text, add_special_tokens=False)[:n]
        out[name] = llm.score(ids).argmax(-1).numpy()
        llm.close()
    ref = llama_cpp.Llama(model_path=model, n_ctx=n + 64, logits_all=True, verbose=False, n_threads=2)
    ref.eval(ids)
    theirs = np.array(ref.scores[:n]).argmax(-1)
    return {"tokens": n, **{f"top1_{k}": float((v == theirs).mean()) for k, v in out.items()}}


def probe() -> dict:
    return {f"threads_{t}_gbs": (set_threads(t), measure_read_bandwidth())[1] for t in (1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("speed", "agree", "probe"))
    ap.add_argument("model", nargs="?")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=500)
    a = ap.parse_args()
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if a.mode == "speed":
        result: object = speed(a.model, a.threads, a.prompt_len, a.gen_len)
    elif a.mode == "agree":
        result = agree(a.model, a.tokens)
    else:
        result = probe()
    print(json.dumps({"uptime_before": up, "result": result}, indent=1))


if __name__ == "__main__":
    main()
