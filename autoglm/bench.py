"""Benchmark core: load time, prefill tok/s, decode tok/s, TTFT and peak RSS for our engine and, on the same GGUF,
llama-cpp-python — each engine in its own child process (clean peak RSS), back to back in one run.

Method (BENCHMARKS.md): random prompt token ids (seeded, the same ids for both engines), greedy decoding with EOS
ignored so every run generates exactly `gen_len` tokens, one warm-up request first. Prefill = time from submitting
the requests to the step that yields the first token of every request; decode = the remaining tokens over the
remaining time. Needs only `autoglm.loader.load_model` + `autoglm.engine.engine.Engine`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

BENCH_SEED = 1234


@dataclass
class BenchConfig:
    model: str
    prompt_len: int = 512
    gen_len: int = 128
    concurrency: int = 1
    threads: int | None = None  # None: all cores
    quantization: str | None = None  # None | "int8" | "int4" (HF path)
    dtype: str = "auto"
    runs: int = 1
    deterministic: bool = False  # EngineConfig.deterministic (batch-invariant kernels)
    cpu_isa: str | None = None  # CPU kernel variant (autoglm --cpu-isa); None: $AUTOGLM_CPU_ISA, else the best


@dataclass
class BenchResult:
    engine: str
    model: str
    quantization: str
    threads: int
    prompt_len: int
    gen_len: int
    concurrency: int
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    peak_rss_bytes: int
    weight_bytes: int = 0
    read_bandwidth_gbs: float | None = None  # measured in the same process, for the memory-bound decode ceiling
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_bound_tok_s(self) -> float | None:
        """Memory-bandwidth bound on decode: every weight byte read once per step (batch 1)."""
        if not self.read_bandwidth_gbs or not self.weight_bytes:
            return None
        return self.read_bandwidth_gbs * 1e9 / self.weight_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode_bound_tok_s"] = self.decode_bound_tok_s
        return d


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def set_threads(threads: int | None) -> int:
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """GB/s of a streaming read (sum of a float32 tensor much larger than the caches), best of `repeats`."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def prompt_ids(vocab: int, length: int, index: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(BENCH_SEED + index)
    # skip the first ids (specials in most vocabularies) and stay well inside the vocabulary
    return torch.randint(100, max(101, min(vocab, 32000)), (length,), generator=g).tolist()


def decoder_weight_bytes(decoder: Any) -> int:
    """Bytes of weights read per decode step: every unique tensor except the embedding table (rows are gathered)."""
    from torch import nn

    skip = set()
    for mod in decoder.modules():
        if isinstance(mod, nn.Embedding) or type(mod).__name__.endswith("Embedding"):
            skip.update(id(t) for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)))
    seen: set[int] = set()
    total = 0
    for t in list(decoder.parameters()) + list(decoder.buffers()):
        if id(t) in seen or id(t) in skip or t.is_meta:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    # a tied lm_head reads the (skipped) embedding matrix
    head = getattr(decoder, "lm_head", None)
    w = getattr(head, "weight", None)
    if w is not None and id(w) in skip:
        total += w.numel() * w.element_size()
    return total


def bench_autoglm(cfg: BenchConfig) -> BenchResult:
    """Run our engine in this process (the caller isolates it in a child process for the RSS figure)."""
    import torch

    from autoglm.config import EngineConfig
    from autoglm.engine.engine import Engine
    from autoglm.engine.prompt import PromptInputs
    from autoglm.engine.sampling_params import SamplingParams
    from autoglm.loader import load_model

    threads = set_threads(cfg.threads)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, dtype=cfg.dtype, no_vision=True, cpu_isa=cfg.cpu_isa)
    if cfg.quantization:
        from autoglm.quant.apply import apply_quantization, finalize_quantization

        apply_quantization(loaded.decoder, cfg.quantization)
        finalize_quantization(loaded.decoder)
    load_s = time.perf_counter() - t0
    block = 16
    per_seq = cfg.prompt_len + cfg.gen_len + block
    engine = Engine(
        loaded,
        EngineConfig(
            max_model_len=per_seq,
            max_num_seqs=cfg.concurrency,
            max_num_batched_tokens=max(cfg.prompt_len * cfg.concurrency, cfg.concurrency),
            block_size=block,
            num_kv_blocks=cfg.concurrency * (per_seq // block + 2) + 4,
            deterministic=cfg.deterministic,
        ),
    )
    vocab = int(loaded.decoder.vocab_size)
    params = SamplingParams(max_tokens=cfg.gen_len, temperature=0.0, ignore_eos=True)

    def run_once(tag: str, prompt_len: int, gen_len: int) -> tuple[float, float, float]:
        p = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True) if gen_len != cfg.gen_len else params
        start = time.perf_counter()
        for i in range(cfg.concurrency):
            engine.add_request(f"{tag}-{i}", PromptInputs(token_ids=prompt_ids(vocab, prompt_len, i)), p)
        first: dict[str, float] = {}
        n_tokens = 0
        while engine.has_unfinished():
            for out in engine.step():
                now = time.perf_counter()
                n_tokens += len(out.new_token_ids)
                first.setdefault(out.request_id, now)
        end = time.perf_counter()
        prefill_end = max(first.values())
        ttft = sum(v - start for v in first.values()) / len(first)
        prefill = cfg.concurrency * prompt_len / (prefill_end - start)
        decode_tokens = n_tokens - len(first)
        decode = decode_tokens / (end - prefill_end) if end > prefill_end and decode_tokens else 0.0
        return prefill, decode, ttft

    run_once("warmup", min(cfg.prompt_len, 16), 2)
    runs = [run_once(f"run{r}", cfg.prompt_len, cfg.gen_len) for r in range(cfg.runs)]
    prefill, decode, ttft = (max(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs))
    qname = cfg.quantization or (loaded.modules[0].quantization if loaded.modules else cfg.dtype)
    result = BenchResult(
        engine="autoglm",
        model=cfg.model,
        quantization=qname,
        threads=threads,
        prompt_len=cfg.prompt_len,
        gen_len=cfg.gen_len,
        concurrency=cfg.concurrency,
        load_s=load_s,
        prefill_tok_s=prefill,
        decode_tok_s=decode,
        ttft_s=ttft,
        peak_rss_bytes=peak_rss_bytes(),
        weight_bytes=decoder_weight_bytes(loaded.decoder),
        extra={"runs": [list(r) for r in runs]},
    )
    engine.close()
    return result


