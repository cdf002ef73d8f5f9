"""`autoglm bench MODEL`: load time, prefill tok/s, decode tok/s, TTFT, peak RSS (and llama.cpp beside us)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark load, prefill, decode, TTFT and peak RSS (optionally beside llama.cpp)",
        description="Each engine runs in its own child process (clean peak RSS), back to back, on the same random "
        "prompt ids with greedy decoding and EOS ignored. MODEL: HF directory or GGUF file (default: built-in model).",
    )
    p.add_argument("model", nargs="?", default=None, help="HF directory or GGUF file [the built-in default model]")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per request [512]")
    p.add_argument("--gen-len", type=int, default=128, help="generated tokens per request [128]")
    p.add_argument("--concurrency", type=int, default=1, help="requests run together as one batch [1]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads [autoglm --threads, else all cores]")
    p.add_argument("--quantization", choices=("int8", "int4"), default=None, help="HF path: quantize at load")
    p.add_argument("--dtype", default="auto", help="HF path dtype: auto, float32, bfloat16, float16 [auto]")
    p.add_argument("--runs", type=int, default=1, help="timed runs per engine; best is reported [1]")
    p.add_argument("--deterministic", action="store_true", help="batch-invariant kernels (EngineConfig.deterministic)")
    p.add_argument("--compare-llamacpp", action="store_true", help="also run llama-cpp-python on the same GGUF")
    p.add_argument("--inline", action="store_true", help="run in this process (faster start; RSS then shared)")
    p.add_argument("--json", dest="json_out", default=None, help="write results as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoglm.bench import (
        BenchConfig,
        bench_autoglm,
        bench_llamacpp,
        measure_read_bandwidth,
        ratios,
        render_table,
        run_isolated,
    )
    from autoglm.errors import InvalidRequest

    model = args.model
    if model is None:
        from autoglm.builtins import default_model_path

        model = str(default_model_path())
    for name in ("prompt_len", "gen_len", "concurrency", "runs"):
        if getattr(args, name) < 1:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be >= 1", param=name)
    if args.compare_llamacpp:
        from autoglm.loader import is_gguf

        if not is_gguf(model):
            raise InvalidRequest(f"--compare-llamacpp needs a GGUF file; {model} is not one", param="model")
    threads = args.threads if args.threads is not None else getattr(args, "global_threads", None)
    cfg = BenchConfig(
        model=str(model), prompt_len=args.prompt_len, gen_len=args.gen_len, concurrency=args.concurrency,
        threads=threads, quantization=args.quantization, dtype=args.dtype, runs=args.runs,
        deterministic=args.deterministic, cpu_isa=getattr(args, "cpu_isa", None),
    )  # fmt: skip
    results = []
    if args.inline:
        results.append(bench_autoglm(cfg))
        if args.compare_llamacpp:
            results.append(bench_llamacpp(cfg))
        bw = measure_read_bandwidth(256 << 20)
        for r in results:
            r.read_bandwidth_gbs = bw
    else:
        results.append(run_isolated("autoglm", cfg))
        if args.compare_llamacpp:
            results.append(run_isolated("llama.cpp", cfg))
    print(render_table(results))
    if args.json_out:
        data = {"results": [r.to_dict() for r in results], "ratios": ratios(results)}
        Path(args.json_out).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return 0
