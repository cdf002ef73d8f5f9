"""GGUF matmul candidates on realistic shapes: which path should `GGUFLinear.forward` take for decode and prefill?

    python benchmarks/kernels.py [--threads 2] [--reps 7] [--tokens 1,512] [--big] [--json out.json]
    python benchmarks/kernels.py --model [PATH.gguf] [--threads 1] [--gen 64] [--prompt 512]   # whole-model decode

Weights are random GGUF blocks (valid fp16 scales); every timing is the min over `--reps` runs, all candidates of a
shape measured back to back in one process (the machine is shared: compare only within a run). Candidates:
- ref:        GGUFBlockFormat.matmul, the reference kernels (dequantize per call in torch ops, float32 GEMM)
- vnni:       fused C++ kernel, int8 activations per 32 (AVX512-VNNI), the decode path
- float_act:  fused C++ kernel, row dequantized in L1, float32 activations (the non-VNNI fallback)
- deq_f32:    C++ dequantize once + float32 GEMM (prefill path); deq_bf16: same in bfloat16
- int4pack:   torch `_weight_int4pack_mm_for_cpu` on a repacked Q4_K (bf16 activations; group 32)
- int8pack:   torch `_weight_int8pack_mm` (per-channel int8: NOT Q8_0's per-32 scales; speed reference only)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

from autoglm.kernels.cpu import cpu_kernels
from autoglm.kernels.cpu.ops import CpuKernels
from autoglm.layers.linear.gguf import GGUFBlockFormat

Q = GGMLQuantizationType
GEMMA_SHAPES = [(2048, 640), (640, 2048), (262144, 640)]  # (rows=out, cols=in)
BIG_SHAPES = [(4096, 4096), (13696, 4096), (4096, 13696)]


def random_raw(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> Tensor:
    """Random blocks [rows, row_bytes] whose fp16 scale fields are a sane 0.01 (random bytes could be inf/NaN)."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows * cols // bs, ts), dtype=torch.uint8, generator=g)
    d = torch.full((raw.shape[0],), 0.01, dtype=torch.float16).view(torch.uint8).view(-1, 2)
    if qtype in (Q.Q8_0, Q.Q5_0, Q.Q4_0):
        raw[:, :2] = d
    elif qtype in (Q.Q4_K, Q.Q5_K):
        raw[:, :2] = d
        raw[:, 2:4] = d
    elif qtype == Q.Q6_K:
        raw[:, -2:] = d
    return raw.view(rows, -1)


def best_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def candidates(
    gk: CpuKernels, qtype: GGMLQuantizationType, rows: int, cols: int, m: int
) -> dict[str, Callable[[], object]]:
    raw = random_raw(qtype, rows, cols)
    fmt = GGUFBlockFormat(qtype, rows, cols)
    x = torch.randn(m, cols)
    xb = x.bfloat16()
    c: dict[str, Callable[[], object]] = {}
    if rows * cols <= 1 << 24 or m == 1:
        c["ref"] = lambda: fmt.matmul(x, raw)  # the reference path
    if m <= 64:
        c["vnni"] = lambda: gk.gemv(x, raw, fmt)
        c["float_act"] = lambda: gk.gemv(x, raw, fmt, exact_activations=True)
    if m > 1:
        c["deq_f32"] = lambda: gk.gemm(x, raw, fmt)
        c["deq_bf16"] = lambda: gk.gemm(xb, raw, fmt)
    if qtype == Q.Q4_K and rows % 16 == 0:
        q = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.rand(cols // 32, rows, 2, dtype=torch.bfloat16)
        c["int4pack"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, sz)
        szf = sz.float()
        c["int4pack_f32"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, szf)
    if qtype == Q.Q8_0:
        w8 = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
        s8 = torch.rand(rows, dtype=torch.bfloat16)
        c["int8pack"] = lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, s8)
        wb = w8.bfloat16()
        c["bf16_dense"] = lambda: F.linear(xb, wb)
    return c


