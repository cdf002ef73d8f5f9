"""`autoglm prune MODEL --ratio R -o OUT`: remove the least important MLP channels, write a loadable checkpoint,
report the perplexity change on held-out text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prune",
        help="channel-prune the MLPs of an HF checkpoint or GGUF file (same count per layer)",
        description="Remove the least important MLP intermediate channels (activation-weighted magnitude on "
        "calibration text; data-free weight norms without a tokenizer) and write an HF checkpoint. A GGUF input is "
        "dequantized to float32 first (Gemma 3, GLM-4); the output is an HF safetensors directory either way.",
    )
    p.add_argument(
        "model", nargs="?", default=None, help="HF model directory (float weights) or GGUF file [the built-in model]"
    )
    p.add_argument("--ratio", type=float, required=True, help="fraction of MLP channels to remove, e.g. 0.25")
    p.add_argument("-o", "--output", required=True, help="output directory (new)")
    p.add_argument("--calibration", default=None, help="text file to score channels on [built-in sample, 1st half]")
    p.add_argument(
        "--eval", dest="eval_file", default=None, help="held-out text file for perplexity [sample, 2nd half]"
    )
    p.add_argument("--multiple-of", type=int, default=32, help="keep the intermediate size a multiple of this [32]")
    p.add_argument("--window", type=int, default=256, help="tokens per scored window [256]")
    p.add_argument("--json", dest="json_out", default=None, help="write the report as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from autoglm.tools.prune import SAMPLE_TEXT, prune_checkpoint

    torch.set_grad_enabled(False)
    model = args.model
    if model is None:
        from autoglm.builtins import default_model_path

        model = str(default_model_path())
    half = len(SAMPLE_TEXT) // 2
    calib = Path(args.calibration).read_text(encoding="utf-8") if args.calibration else SAMPLE_TEXT[:half]
    evals = Path(args.eval_file).read_text(encoding="utf-8") if args.eval_file else SAMPLE_TEXT[half:]
    report = prune_checkpoint(
        model,
        args.output,
        args.ratio,
        calibration_text=calib,
        eval_text=evals,
        window=args.window,
        multiple_of=args.multiple_of,
    )
    print(report.render())
    print(f"wrote {args.output}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    return 0
