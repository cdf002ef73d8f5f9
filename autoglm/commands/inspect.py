"""`autoglm inspect MODEL`: architecture, modules, parameters, bytes and dtype per module (LoadedModel.modules)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show a model's architecture and modules",
        description="Load MODEL (HF directory or .gguf, default: the built-in model) and print its architecture, "
        "modules, parameters, bytes and storage types.",
    )
    p.add_argument("model", nargs="?", help="model directory or .gguf file")
    p.add_argument("--mmproj", help="GGUF vision projector")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-vision", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def describe(model: Any) -> dict[str, Any]:
    """A JSON-able summary of a LoadedModel."""
    tok = model.tokenizer
    return {
        "name": model.name,
        "path": model.path,
        "architecture": model.architecture,
        "max_model_len": model.max_model_len,
        "vocab_size": getattr(model.decoder, "vocab_size", None),
        "tokenizer_vocab_size": getattr(tok, "vocab_size", None),
        "uses_mrope": bool(getattr(model.decoder, "uses_mrope", False)),
        "eos_token_ids": list(model.eos_token_ids),
        "generation_defaults": dict(model.generation_defaults),
        "chat_template": _template_truth(model),
        "encoders": sorted(model.encoders),
        "missing_projector": model.missing_projector,
        "modules": [
            {
                "name": m.name,
                "path": m.path,
                "format": m.format,
                "quantization": m.quantization,
                "device": m.device,
                "kernels": m.kernels,
                "parameters": m.parameters,
                "bytes": m.bytes,
                "load_seconds": round(m.load_seconds, 3),
                "bytes_by_type": dict(m.bytes_by_type),
            }
            for m in model.modules
        ],
    }


def _template_truth(model: Any) -> str:
    """The same decision the server makes (choose_chat_template), as its one-line description."""
    from autoglm.tokenizer.builtin_templates import choose_chat_template

    return choose_chat_template(model).describe()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run(args: argparse.Namespace) -> int:
    from autoglm.loader import load_model

    model = load_model(args.model, mmproj=args.mmproj, dtype=args.dtype, no_vision=args.no_vision,
                       cpu_isa=getattr(args, "cpu_isa", None))
    info = describe(model)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout.write
    out(f"model:         {info['name']}  ({info['path']})\n")
    out(f"architecture:  {info['architecture']}{'  (M-RoPE)' if info['uses_mrope'] else ''}\n")
    out(f"context:       {info['max_model_len']} tokens; vocab {info['vocab_size']} "
        f"(tokenizer {info['tokenizer_vocab_size']})\n")
    out(f"chat template: {info['chat_template']}\n")
    out(f"encoders:      {', '.join(info['encoders']) or '-'}\n")
    out(f"eos ids:       {info['eos_token_ids']}\n")
    if info["generation_defaults"]:
        out(f"defaults:      {json.dumps(info['generation_defaults'])}\n")
    if info["missing_projector"]:
        out(f"warning:       {info['missing_projector']}\n")
    out(f"\n{'module':<10} {'format':<12} {'dtype':<10} {'device':<8} {'kernels':<12} {'parameters':>14} "
        f"{'bytes':>12}  types\n")
    for m in info["modules"]:
        types = ", ".join(f"{k} {_human(v)}" for k, v in sorted(m["bytes_by_type"].items())) or "-"
        out(f"{m['name']:<10} {m['format']:<12} {m['quantization']:<10} {m['device']:<8} {m['kernels'] or '-':<12} "
            f"{m['parameters']:>14,} {_human(m['bytes']):>12}  {types}\n")
    total_p = sum(m["parameters"] for m in info["modules"])
    total_b = sum(m["bytes"] for m in info["modules"])
    out(f"{'total':<10} {'':<12} {'':<10} {'':<8} {total_p:>14,} {_human(total_b):>12}\n")
    return 0
