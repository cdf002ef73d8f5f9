"""Microbenchmark of the CPU matmul paths for weight-only quantization (the measurements behind autoglm.quant).

    python benchmarks/quant_kernels.py [--threads 2] [--n 4096] [--k 4096] [--rows 1,8,32,128,512]

For each batch size (rows): float32 and bfloat16 F.linear, `_weight_int8pack_mm` (float32 and bfloat16
activations), int8 -> bfloat16 + GEMM (our prefill path), `_weight_int4pack_mm_for_cpu` at group 32/64/128
(bfloat16 activations) and `_dyn_quant_matmul_4bit` (x86: a scalar reference kernel). Prints ms per call and the
effective weight-read GB/s; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))


def timed(fn: Callable[[], object], budget_s: float = 1.0, max_iters: int = 200) -> float:
    fn()
    t = time.perf_counter()
    fn()
    once = time.perf_counter() - t
    iters = max(1, min(max_iters, int(budget_s / max(once, 1e-6))))
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def _cases(
    x: torch.Tensor,
    xb: torch.Tensor,
    w: torch.Tensor,
    wb: torch.Tensor,
    q8: torch.Tensor,
    s8: torch.Tensor,
    s8b: torch.Tensor,
    packed4: dict[int, tuple[torch.Tensor, torch.Tensor]],
    dyn: torch.Tensor,
    *,
    with_scalar: bool,
) -> dict[str, tuple[Callable[[], object], int]]:
    n, k = w.shape
    aten = torch.ops.aten
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "f32 linear": (lambda: F.linear(x, w), 4 * n * k),
        "bf16 linear": (lambda: F.linear(xb, wb), 2 * n * k),
        "int8pack bf16": (lambda: aten._weight_int8pack_mm(xb, q8, s8b), n * k),
        "int8->bf16 + gemm": (lambda: F.linear(xb, q8.to(torch.bfloat16)) * s8b, n * k),
    }
    for g, (p4, sz) in packed4.items():
        cases[f"int4pack g{g} bf16"] = (
            lambda p4=p4, sz=sz, g=g: aten._weight_int4pack_mm_for_cpu(xb, p4, g, sz.to(torch.bfloat16)),
            n * k // 2,
        )
    if with_scalar:  # scalar kernels: seconds per call at larger batches
        cases["int8pack f32"] = (lambda: aten._weight_int8pack_mm(x, q8, s8), n * k)
        cases["dyn_quant_4bit f32"] = (lambda: aten._dyn_quant_matmul_4bit(x, dyn, 32, k, n), n * k // 2)
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096, help="out_features")
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    ap.add_argument("--rows", default="1,8,32,128,512")
    ap.add_argument("--slow", action="store_true", help="also time the scalar paths at rows > 8 (minutes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, k = args.n, args.k
    from autoglm.layers.linear.int4 import quantize_int4, unpack_nibbles
    from autoglm.layers.linear.int8 import quantize_int8

    w = torch.randn(n, k) * 0.02
    wb = w.bfloat16()
    q8, s8 = quantize_int8(w)
    s8b = s8.bfloat16()
    packed4 = {}
    for g in (32, 64, 128):
        qw, sz = quantize_int4(w, g)
        packed4[g] = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qw), 1), sz)
    # _dyn_quant_matmul_4bit: symmetric int4 (q - 8) * scale, group 32, bfloat16 scales as the op asks for
    q4s = (torch.round(w / (w.abs().amax(1, keepdim=True) / 7)).clamp(-8, 7) + 8).to(torch.uint8)
    dyn_w = (q4s[:, 0::2] | (q4s[:, 1::2] << 4)).contiguous()
    dyn_scales = (w.reshape(n, k // 32, 32).abs().amax(-1) / 7).bfloat16()
    dyn = torch.ops.aten._dyn_quant_pack_4bit_weight(dyn_w, dyn_scales, None, 32, k, n)
    results: list[dict[str, object]] = []
    print(f"threads={args.threads} N={n} K={k}  (ms per call; GB/s = weight bytes / time)")
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, k)
        cases = _cases(x, x.bfloat16(), w, wb, q8, s8, s8b, packed4, dyn, with_scalar=rows <= 8 or args.slow)
        for name, (fn, nbytes) in cases.items():
            sec = timed(fn)
            results.append({"rows": rows, "path": name, "ms": sec * 1e3, "weight_gbs": nbytes / sec / 1e9})
            print(f"rows={rows:<4} {name:<22} {sec * 1e3:9.3f} ms  {nbytes / sec / 1e9:7.1f} GB/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"threads": args.threads, "n": n, "k": k, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
