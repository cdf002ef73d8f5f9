"""CUDA graphs for decode steps: the decoder's forward of a pure-decode batch captured once per (batch size, block-
table width bucket) and replayed, so a step costs one graph launch instead of a few hundred kernel launches.

A graph reads and writes fixed addresses, so each captured shape owns static input buffers (token ids, positions,
slot mapping, block tables padded to the bucket's width with a valid block id, context lengths on the device); a
step copies its inputs into them and replays. What the forward reads on the Python side (the context's lists) is
frozen at capture, which is why only backends whose decode reads tensors alone (`graph_safe_decode`:
`layers/attention/cuda_sdpa.py`) are captured. Eligible: decode-only steps without media embeddings whose batch
size is one of `GRAPH_BATCH_SIZES` (1, 2, 4, 8); anything else runs eager (the runner's own call). A shape is
captured at its `warmup + 1`-th sighting (the first ones run eager: lazy initialisations, one-off sizes), with
torch's side-stream warm-up before capture and one memory pool shared by all graphs; at most `max_graphs`.

The capture mechanism is a `GraphCapture` (`CudaGraphCapture` on CUDA); tests use a CPU stand-in that replays by
re-running the captured function on the same static buffers with the context frozen at capture, which exercises
the buffer handling and the frozen-Python-state rule on the CPU (tests/unit/test_cuda_graphs.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from autoglm.layers.attention import AttentionBackend, AttentionContext
from autoglm.layers.attention.cuda_sdpa import LENS

log = logging.getLogger("autoglm.engine.cuda_graphs")

GRAPH_BATCH_SIZES = (1, 2, 4, 8)
WARMUP_ITERS = 2  # eager runs on the side stream before a capture (torch's recipe: kernels pick their workspaces)


class GraphCapture(Protocol):
    def capture(self, fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """Capture `fn` (which reads/writes only static tensors) -> replay, returning the static output."""


class CudaGraphCapture:
    """torch.cuda.CUDAGraph capture on `device`, all graphs in one memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                fn()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a server's event loop) do not invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay


@dataclass
class _Graph:
    """One captured shape: its static inputs and its replay."""

    input_ids: Tensor  # [B] int64
    positions: Tensor  # [B] or [R, B] int64
    slots: Tensor  # [B] int64
    tables: Tensor  # [B, W] int64
    lens: Tensor  # [B] int64
    replay: Callable[[], Tensor] | None = None

    def load(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext) -> None:
        assert ctx.slot_mapping is not None and ctx.block_tables is not None
        self.input_ids.copy_(input_ids)
        self.positions.copy_(positions)
        self.slots.copy_(ctx.slot_mapping)
        w = ctx.block_tables.shape[1]
        self.tables[:, :w].copy_(ctx.block_tables)
        self.tables[:, w:].copy_(ctx.block_tables[:, :1].expand(-1, self.tables.shape[1] - w))  # masked, never read
        lens = ctx.memo.get(LENS)
        self.lens.copy_(lens if lens is not None else torch.tensor(ctx.context_lens, dtype=torch.long))


class DecodeGraphs:
    """Captured decode forwards of `decoder` over `backend`'s cache (see the module docstring)."""

    def __init__(
        self,
        decoder: nn.Module,
        backend: AttentionBackend,
        capture: GraphCapture,
        *,
        batch_sizes: tuple[int, ...] = GRAPH_BATCH_SIZES,
        warmup: int = 1,
        max_graphs: int = 64,
    ) -> None:
        if not getattr(backend, "graph_safe_decode", False):
            raise ValueError(f"{type(backend).__name__} reads Python-side lengths in decode: it cannot be captured")
        self.decoder = decoder
        self.backend = backend
        self.capture = capture
        self.batch_sizes = batch_sizes
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, int, tuple[int, ...]], _Graph] = {}
        self.seen: Counter[tuple[int, int, tuple[int, ...]]] = Counter()
        self.replays = 0  # steps served by a graph (for tests and the log)
        self.captured: list[tuple[int, int, tuple[int, ...]]] = []  # every key captured, in order (kept by release)

    def release(self) -> None:
        """Drop every graph (they hold the cache's and their pool's memory) and stop capturing."""
        self.graphs.clear()
        self.max_graphs = 0

    def run(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, embeds: Tensor | None) -> Tensor | None:
        """The step's hidden states [B, D] from a graph, or None when the step is not eligible (run it eager)."""
        if embeds is not None or not ctx.is_decode or ctx.block_tables is None or ctx.slot_mapping is None:
            return None
        bsz = len(ctx.query_lens)
        if bsz not in self.batch_sizes:
            return None
        width = _bucket(ctx.block_tables.shape[1])
        key = (bsz, width, tuple(positions.shape))
        graph = self.graphs.get(key)
        if graph is None:
            self.seen[key] += 1
            if self.seen[key] <= self.warmup or len(self.graphs) >= self.max_graphs:
                return None
            graph = self._capture(key, input_ids, positions, ctx)
        else:
            graph.load(input_ids, positions, ctx)
        assert graph.replay is not None
        self.replays += 1
        return graph.replay().clone()  # the static output is overwritten by the next replay

    def _capture(
        self, key: tuple[int, int, tuple[int, ...]], input_ids: Tensor, positions: Tensor, ctx: AttentionContext
    ) -> _Graph:
        bsz, width, _ = key
        dev = input_ids.device
        graph = _Graph(
            input_ids=torch.zeros(bsz, dtype=torch.long, device=dev),
            positions=torch.zeros(positions.shape, dtype=positions.dtype, device=dev),
            slots=torch.zeros(bsz, dtype=torch.long, device=dev),
            tables=torch.zeros(bsz, width, dtype=torch.long, device=dev),
            lens=torch.zeros(bsz, dtype=torch.long, device=dev),
        )
        graph.load(input_ids, positions, ctx)  # the capture's warm-up runs compute this very step
        frozen_lens = list(ctx.context_lens)  # what the Python side sees at every replay

        def forward() -> Tensor:
            step = AttentionContext(
                query_lens=[1] * bsz,
                context_lens=frozen_lens,
                slot_mapping=graph.slots,
                block_tables=graph.tables,
                backend=self.backend,
            )
            step.memo[LENS] = graph.lens  # fresh memo per call: masks are recomputed from the static lengths
            return self.decoder(graph.input_ids, graph.positions, step)

        graph.replay = self.capture.capture(forward)
        self.graphs[key] = graph
        self.captured.append(key)
        log.info("captured a decode graph: batch %d, %d blocks, positions %s", bsz, width, list(positions.shape))
        return graph


def decode_graphs(
    decoder: nn.Module, backend: AttentionBackend, device: torch.device, enabled: bool
) -> DecodeGraphs | None:
    """Decode graphs for a decoder on a CUDA device with a graph-safe backend; None otherwise (eager)."""
    if not enabled or device.type != "cuda" or not getattr(backend, "graph_safe_decode", False):
        return None
    return DecodeGraphs(decoder, backend, CudaGraphCapture(device))


def _bucket(width: int) -> int:
    """The block-table width a graph is captured for: the next power of two (fewer graphs, a little padding)."""
    return 1 << max(0, width - 1).bit_length()
