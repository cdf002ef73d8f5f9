"""`autoglm convert HF_DIR -o X.gguf [--mmproj-out mmproj-X.gguf] --outtype f32|f16|bf16|q8_0|q4_k_m`.

Writes the files llama.cpp's own converter writes (text model `glm4`, `llama`, `qwen2`, `qwen3`; for GLM-4.1V
also the `glm4v` vision projector with --mmproj-out), so `llama-server -m X.gguf --mmproj mmproj-X.gguf` and
`autoglm serve` both run them.
q4_k_m uses our K-quant quantizer with llama.cpp's Q4_K_M mixture; its mmproj is written Q8_0 (as published).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from autoglm.errors import AutoGLMError, InvalidRequest

# mirrors autoglm.gguf.writer.OUTTYPES (a test checks): importing the writer here would load torch for --help
OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_k_m")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `autoglm convert` to the CLI."""
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face directory (GLM-4/4.1V, Llama, Qwen2, Qwen3) to GGUF (+ mmproj for GLM-4.1V)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("-o", "--outfile", required=True, help="text model .gguf to write")
    p.add_argument("--mmproj-out", default=None, help="also write the vision projector to this .gguf (GLM-4.1V)")
    p.add_argument("--outtype", type=str.lower, choices=OUTTYPES, default="f16", help="weight type (default f16)")
    p.add_argument("--name", default=None, help="general.name to record (default: from the model card / dir name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoglm.gguf.writer import convert_mmproj, convert_text

    progress = not args.no_progress
    try:
        src = Path(args.hf_dir).resolve()
        for out_path in filter(None, (args.outfile, args.mmproj_out)):
            dst = Path(out_path).resolve()
            if dst.is_dir():
                raise InvalidRequest(f"{out_path}: is a directory; give the .gguf file to write", param="outfile")
            if dst == src or (src in dst.parents and dst.exists()):  # would overwrite a file being read
                raise InvalidRequest(f"{out_path}: is an existing file inside the input checkpoint {args.hf_dir}; "
                                     "write to a new name", param="outfile")
        if args.mmproj_out:
            _check_has_vision(args.hf_dir)  # before the text file is written, not after
        t0 = time.perf_counter()
        out = convert_text(args.hf_dir, args.outfile, outtype=args.outtype, model_name=args.name, progress=progress)
        print(f"{out}: {args.outtype} text model, {Path(out).stat().st_size / 2**20:.1f} MiB "
              f"in {time.perf_counter() - t0:.1f}s")
        if args.mmproj_out:
            t0 = time.perf_counter()
            mm = convert_mmproj(args.hf_dir, args.mmproj_out, outtype=args.outtype, model_name=args.name,
                                progress=progress)
            print(f"{mm}: mmproj (glm4v), {Path(mm).stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f}s")
    except AutoGLMError as e:
        print(f"autoglm convert: error: {e.message}", file=sys.stderr)
        return 1
    return 0


def _check_has_vision(hf_dir: str) -> None:
    import json

    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # convert_text reports the unreadable config with its own message
    if isinstance(config, dict) and not isinstance(config.get("vision_config"), dict):
        raise InvalidRequest(f"{hf_dir}: --mmproj-out given, but the checkpoint has no vision tower (no "
                             "vision_config in config.json)", param="mmproj_out")
