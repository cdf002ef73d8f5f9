"""Decode-step graphs (engine/cuda_graphs.py) with a CPU stand-in for CUDA graph capture.

The stand-in replays by re-running the captured function on the same static buffers with the Python-side context
frozen at capture, as a CUDA graph would: so these tests check that each step's inputs reach the static buffers
(ids, positions, slots, block tables padded to the bucket, lengths) and that the captured decode reads nothing
stale — the engine's greedy tokens with graphs must equal eager ones, with most steps served by replays. Where torch
sees a GPU the same tests also run there with real CUDA graphs (the runner's own, `CudaGraphCapture`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from autoglm.engine.cuda_graphs import CudaGraphCapture, DecodeGraphs, _bucket, decode_graphs
from autoglm.layers.attention import CudaSdpaBackend, TorchRefBackend
from autoglm.llm import LLM
from autoglm.loader.hf import load_hf
from autoglm.models.loaded import LoadedModel
from tests.models.harness import engine_greedy, prompts, tiny_checkpoint

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class ReplayOnCpu:
    """Capture = one run (torch's warm-up); replay = the same function again on the same static buffers."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        self.captures += 1
        fn()
        return fn


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    return tiny_checkpoint(MistralForCausalLM, MistralConfig, tmp_path_factory.mktemp("graphs"), hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=6)


@pytest.fixture(params=DEVICES)
def tiny(tiny_dir: Path, request: pytest.FixtureRequest) -> LoadedModel:
    return load_hf(tiny_dir, dtype="float32", device=request.param)


def _greedy(loaded: LoadedModel, batches: list[list[list[int]]], *, graphs: bool,
            safe: bool = True) -> tuple[list[list[int]], DecodeGraphs | None]:
    backend = "cuda_sdpa" if safe else "torch"
    llm = LLM(loaded, block_size=4, max_num_batched_tokens=64, max_model_len=128, attention_backend=backend)
    try:
        runner = llm.engine.runner
        on_cuda = runner.device.type == "cuda"
        assert (runner.graphs is not None) == (on_cuda and safe)  # the runner captures on CUDA only
        dg = None
        if graphs:
            if not safe:  # pretend the reference is graph-safe: the capture must expose it
                runner.backend.graph_safe_decode = True  # type: ignore[attr-defined]
            capture = CudaGraphCapture(runner.device) if on_cuda else ReplayOnCpu()
            dg = runner.graphs = DecodeGraphs(runner.decoder, runner.backend, capture)
        else:
            runner.graphs = None
        out = [t for batch in batches for t in engine_greedy(llm.engine, batch, 14)]
        return out, dg
    finally:
        llm.close()


def test_graph_replays_match_eager(tiny: LoadedModel) -> None:
    v = tiny.decoder.vocab_size
    batches = [[p.tolist() for p in prompts(v, lens, seed=s)] for s, lens in enumerate([(7, 13), (5,), (3, 9, 4)])]
    eager, _ = _greedy(tiny, batches, graphs=False)
    got, dg = _greedy(tiny, batches, graphs=True)
    assert got == eager
    assert dg is not None
    keys = set(dg.captured)
    assert len(keys) == len(dg.captured)  # each shape captured once
    assert {k[0] for k in keys} == {1, 2}  # batch 3 is not a graph size: eager
    assert len({k[1] for k in keys}) >= 2  # the block-table width crossed buckets (padded tables replayed)
    assert dg.replays >= 14  # most decode steps of the batches of 2 and 1 came from replays
    assert isinstance(dg.backend, CudaSdpaBackend)
    if isinstance(dg.capture, ReplayOnCpu):
        assert dg.capture.captures == len(keys)


def test_stand_in_exposes_a_backend_that_reads_python_lengths(tiny: LoadedModel) -> None:
    """The torch reference's decode slices the cache by ctx.context_lens: frozen at capture, replays go wrong."""
    v = tiny.decoder.vocab_size
    batches = [[prompts(v, (9,), seed=4)[0].tolist()]]
    eager, _ = _greedy(tiny, batches, graphs=False, safe=False)
    got, dg = _greedy(tiny, batches, graphs=True, safe=False)
    assert dg is not None and dg.replays > 0
    assert got != eager


def test_only_graph_safe_backends_on_cuda(tiny_dir: Path) -> None:
    tiny = load_hf(tiny_dir, dtype="float32")
    layers = [m for m in tiny.decoder.modules() if hasattr(m, "sliding_window")]
    kw = dict(num_blocks=4, block_size=4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="cannot be captured"):
        DecodeGraphs(tiny.decoder, TorchRefBackend(layers, **kw), ReplayOnCpu())
    safe = CudaSdpaBackend(layers, **kw)
    assert decode_graphs(tiny.decoder, safe, torch.device("cpu"), True) is None
    assert decode_graphs(tiny.decoder, safe, torch.device("cuda"), False) is None


@pytest.mark.parametrize("width,bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16)])
def test_width_buckets(width: int, bucket: int) -> None:
    assert _bucket(width) == bucket


def test_release_drops_graphs_and_stops_capturing(tiny: LoadedModel) -> None:
    v = tiny.decoder.vocab_size
    llm = LLM(tiny, block_size=4, max_model_len=64, attention_backend="cuda_sdpa")
    try:
        runner = llm.engine.runner
        capture = CudaGraphCapture(runner.device) if runner.device.type == "cuda" else ReplayOnCpu()
        dg = runner.graphs = DecodeGraphs(runner.decoder, runner.backend, capture)
        engine_greedy(llm.engine, [prompts(v, (5,), seed=7)[0].tolist()], 6)
        assert dg.graphs and dg.captured
    finally:
        llm.close()
    assert not dg.graphs and dg.max_graphs == 0
