"""`autoglm plan` against reality (issue 15 item 5): predicted vs measured peak RSS of one generation at a context.

    python benchmarks/plan_check.py MODEL.gguf|HF_DIR [...] [--ctx 4096] [--gen 32] [--json out.json]
    python benchmarks/plan_check.py GLM4V_HF_DIR --image 1080x2400 [--ctx 16384]   # one image through the tower

Each model runs in its own fresh child process: `Engine` with a KV pool of exactly `--ctx` tokens (what the plan
prices), `max_num_seqs` 1, prefill chunks of `--chunk`, one prompt of ctx - gen tokens and `--gen` generated
tokens; the child reports `ru_maxrss` (peak resident set, the number a machine's RAM must hold). The plan is
`autoglm.tools.plan.plan_model(MODEL, ctx=, chunk=, kv_dtype=<the engine's cache dtype>)`, computed in the parent.
With `--image WxH` the model keeps its vision tower and the requests are two chat messages, each with its own WxH
PNG (random pixels: the largest encoded file) and a line of text, through `LLM.chat` on the same engine config (the
second finds every weight resident); the plan prices that image.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def measure(model: str, ctx: int, gen: int, chunk: int) -> dict[str, float | str]:
    """In this process (the child): load, generate once, report peak RSS and the engine's KV cache dtype."""
    import torch

    from autoglm.config import EngineConfig
    from autoglm.engine.engine import Engine
    from autoglm.engine.memory import plan_kv_cache
    from autoglm.engine.prompt import PromptInputs
    from autoglm.engine.sampling_params import SamplingParams
    from autoglm.loader import load_model

    torch.set_grad_enabled(False)
    loaded = load_model(model, no_vision=True)
    config = EngineConfig(max_model_len=ctx, max_num_seqs=1, max_num_batched_tokens=chunk, num_kv_blocks=ctx // 16,
                          block_size=16)
    cache_dtype = str(plan_kv_cache(loaded, config, ctx).cache_dtype).removeprefix("torch.")
    engine = Engine(loaded, config)
    vocab = loaded.decoder.vocab_size
    ids = torch.randint(100, min(vocab, 100000), (ctx - gen,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("r", PromptInputs(token_ids=ids), SamplingParams(max_tokens=gen, temperature=0.0,
                                                                         ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.close()
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kv_dtype": cache_dtype}


def measure_image(model: str, ctx: int, gen: int, chunk: int, size: tuple[int, int]) -> dict[str, float | str]:
    """In the child: load with the vision tower, one chat request with a `size` PNG, report peak RSS."""
    import base64
    import io

    import numpy as np
    import torch
    from PIL import Image

    from autoglm.engine.memory import plan_kv_cache
    from autoglm.llm import LLM

    torch.set_grad_enabled(False)
    llm = LLM(model, max_model_len=ctx, max_num_seqs=1, max_num_batched_tokens=chunk, num_kv_blocks=ctx // 16,
              block_size=16)
    # two requests, two different images: the first pages in mmap-ed weights as it reaches them (a checkpoint in
    # the load dtype is not copied), so only the second has every weight resident beside the image's working set
    for seed in (0, 1):
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        del pixels
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        del buf
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is on the screen?"}]}]  # fmt: skip
        out = llm.chat(msgs, max_tokens=gen, temperature=0.0, ignore_eos=True)
        del msgs, url
    cache_dtype = str(plan_kv_cache(llm.model, llm.config, ctx).cache_dtype).removeprefix("torch.")
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kv_dtype": cache_dtype,
            "prompt_tokens": out.usage["prompt_tokens"]}


def image_arg(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--image", type=image_arg, default=None, metavar="WxH")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.image:
            print(json.dumps(measure_image(args.models[0], args.ctx, args.gen, args.chunk, args.image)))
        else:
            print(json.dumps(measure(args.models[0], args.ctx, args.gen, args.chunk)))
        return
    from autoglm.tools.plan import plan_model

    rows = []
    for m in args.models:
        image = ["--image", "{}x{}".format(*args.image)] if args.image else []
        out = subprocess.run([sys.executable, __file__, m, "--child", "--ctx", str(args.ctx), "--gen", str(args.gen),
                              "--chunk", str(args.chunk), *image], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        extra = {"image_size": args.image, "no_vision": False} if args.image else {}
        plan = plan_model(m, ctx=args.ctx, chunk=args.chunk, kv_dtype=got["kv_dtype"], ram="64GB", **extra)
        rows.append({"model": Path(m).name, "ctx": args.ctx, "kv_dtype": got["kv_dtype"],
                     "predicted_mib": plan.total_bytes / 2**20, "measured_mib": got["peak_rss_bytes"] / 2**20,
                     "weights_mib": plan.weight_bytes / 2**20, "image_mib": plan.image_bytes / 2**20,
                     "kv_mib": plan.kv_bytes / 2**20, "runtime_mib": plan.overhead_bytes / 2**20})
        rows[-1]["measured_over_predicted"] = rows[-1]["measured_mib"] / rows[-1]["predicted_mib"]
    print("| model | ctx | KV dtype | predicted MiB (weights / KV / runtime / image) | measured peak RSS MiB "
          "| measured / predicted |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ctx']} | {r['kv_dtype']} | {r['predicted_mib']:.0f} ({r['weights_mib']:.0f} / "
              f"{r['kv_mib']:.0f} / {r['runtime_mib']:.0f} / {r['image_mib']:.0f}) | {r['measured_mib']:.0f} | "
              f"{r['measured_over_predicted']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