def bench_llamacpp(cfg: BenchConfig) -> BenchResult:
    """llama-cpp-python on the same GGUF and the same prompt ids (one sequence at a time)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        from autoglm.errors import InvalidRequest

        raise InvalidRequest(f"--compare-llamacpp needs llama-cpp-python (pip install autoglm[llamacpp]): {e}") from e
    threads = cfg.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    llm = Llama(
        model_path=cfg.model,
        n_ctx=cfg.prompt_len + cfg.gen_len + 16,
        n_batch=max(cfg.prompt_len, 32),
        n_ubatch=max(cfg.prompt_len, 32),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()

    def run_once(prompt_len: int, gen_len: int, index: int) -> tuple[float, float, float]:
        llm.reset()
        ids = prompt_ids(vocab, prompt_len, index)
        start = time.perf_counter()
        llm.eval(ids)
        tok = llm.sample(top_k=1, temp=0.0)
        first = time.perf_counter()
        for _ in range(gen_len - 1):
            llm.eval([tok])
            tok = llm.sample(top_k=1, temp=0.0)
        end = time.perf_counter()
        decode = (gen_len - 1) / (end - first) if gen_len > 1 else 0.0
        return prompt_len / (first - start), decode, first - start

    run_once(min(cfg.prompt_len, 16), 2, 0)
    runs = [run_once(cfg.prompt_len, cfg.gen_len, i % max(cfg.concurrency, 1)) for i in range(cfg.runs)]
    return BenchResult(
        engine="llama.cpp",
        model=cfg.model,
        quantization="gguf",
        threads=threads,
        prompt_len=cfg.prompt_len,
        gen_len=cfg.gen_len,
        concurrency=1,
        load_s=load_s,
        prefill_tok_s=max(r[0] for r in runs),
        decode_tok_s=max(r[1] for r in runs),
        ttft_s=min(r[2] for r in runs),
        peak_rss_bytes=peak_rss_bytes(),
        weight_bytes=os.path.getsize(cfg.model),
        extra={"runs": [list(r) for r in runs], "note": "sequential: llama-cpp-python runs one sequence"},
    )


def _child(kind: str, cfg: BenchConfig, queue: Any) -> None:
    try:
        result = bench_autoglm(cfg) if kind == "autoglm" else bench_llamacpp(cfg)
        result.read_bandwidth_gbs = measure_read_bandwidth()
        queue.put(("ok", result.to_dict()))
    except BaseException as e:  # report any failure to the parent instead of dying silently
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_isolated(kind: str, cfg: BenchConfig, timeout: float = 3600.0) -> BenchResult:
    """Run one engine's benchmark in a fresh (spawned) process so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, cfg, queue))
    proc.start()
    try:
        status, payload = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        from autoglm.errors import AutoGLMError

        raise AutoGLMError(f"{kind} benchmark failed: {payload}")
    payload.pop("decode_bound_tok_s", None)
    return BenchResult(**payload)


def render_table(results: list[BenchResult]) -> str:
    head = (
        f"{'engine':<10}{'quant':<12}{'thr':>4}{'load s':>8}{'prefill tok/s':>15}{'decode tok/s':>14}"
        f"{'TTFT ms':>10}{'peak RSS MiB':>14}{'decode bound':>14}"
    )
    lines = [head]
    for r in results:
        bound = r.decode_bound_tok_s
        lines.append(
            f"{r.engine:<10}{r.quantization[:11]:<12}{r.threads:>4}{r.load_s:>8.2f}{r.prefill_tok_s:>15.1f}"
            f"{r.decode_tok_s:>14.2f}{r.ttft_s * 1e3:>10.1f}{r.peak_rss_bytes / 2**20:>14.1f}"
            f"{(f'{bound:.1f}' if bound else '-'):>14}"
        )
    if len(results) == 2 and results[1].prefill_tok_s and results[1].decode_tok_s:
        a, b = results
        lines.append(
            f"ratio {a.engine}/{b.engine}: prefill {a.prefill_tok_s / b.prefill_tok_s:.2f}x, "
            f"decode {a.decode_tok_s / b.decode_tok_s:.2f}x, peak RSS {a.peak_rss_bytes / b.peak_rss_bytes:.2f}x"
        )
    return "\n".join(lines)


def ratios(results: list[BenchResult]) -> dict[str, float]:
    if len(results) != 2 or not results[1].prefill_tok_s or not results[1].decode_tok_s:
        return {}
    a, b = results
    return {
        "prefill": a.prefill_tok_s / b.prefill_tok_s,
        "decode": a.decode_tok_s / b.decode_tok_s,
        "peak_rss": a.peak_rss_bytes / b.peak_rss_bytes,
    }
