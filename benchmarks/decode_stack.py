"""Issue 15: the decode step with the LLaMA-family layer stack in one kernel call (`Kernels.decode_layers`), in one
process. Outside CI.

    python benchmarks/decode_stack.py ab MODEL.gguf [--threads 2] [--rounds 4]
        one call vs module by module (the same engine, the same weights), alternating rounds: median decode step
    python benchmarks/decode_stack.py bound MODEL.gguf [--threads 2] [--rounds 4]
        each round: the streaming-read probe (autoglm.bench.measure_read_bandwidth), then 32 decode steps: the step's
        weight bytes / its median time as a share of the probe (the DRAM bound measured next to it)

Step times are `ModelRunner.run` of the decode steps only (prefill excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import autoglm.engine.runner as runner_mod
from autoglm.bench import decoder_weight_bytes, measure_read_bandwidth
from autoglm.llm import LLM
from autoglm.models.llama import LlamaModel

PROMPT = list(range(1000, 1128))


def _step_timer() -> list[float]:
    steps: list[float] = []
    run = runner_mod.ModelRunner.run

    def timed(self: Any, batch: Any) -> Any:
        t = time.perf_counter()
        out = run(self, batch)
        if sum(batch.num_new_tokens) == len(batch.requests):  # one new token per sequence: a decode step
            steps.append(time.perf_counter() - t)
        return out

    runner_mod.ModelRunner.run = timed  # type: ignore[method-assign]
    return steps


def _decode(llm: LLM, steps: list[float], tokens: int) -> float:
    steps.clear()
    llm.generate(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
    return statistics.median(steps)


def ab(llm: LLM, rounds: int) -> dict[str, Any]:
    steps = _step_timer()
    one_call = LlamaModel._decode_in_one_call
    modes: dict[str, Callable[..., Any]] = {"one_call": one_call, "modules": lambda self, h, rope, ctx: None}
    out: dict[str, list[float]] = {k: [] for k in modes}
    _decode(llm, steps, 8)
    for r in range(rounds):
        for name in list(modes) if r % 2 == 0 else list(modes)[::-1]:
            LlamaModel._decode_in_one_call = modes[name]  # type: ignore[method-assign]
            out[name].append(round(_decode(llm, steps, 64) * 1e3, 2))
    LlamaModel._decode_in_one_call = one_call  # type: ignore[method-assign]
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"step_ms_per_round": out, "median_ms": med, "speedup": round(med["modules"] / med["one_call"], 3)}


def bound(llm: LLM, rounds: int) -> dict[str, Any]:
    steps = _step_timer()
    wb = decoder_weight_bytes(llm.model.decoder)
    _decode(llm, steps, 8)
    out = []
    for _ in range(rounds):
        gbs = measure_read_bandwidth()
        step = _decode(llm, steps, 33)
        read = wb / step / 1e9
        out.append({"probe_gbs": round(gbs, 1), "step_ms": round(step * 1e3, 2), "read_gbs": round(read, 1),
                    "pct_of_probe": round(100 * read / gbs, 1)})  # fmt: skip
    return {"weight_bytes_per_step": wb, "rounds": out,
            "median_pct": statistics.median(r["pct_of_probe"] for r in out)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("ab", "bound"))
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--isa", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    llm = LLM(a.model, cpu_isa=a.isa, max_model_len=512)
    try:
        res = ab(llm, a.rounds) if a.mode == "ab" else bound(llm, a.rounds)
    finally:
        llm.close()
    print(json.dumps({"model": a.model, "threads": a.threads, **res}, indent=1))


if __name__ == "__main__":
    main()
