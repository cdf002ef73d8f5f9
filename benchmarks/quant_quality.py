"""Quality of the HF-path weight-only quantization on the real model: the built-in gemma-3-270m GGUF is exported to a
float32 HF checkpoint, loaded in float32, int8 and int4, and scored on the golden prompts (tests/data/goldens).
Reports per-position top-1 agreement with float32 and each mode's greedy continuation.

    python benchmarks/quant_quality.py [--out benchmarks/quant_quality.json] [--gen 24]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from autoglm.builtins import builtin_path
from autoglm.gguf.export import export_hf
from autoglm.llm import LLM

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "quant_quality.json")
    ap.add_argument("--gen", type=int, default=24)
    args = ap.parse_args()
    prompts = json.loads((ROOT / "tests/data/goldens/gemma3_top1.json").read_text())["prompts"]
    with tempfile.TemporaryDirectory() as tmp:
        hf = export_hf(builtin_path("gemma-3-270m"), Path(tmp) / "gemma-f32")
        results: dict[str, dict[str, object]] = {}
        ref_top1: list[torch.Tensor] = []
        for mode in ("float32", "int8", "int4"):
            llm = LLM(hf, dtype="float32", quantization=None if mode == "float32" else mode)
            top1 = [llm.score(p["ids"]).argmax(-1) for p in prompts]
            if mode == "float32":
                ref_top1 = top1
            agree = sum(int((a == b).sum()) for a, b in zip(top1, ref_top1, strict=True))
            total = sum(t.numel() for t in ref_top1)
            greedy = [
                llm.generate(p["text"], max_tokens=args.gen, temperature=0, repetition_penalty=1.0).text
                for p in prompts[:3]
            ]
            results[mode] = {"top1_agreement": agree / total, "positions": total, "greedy": greedy}
            print(f"{mode:8s} top-1 agreement with float32: {agree}/{total} = {100 * agree / total:.2f}%", flush=True)
            del llm
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    for mode, r in results.items():
        print(f"\n[{mode}]")
        for g in r["greedy"]:  # type: ignore[union-attr]
            print("  ", repr(g))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
