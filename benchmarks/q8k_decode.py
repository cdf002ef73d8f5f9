"""Issue 15: decode/prefill of a real GGUF, ours (packed tiles; Q4_K / Q6_K on q8_K activations) vs llama.cpp
(llama-cpp-python), threads 1 and 2, each engine in its own process with the DRAM read bandwidth measured in that
process (autoglm.bench); plus top-1 agreement with llama.cpp on teacher-forced real text. Outside CI.

    flock /tmp/autoglm-bench.lock python benchmarks/q8k_decode.py speed MODEL.gguf [--threads 1 2]
    flock /tmp/autoglm-bench.lock python benchmarks/q8k_decode.py agree MODEL.gguf [--tokens 500] [--isa avx2]
    python benchmarks/q8k_decode.py probe               # streaming-read GB/s at threads 1 and 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from autoglm.bench import BenchConfig, measure_read_bandwidth, render_table, run_isolated, set_threads

ROOT = Path(__file__).resolve().parents[1]


def speed(model: str, threads: list[int], prompt_len: int, gen_len: int) -> list[dict]:
    rows = []
    for t in threads:
        cfg = BenchConfig(model=model, prompt_len=prompt_len, gen_len=gen_len, threads=t)
        res = {"llama.cpp": run_isolated("llamacpp", cfg), "autoglm": run_isolated("autoglm", cfg)}
        lc = res["llama.cpp"]
        for name, r in res.items():
            bound = res["autoglm"].weight_bytes and r.read_bandwidth_gbs * 1e9 / res["autoglm"].weight_bytes
            rows.append({"threads": t, "engine": name, "decode_tok_s": r.decode_tok_s, "prefill_tok_s": r.prefill_tok_s,
                         "decode_vs_llamacpp": r.decode_tok_s / lc.decode_tok_s,
                         "prefill_vs_llamacpp": r.prefill_tok_s / lc.prefill_tok_s,
                         "bandwidth_gbs": r.read_bandwidth_gbs, "bound_tok_s": bound,
                         "pct_of_bound": 100 * r.decode_tok_s / bound if bound else None,
                         "peak_rss_mib": r.peak_rss_bytes / 2**20, "weight_bytes": r.weight_bytes})
            print(render_table([r]).splitlines()[1])
    return rows


def agree(model: str, n: int, isa: str | None) -> dict:
    """Top-1 agreement with llama.cpp on `n` teacher-forced README tokens: ours in prefill chunks of 8 and of 512
    (both the packed kernel: q8_K activations for Q4_K / Q6_K, as llama.cpp), with our float32 KV cache and with a
    float16 one (llama.cpp's default)."""
    import llama_cpp
    import numpy as np

    from autoglm.llm import LLM

    text = (ROOT / "README.md").read_text() * 4
    runs: dict[str, np.ndarray] = {}
    ids = None
    for chunk, kv, exact in ((8, "auto", False), (8, "float16", False), (512, "auto", False), (512, "auto", True)):
        llm = LLM(model, cpu_isa=isa, max_num_batched_tokens=chunk, max_model_len=n + 64, kv_cache_dtype=kv)
        if ids is None:
            ids = llm.model.tokenizer.encode(text, add_special_tokens=False)[:n]
        mods = llm.model.decoder.modules()
        kernels = {m.impl for m in mods if hasattr(m, "impl") and hasattr(m.impl, "prefill_int8")}
        for k in kernels:  # exact: float32 activations on the dequantized weights (a reference, not a served path)
            k.prefill_int8 = not exact
        runs[f"chunk{chunk}_kv_{kv}" + ("_float_activations" if exact else "")] = llm.score(ids).float().numpy()
        for k in kernels:
            k.prefill_int8 = True
        llm.close()
    def llama_cpp_logits(**kw: object) -> np.ndarray:
        ref = llama_cpp.Llama(model_path=model, n_ctx=n + 64, logits_all=True, verbose=False, n_threads=2, **kw)
        ref.eval(ids)
        got = np.array(ref.scores[:n])
        ref.close()
        return got

    theirs = llama_cpp_logits()
    top = theirs.argmax(-1)
    # the metric's own noise floor: llama.cpp against itself with one setting changed (float32 KV; flash attention)
    controls = {"type_k_v_f32": llama_cpp_logits(type_k=0, type_v=0), "flash_attn": llama_cpp_logits(flash_attn=True)}
    out: dict = {"tokens": n, "isa": isa}
    for name, v in runs.items():
        miss = np.nonzero(v.argmax(-1) != top)[0]
        # how close llama.cpp's own logits are between its pick and ours where we differ (a near-tie is < ~0.1)
        gaps = theirs[miss, top[miss]] - theirs[miss, v.argmax(-1)[miss]]
        out[name] = {"top1": float(1 - len(miss) / n), "misses": int(len(miss)),
                     "median_gap_at_misses": float(np.median(gaps)) if len(miss) else None,
                     "median_max_abs_logit_diff": float(np.median(np.abs(v - theirs).max(-1)))}
    ref_f = runs["chunk512_kv_auto_float_activations"].argmax(-1)  # both engines against the float reference
    out["llama.cpp_vs_float_activations_top1"] = float((top == ref_f).mean())
    out["ours_int8_vs_float_activations_top1"] = float((runs["chunk512_kv_auto"].argmax(-1) == ref_f).mean())
    for name, v in controls.items():
        out[f"llama.cpp_vs_llama.cpp_{name}_top1"] = float((v.argmax(-1) == top).mean())
    srt = np.sort(runs["chunk512_kv_auto_float_activations"], -1)
    out["float_reference_positions_with_top2_gap_below_0.1"] = int((srt[:, -1] - srt[:, -2] < 0.1).sum())
    return out


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
    ap.add_argument("--isa", default=None, help="our CPU kernel variant for agree (default: the best this CPU runs)")
    a = ap.parse_args()
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if a.mode == "speed":
        result: object = speed(a.model, a.threads, a.prompt_len, a.gen_len)
    elif a.mode == "agree":
        result = agree(a.model, a.tokens, a.isa)
    else:
        result = probe()
    print(json.dumps({"uptime_before": up, "result": result}, indent=1))


if __name__ == "__main__":
    main()
