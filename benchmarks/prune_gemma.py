"""Perplexity cost of MLP channel pruning on the real Gemma 3 270M (the built-in Q4_K_M GGUF) — the BENCHMARKS.md
"Pruning" table.

    python benchmarks/prune_gemma.py [--ratios 0.1 0.25] [--threads 2] [--out benchmarks/prune_gemma.json]

The GGUF is exported once to a float32 HF directory (`autoglm.gguf.export`, the GGUF loader's conventions),
then `prune_checkpoint` writes one pruned directory per ratio and criterion, and perplexity is measured on each
written directory loaded back through `load_hf`. Texts (offline, deterministic):
- calibration: the first half of the built-in sample (`autoglm.tools.prune.SAMPLE_TEXT`, what the CLI uses) plus
  CPython's reference-manual text on the execution model (`pydoc_data.topics`, shipped with Python);
- held-out "sample": the second half of the built-in sample (what `autoglm prune` reports);
- held-out "pydoc": other reference-manual topics (import system, compound statements, data model excerpts) —
  a longer text, so a steadier number.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_CALIB_TOPICS = ("execmodel",)
_EVAL_TOPICS = ("import", "compound", "customization", "exceptions")


def _texts(eval_chars: int) -> tuple[str, dict[str, str]]:
    from pydoc_data.topics import topics

    from autoglm.tools.prune import SAMPLE_TEXT

    half = len(SAMPLE_TEXT) // 2
    calib = SAMPLE_TEXT[:half] + "\n" + "\n".join(topics[t] for t in _CALIB_TOPICS)
    pydoc = "\n".join(topics[t] for t in _EVAL_TOPICS)[:eval_chars]
    return calib, {"sample": SAMPLE_TEXT[half:], "pydoc": pydoc}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF file or HF dir [the built-in gemma-3-270m Q4_K_M]")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25])
    ap.add_argument("--data-free", action="store_true", help="also prune with the data-free weight-norm criterion")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=256, help="tokens per scored window")
    ap.add_argument("--eval-chars", type=int, default=16000, help="characters of the pydoc held-out text")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "prune_gemma.json")
    args = ap.parse_args()

    import torch

    from autoglm.gguf.export import export_hf, is_gguf_file
    from autoglm.loader.hf import load_hf
    from autoglm.tools.prune import perplexity, prune_checkpoint, split_text

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = args.model
    if model is None:
        from autoglm.builtins import builtin_path

        model = str(builtin_path("gemma-3-270m"))
    calib, evals = _texts(args.eval_chars)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prune-gemma-") as tmp:
        src = Path(model)
        if is_gguf_file(src):
            t0 = time.perf_counter()
            src = export_hf(src, Path(tmp) / "float32")
            print(f"exported {model} -> float32 HF in {time.perf_counter() - t0:.1f}s", flush=True)

        def ppl_of(path: Path) -> dict[str, tuple[float, int]]:
            loaded = load_hf(path, dtype="float32")
            out = {}
            for name, text in evals.items():
                out[name] = perplexity(loaded.decoder, split_text(loaded.tokenizer.encode(text), args.window))
            return out

        base = ppl_of(src)
        print("original:", {k: round(v[0], 3) for k, v in base.items()}, flush=True)
        runs = [(r, True) for r in args.ratios] + ([(r, False) for r in args.ratios] if args.data_free else [])
        for ratio, with_data in runs:
            t0 = time.perf_counter()
            dst = Path(tmp) / f"pruned-{ratio}-{int(with_data)}"
            rep = prune_checkpoint(
                src, dst, ratio, calibration_text=calib if with_data else None, window=args.window, measure=False
            )
            seconds = time.perf_counter() - t0
            after = ppl_of(dst)
            row = {
                "ratio": ratio,
                "criterion": rep.criterion,
                "intermediate": [rep.intermediate_before, rep.intermediate_after],
                "parameters": [rep.parameters_before, rep.parameters_after],
                "prune_seconds": round(seconds, 1),
                **{f"ppl_{k}": [round(base[k][0], 3), round(after[k][0], 3), base[k][1]] for k in evals},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "model": model,
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "calibration_chars": len(calib),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("\n| ratio | criterion | intermediate | parameters | ppl sample (tokens) | ppl pydoc (tokens) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for k in evals:
            before, after, n = r[f"ppl_{k}"]
            cells.append(f"{before:.2f} → {after:.2f} ({100 * (after / before - 1):+.1f} %, {n})")
        crit = "calibration" if "calibration" in r["criterion"] else "data-free"
        i0, i1 = r["intermediate"]
        p0, p1 = r["parameters"]
        head = f"| {r['ratio']} | {crit} | {i0} → {i1} | {p0 / 1e6:.1f} M → {p1 / 1e6:.1f} M | "
        print(head + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
