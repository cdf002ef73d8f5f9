"""A/B of `EngineConfig.deterministic` on the built-in GGUF, modes alternated in one process, best of 3 per case:
prefill tok/s of the first `Engine.step()` and decode tok/s of the rest. Run under the benchmark lock:
`flock /tmp/autoglm-bench.lock python benchmarks/determinism_ab.py` (BENCHMARKS.md "Deterministic greedy")."""

from __future__ import annotations

import json
import time

import torch

from autoglm.builtins import default_model_path
from autoglm.config import EngineConfig
from autoglm.engine.engine import Engine
from autoglm.engine.prompt import PromptInputs
from autoglm.engine.sampling_params import SamplingParams
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel

CASES = ((1, 256, 32), (8, 64, 16))  # (streams, prompt tokens each, new tokens each)


def one(model: LoadedModel, det: bool, streams: int, n: int, gen: int) -> tuple[float, float]:
    vocab = int(model.decoder.vocab_size)
    engine = Engine(model, EngineConfig(
        deterministic=det, max_num_seqs=streams, max_num_batched_tokens=max(2048, streams * n),
        max_model_len=n + gen + 32, num_kv_blocks=streams * ((n + gen) // 16 + 3) + 4,
    ))  # fmt: skip
    for i in range(streams):
        ids = [(7919 * (i + 1) * (j + 3)) % vocab for j in range(n)]
        engine.add_request(str(i), PromptInputs(token_ids=ids), SamplingParams(max_tokens=gen, temperature=0.0,
                                                                               ignore_eos=True))
    t0 = time.perf_counter()
    engine.step()  # the whole prefill (one step: the budget holds every prompt)
    t1 = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    engine.close()
    return streams * n / (t1 - t0), streams * steps / (t2 - t1)


def main() -> None:
    torch.set_grad_enabled(False)
    model = load_model(default_model_path())
    one(model, False, 1, 32, 4), one(model, True, 1, 32, 4)  # warm both paths
    best: dict[str, tuple[float, float]] = {}
    for trial in range(3):
        for streams, n, gen in CASES:
            for det in (False, True):
                p, d = one(model, det, streams, n, gen)
                key = f"{streams} stream(s) x {n} tokens, {'deterministic' if det else 'default'}"
                b = best.get(key, (0.0, 0.0))
                best[key] = (max(b[0], p), max(b[1], d))
                print(f"{trial} {key}: prefill {p:.1f} tok/s, decode {d:.2f} tok/s", flush=True)
    print(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
