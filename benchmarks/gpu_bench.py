"""autoglm's side of benchmarks/gpu_check.sh: prefill and decode speed of one GGUF on a device, through the engine.

    python benchmarks/gpu_bench.py MODEL.gguf [--device cuda] [--prompt-len 512] [--gen-len 128] [--batches 1,8]
                                   [--graphs on,off] [--runs 3] [--json OUT.json]

Per graphs setting (CUDA graphs for decode on/off; off-CUDA only "off" means anything): load time, prefill tok/s
(one request of --prompt-len random ids, time to its first token), and decode tok/s per batch size (B requests of
16 prompt tokens each generating --gen-len tokens together; aggregate tokens / time from the first decode step).
Each number is the best of --runs after one untimed warm-up (which also captures the graphs). Greedy, ignore_eos.
The model is loaded once (GGUF on CUDA: dequantized to bf16 at load) and shared by the settings; a check records
whether greedy tokens of two prompts x 32 tokens are equal with and without graphs. Prints one JSON object (also
written to --json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoglm.engine.prompt import PromptInputs  # noqa: E402
from autoglm.engine.sampling_params import SamplingParams  # noqa: E402
from autoglm.llm import LLM  # noqa: E402
from autoglm.loader import load_model  # noqa: E402
from tests.models.harness import engine_greedy  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prefill(llm: LLM, vocab: int, n: int, device: str, runs: int) -> float:
    """Best prefill tok/s: one prompt of `n` random ids, max_tokens=1 (time to the first token)."""
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for r in range(runs + 1):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        llm.engine.add_request(f"p{r}", PromptInputs(token_ids=ids), SamplingParams(max_tokens=1, temperature=0.0))
        _sync(device)
        t0 = time.perf_counter()
        while llm.engine.has_unfinished():
            llm.engine.step()
        _sync(device)
        if r:  # r == 0: warm-up
            best = max(best, n / (time.perf_counter() - t0))
    return best


def decode(llm: LLM, vocab: int, batch: int, gen: int, device: str, runs: int) -> float:
    """Best aggregate decode tok/s of `batch` requests generating `gen` tokens together (after their prefill)."""
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    best = 0.0
    for r in range(runs + 1):
        for i in range(batch):
            ids = torch.randint(0, vocab, (16,), generator=g).tolist()
            llm.engine.add_request(f"d{r}-{i}", PromptInputs(token_ids=ids), params)
        llm.engine.step()  # the prefill step (all prompts fit one step) samples each request's first token
        _sync(device)
        t0, tokens = time.perf_counter(), 0
        while llm.engine.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in llm.engine.step())
        _sync(device)
        if r:
            best = max(best, tokens / (time.perf_counter() - t0))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--graphs", default="on,off")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    result: dict[str, object] = {"model": args.model, "device": args.device, "prompt_len": args.prompt_len,
                                 "gen_len": args.gen_len, "torch": torch.__version__, "runs": {}}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    _sync(args.device)
    result["load_s"] = round(time.perf_counter() - t0, 2)
    tokens: dict[str, list[list[int]]] = {}
    for mode in [m for m in args.graphs.split(",") if m]:
        llm = LLM(loaded, max_model_len=args.prompt_len + args.gen_len + 64, max_num_seqs=max(batches),
                  max_num_batched_tokens=max(args.prompt_len, 16 * max(batches)), cuda_graphs=mode == "on")
        try:
            runner = llm.engine.runner
            vocab = min(llm.model.tokenizer.vocab_size, llm.model.decoder.vocab_size)
            tokens[mode] = engine_greedy(llm.engine, [[5, 17, 3, 99, 42, 7], [11, 2, 64, 8]], 32)
            row: dict[str, object] = {
                "backend": type(runner.backend).__name__,
                "dtype": str(runner.dtype),
                "prefill_tok_s": round(prefill(llm, vocab, args.prompt_len, args.device, args.runs), 1),
            }
            for b in batches:
                row[f"decode_b{b}_tok_s"] = round(decode(llm, vocab, b, args.gen_len, args.device, args.runs), 1)
            if runner.graphs is not None:
                row["graphs"] = len(runner.graphs.graphs)
                row["graph_replays"] = runner.graphs.replays
            if args.device.startswith("cuda"):
                row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        finally:
            llm.close()
        result["runs"][f"graphs_{mode}"] = row  # type: ignore[index]
        print(json.dumps({mode: row}), flush=True)
    if len(tokens) == 2:
        result["graphs_tokens_equal"] = tokens["on"] == tokens["off"]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
