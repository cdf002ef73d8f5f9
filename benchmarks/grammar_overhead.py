"""Per-token cost of structured outputs on CPU: llguidance (what autoglm uses) vs xgrammar, 1 and 8 requests.

    python benchmarks/grammar_overhead.py [--gguf PATH.gguf] [--batch 1,8] [--steps 256] [--threads 1] [--json out]

The tokenizer is a real one read from a GGUF with autoglm's loader (default: the built-in Gemma 3 270M, 262k
vocabulary; the issue's figures also use Qwen2.5-0.5B-Instruct's, 151,936). Each step does what the engine will do
for B constrained requests: fill B bitmask rows, sample B rows of random logits under the mask with autoglm's
`Sampler` (temperature 1), and advance each grammar by its token (a request that completes starts over). Reported
per step, in ms (medians): `fill` (mask computation for all B rows; `llguidance-par` = `GrammarCompiler.fill_masks`
over the batch), `mask` (`apply_token_bitmask`, the sampler's extra work for constrained rows), `accept`; the
whole sampler call for reference; plus the one-off tokenizer-table build and the schema compile. xgrammar runs only
if installed (`pip install --no-deps xgrammar apache-tvm-ffi`: its declared dependencies would pull triton); it is
driven through its own API with the same compact JSON separators.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from autoglm.engine.grammar import GrammarCompiler, GrammarSpec, allocate_token_bitmask
from autoglm.engine.sampler import Sampler, SamplingRow, apply_token_bitmask
from autoglm.gguf.reader import GGUFFile
from autoglm.gguf.tokenizer import build_tokenizer, eos_token_ids
from autoglm.tokenizer.tokenizer import Tokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "hourly": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
    },
    "required": ["city", "unit", "days", "hourly", "tags"],
    "additionalProperties": False,
}


class _Matcher:
    """The three calls a backend must answer per request and step."""

    fill: Callable[[torch.Tensor, int], None]
    state: Callable[[], Any]
    accept: Callable[[int], bool]
    done: Callable[[], bool]
    reset: Callable[[], None]


def llguidance_backend(tok: Tokenizer, vocab: int, eos: list[int], threads: int = 1
                       ) -> tuple[float, float, Callable[[], _Matcher]]:
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok, vocab_size=vocab, eos_token_ids=eos, mask_threads=threads)
    t1 = time.perf_counter()
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    t2 = time.perf_counter()

    def new() -> _Matcher:
        m = _Matcher()
        state = grammar.new_state()

        def reset() -> None:
            nonlocal state
            state = grammar.new_state()

        m.fill = lambda bm, i: state.fill_mask(bm[i])
        m.state = lambda: state
        m.accept = lambda t: state.accept(t)
        m.done = lambda: state.is_terminated()
        m.reset = reset
        return m

    new.compiler = compiler  # type: ignore[attr-defined]
    return t1 - t0, t2 - t1, new


def xgrammar_backend(tok: Tokenizer, vocab: int, eos: list[int]) -> tuple[float, float, Callable[[], _Matcher]]:
    import xgrammar as xgr  # optional; only the benchmark uses it

    t0 = time.perf_counter()
    backend = tok.backend
    table = [""] * vocab
    for piece, tid in backend.get_vocab(with_added_tokens=True).items():
        if tid < vocab:
            table[tid] = piece
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())  # what from_huggingface does inside
    info = xgr.TokenizerInfo(table, meta["vocab_type"], vocab_size=vocab, stop_token_ids=eos,
                             add_prefix_space=meta["add_prefix_space"])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    t2 = time.perf_counter()

    def new() -> _Matcher:
        m = _Matcher()
        matcher = xgr.GrammarMatcher(compiled)
        m.fill = lambda bm, i: matcher.fill_next_token_bitmask(bm, i)
        m.accept = lambda t: matcher.accept_token(t)
        m.done = lambda: matcher.is_terminated()
        m.reset = lambda: matcher.reset()
        return m

    return t1 - t0, t2 - t1, new


def run(new: Callable[[], _Matcher], batch: int, steps: int, vocab: int, eos: list[int],
        fill_all: Callable[[list[_Matcher], torch.Tensor], None] | None = None) -> dict[str, float]:
    """Median ms per step of each part (the machine is shared: medians resist other jobs' bursts)."""
    sampler = Sampler()
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    matchers = [new() for _ in range(batch)]
    bitmask = allocate_token_bitmask(batch, vocab)
    fill, mask, accept, free = [], [], [], []
    completed = 0
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gens[0]) * 3
        t0 = time.perf_counter()
        if fill_all is not None:
            fill_all(matchers, bitmask)
        else:
            for i, m in enumerate(matchers):
                m.fill(bitmask, i)
        t1 = time.perf_counter()
        apply_token_bitmask(logits, bitmask)  # what the sampler adds for constrained rows
        t2 = time.perf_counter()
        rows = [SamplingRow(temperature=1.0, generator=gens[i], token_bitmask=bitmask[i]) for i in range(batch)]
        tokens, _ = sampler(logits, rows)
        t3 = time.perf_counter()
        for m, t in zip(matchers, tokens, strict=True):
            if t in eos or not m.accept(t) or m.done():
                completed += 1
                m.reset()
        t4 = time.perf_counter()
        fill.append(t1 - t0)
        mask.append(t2 - t1)
        free.append(t3 - t2)
        accept.append(t4 - t3)
    med = {k: statistics.median(v) * 1e3 for k, v in (("fill_ms", fill), ("mask_ms", mask), ("accept_ms", accept),
                                                      ("sampler_ms", free))}
    med["overhead_ms"] = med["fill_ms"] + med["mask_ms"] + med["accept_ms"]
    med["completed"] = completed
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF whose tokenizer to use (default: the built-in Gemma 3 270M)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gguf is None:
        from autoglm.builtins import default_model_path

        args.gguf = str(default_model_path())
    f = GGUFFile(args.gguf)
    tok = build_tokenizer(f.metadata, source=args.gguf)
    vocab = tok.vocab_size
    eos = eos_token_ids(f.metadata) or [int(tok.eos_token_id or 0)]
    print(f"tokenizer: {args.gguf} ({vocab} tokens), torch threads {args.threads}")
    results: list[dict[str, Any]] = []
    cores = os.cpu_count() or 1
    variants: list[tuple[str, Callable[..., Any], bool]] = [
        ("llguidance", llguidance_backend, False), (f"llguidance-par({cores})", llguidance_backend, True),
        ("xgrammar", xgrammar_backend, False)]
    for name, make, par in variants:
        try:
            table_s, compile_s, new = make(tok, vocab, eos, cores) if par else make(tok, vocab, eos)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        fill_all = None
        if par:
            def fill_all(ms: list[_Matcher], bm: torch.Tensor, _c: Any = new.compiler) -> None:
                _c.fill_masks([m.state() for m in ms], bm, range(len(ms)))
        print(f"{name}: tokenizer table {table_s:.2f} s, schema compile {compile_s * 1e3:.1f} ms")
        for b in (int(x) for x in args.batch.split(",")):
            if par and b == 1:
                continue
            r = run(new, b, args.steps, vocab, eos, fill_all)
            r.update(backend=name, batch=b, vocab=vocab, table_s=table_s, compile_ms=compile_s * 1e3)
            results.append(r)
            print(f"  batch {b}: fill {r['fill_ms']:.3f}  mask {r['mask_ms']:.3f}  accept {r['accept_ms']:.3f}  "
                  f"= {r['overhead_ms']:.3f} ms/step (whole sampler call {r['sampler_ms']:.3f} ms; "
                  f"{r['completed']} grammars completed)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
