"""`autoglm plan MODEL --ram 8GB --ctx 4096 [--quantization ...]`: will it fit, and what to change if not."""

from __future__ import annotations

import argparse
import json
from typing import Any

QUANTIZATIONS = ("none", "int8", "int4", "q8_0", "q4_k_m")  # mirrors autoglm.tools.plan.QUANTIZATIONS (kept torch-free)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="memory plan: bytes per module, KV cache, fits or not in --ram",
        description="Estimate memory from config.json / GGUF metadata alone (no weights read). MODEL: an HF "
        "directory, a config.json, a GGUF file, or a built-in name (autoglm-phone-9b).",
    )
    p.add_argument("model", help="HF directory, config.json, GGUF file, or autoglm-phone-9b")
    p.add_argument("--ram", default="8GB", help="memory budget, e.g. 8GB, 6.5GiB, 512MB (binary units) [8GB]")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens [4096]")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="weight format to plan for [none]")
    p.add_argument(
        "--kv-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="KV cache dtype [the model's dtype; float32 for GGUF, as the engine's cache]",
    )
    p.add_argument("--no-vision", action="store_true", help="plan without the vision tower")
    p.add_argument("--mmproj", default=None, help="GGUF vision projector file to include")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size used for the activation estimate")
    p.add_argument(
        "--image",
        type=image_size,
        default=None,
        metavar="WxH",
        help="plan one image of this size, e.g. 1080x2400 [the largest the model's image processor allows]",
    )
    p.add_argument("--json", dest="json_out", default=None, help="write the plan as JSON to this file ('-': stdout)")
    p.set_defaults(func=run)


def image_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1080x2400; got {text!r}")
    return int(w), int(h)


def run(args: argparse.Namespace) -> int:
    from autoglm.tools.plan import plan_model

    kwargs: dict[str, Any] = dict(
        ctx=args.ctx,
        ram=args.ram,
        quantization=args.quantization,
        kv_dtype=args.kv_dtype,
        no_vision=args.no_vision,
        chunk=args.chunk,
    )
    if args.mmproj:
        kwargs["mmproj"] = args.mmproj
    if args.image:
        kwargs["image_size"] = args.image
    plan = plan_model(args.model, **kwargs)
    if args.json_out == "-":
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print(plan.render())
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(plan.to_dict(), f, indent=2)
    return 0