def model_decode(
    path: str | None, threads: int, prompt: int, gen: int, runs: int, oracle: bool = True
) -> dict[str, float]:
    """Whole-model decode/prefill tok/s: our engine (the loader picks the CPU kernels), then llama-cpp-python, same
    process."""
    from autoglm.builtins import default_model_path
    from autoglm.config import EngineConfig
    from autoglm.engine.engine import Engine
    from autoglm.engine.prompt import PromptInputs
    from autoglm.engine.sampling_params import SamplingParams
    from autoglm.loader import load_model

    path = path or str(default_model_path())
    torch.set_grad_enabled(False)
    loaded = load_model(path, no_vision=True)

    vocab = loaded.decoder.vocab_size

    def ids(k: int, plen: int) -> list[int]:  # a different prompt per run: no prefix-cache hits
        g = torch.Generator().manual_seed(k)
        return torch.randint(1000, min(200000, vocab), (plen,), generator=g).tolist()

    engine = Engine(
        loaded,
        EngineConfig(
            max_model_len=prompt + gen + 32,
            max_num_seqs=1,
            max_num_batched_tokens=max(prompt, 16),
            block_size=16,
            num_kv_blocks=(prompt + gen) // 16 + 8,
        ),
    )

    def ours(plen: int, glen: int, k: int) -> tuple[float, float]:
        p = SamplingParams(max_tokens=glen, temperature=0.0, ignore_eos=True)
        engine.add_request(f"r{k}", PromptInputs(token_ids=ids(k, plen)), p)
        start, first, n = time.perf_counter(), 0.0, 0
        while engine.has_unfinished():
            for out in engine.step():
                n += len(out.new_token_ids)
                first = first or time.perf_counter()
        end = time.perf_counter()
        return plen / (first - start), (n - 1) / (end - first)

    ours(16, 4, 0)
    res = [ours(prompt, gen, k) for k in range(1, runs + 1)]
    row = {"autoglm_prefill": max(r[0] for r in res), "autoglm_decode": max(r[1] for r in res)}
    engine.close()
    if not oracle:  # e.g. compared with llama-bench of a matching llama.cpp build instead
        return {k: round(v, 2) for k, v in row.items()}
    try:
        from llama_cpp import Llama
    except ImportError:
        return row
    llm = Llama(
        model_path=path,
        n_ctx=prompt + gen + 32,
        n_batch=max(prompt, 32),
        n_ubatch=max(prompt, 32),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def theirs(plen: int, glen: int, k: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids(k, plen))
        tok = llm.sample(top_k=1, temp=0.0)
        first = time.perf_counter()
        for _ in range(glen - 1):
            llm.eval([tok])
            tok = llm.sample(top_k=1, temp=0.0)
        return plen / (first - start), (glen - 1) / (time.perf_counter() - first)

    theirs(16, 4, 0)
    res = [theirs(prompt, gen, k) for k in range(1, runs + 1)]
    row.update({"llamacpp_prefill": max(r[0] for r in res), "llamacpp_decode": max(r[1] for r in res)})
    row["decode_ratio"] = row["autoglm_decode"] / row["llamacpp_decode"]
    row["prefill_ratio"] = row["autoglm_prefill"] / row["llamacpp_prefill"]
    return {k: round(v, 2) for k, v in row.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", default="1,512")
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0,Q5_0")
    ap.add_argument("--big", action="store_true", help="also the 9B shapes (4096x4096, 4096x13696)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--model", nargs="?", const="", help="whole-model decode vs llama.cpp (default: the gemma file)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the in-process llama-cpp-python comparison")
    ap.add_argument("--isa", default=None, help="CPU kernel variant (auto|avx512|avx2|scalar) [env AUTOGLM_CPU_ISA]")
    args = ap.parse_args()
    if args.isa:
        os.environ["AUTOGLM_CPU_ISA"] = args.isa  # the model loader's select_kernels reads it
    torch.set_num_threads(args.threads)
    if args.model is not None:
        row = model_decode(args.model or None, args.threads, args.prompt, args.gen, args.runs, not args.no_llamacpp)
        print(json.dumps({"threads": args.threads, "isa": args.isa or "auto", "prompt": args.prompt, "gen": args.gen,
                          **row}))
        return
    gk = cpu_kernels(args.isa)
    if gk is None:
        raise SystemExit("the GGUF kernel extension could not be built")
    print(f"threads={args.threads} isa={gk.isa} packed={gk.has_packed} reps={args.reps} (min ms)")
    rows_out = []
    shapes = GEMMA_SHAPES + (BIG_SHAPES if args.big else [])
    for tname in args.types.split(","):
        qtype = Q[tname]
        for rows, cols in shapes:
            if cols % GGML_QUANT_SIZES[qtype][0]:
                continue
            for m in (int(t) for t in args.tokens.split(",")):
                res = {}
                for name, fn in candidates(gk, qtype, rows, cols, m).items():
                    try:
                        res[name] = round(best_ms(fn, args.reps if rows * cols * m < 1 << 30 else 2), 3)
                    except RuntimeError as e:
                        res[name] = f"error: {e}".splitlines()[0][:60]
                wbytes = rows * cols * GGML_QUANT_SIZES[qtype][1] / GGML_QUANT_SIZES[qtype][0]
                row = {"type": tname, "rows": rows, "cols": cols, "tokens": m, "weight_MB": round(wbytes / 1e6, 2)}
                row.update(res)
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
