"""Run the BENCHMARKS.md table: every row through `autoglm bench` (one child process per engine), results as JSON and a
markdown table to paste.

    python benchmarks/run_all.py --synthetic DIR [--threads 2] [--runs 4] [--out benchmarks/results.json]

DIR is what `benchmarks/make_synthetic_glm4.py DIR` wrote. Rows: gemma-3-270m Q4_K_M (built-in default model) and the
synthetic GLM-4 1.5B at Q4_K_M and Q8_0, each beside llama.cpp; the synthetic HF checkpoint in float32, bfloat16,
int8 and int4 (our engine only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(model: str | None, extra: list[str], threads: int, runs: int, prompt: int, gen: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "autoglm.cli", "bench", *([model] if model else []),
               "--threads", str(threads), "--runs", str(runs), "--prompt-len", str(prompt), "--gen-len", str(gen),
               "--json", str(out), *extra]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=Path, default=None, help="output dir of make_synthetic_glm4.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = ap.parse_args()
    common = (args.threads, args.runs, args.prompt_len, args.gen_len)
    rows: dict[str, dict[str, object]] = {"gemma-3-270m Q4_K_M": bench(None, ["--compare-llamacpp"], *common)}
    if args.synthetic is not None:
        for t in ("q4_k_m", "q8_0"):
            gguf = args.synthetic / f"glm4-synthetic-{t}.gguf"
            rows[f"synthetic GLM-4 1.5B {t.upper()}"] = bench(str(gguf), ["--compare-llamacpp"], *common)
        hf = str(args.synthetic / "hf")
        for label, extra in (("float32", ["--dtype", "float32"]), ("bfloat16", ["--dtype", "bfloat16"]),
                             ("int8", ["--dtype", "float32", "--quantization", "int8"]),
                             ("int4", ["--dtype", "float32", "--quantization", "int4"])):  # fmt: skip
            rows[f"synthetic GLM-4 1.5B HF {label}"] = bench(hf, extra, *common)
    args.out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n| model | engine | load s | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB | decode bound tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, data in rows.items():
        for r in data["results"]:  # type: ignore[index]
            bound = r["decode_bound_tok_s"]
            print(
                f"| {name} | {r['engine']} | {r['load_s']:.2f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} "
                f"| {r['ttft_s'] * 1e3:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | {bound:.1f} |"
            )
        if data["ratios"]:  # type: ignore[index]
            q = data["ratios"]  # type: ignore[index]
            print(f"| {name} | ratio | | {q['prefill']:.2f}x | {q['decode']:.2f}x | | {q['peak_rss']:.2f}x | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
