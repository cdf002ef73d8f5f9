"""Batch invariance of the layers behind `EngineConfig.deterministic`: a row's linear output and a query's attention
output are bitwise the same whatever else shares the call (row count, row position, chunk split)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from autoglm.gguf.quants import quantize
from autoglm.kernels.cpu import cpu_kernels
from autoglm.kernels.cpu.ops import CpuKernels
from autoglm.layers.attention import AttentionContext, CpuFusedBackend, TorchRefBackend
from autoglm.layers.attention.layer import Attention
from autoglm.layers.linear.batch_invariant import TILE_ROWS, fixed_tiles, set_batch_invariant
from autoglm.layers.linear.dense import Linear
from autoglm.layers.linear.gguf import GGUFEmbedding, GGUFLinear, prepare_weights

Q = GGMLQuantizationType
ROW_COUNTS = (1, 2, 7, 16, 17, 33, 100)


@pytest.fixture(scope="module")
def gk() -> CpuKernels:
    k = cpu_kernels()
    assert k is not None, "the C++ kernels must build on the test machine (g++ and ninja are installed)"
    return k


def _rows_alone_equal_rows_together(fn, x: torch.Tensor) -> None:
    """fn(x[:m])[:k] == fn(x[i:i+1]) for every m and row i < m (bitwise), and rows moved to other positions."""
    alone = torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])
    for m in ROW_COUNTS:
        assert torch.equal(fn(x[:m]), alone[:m]), f"{m} rows together differ from each row alone"
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    assert torch.equal(fn(x[perm]), alone[perm]), "a row's result depends on its position"


def _gguf_linear(qtype: Q, rows: int, cols: int, impl, seed: int = 0) -> GGUFLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).numpy()
    return GGUFLinear.from_raw(torch.from_numpy(quantize(w, qtype)), qtype, (rows, cols), impl=impl)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0])
@pytest.mark.parametrize("packed", [False, True])
def test_gguf_linear_rows_independent_at_every_m(gk: CpuKernels, qtype: Q, packed: bool) -> None:
    lin = _gguf_linear(qtype, 96, 512, gk)
    if packed and not prepare_weights(lin):
        pytest.skip("this CPU's kernels have no packed layout (no AVX512-VNNI)")
    set_batch_invariant(lin)
    x = torch.randn(100, 512, generator=torch.Generator().manual_seed(2))
    _rows_alone_equal_rows_together(lin, x)


def test_gguf_default_path_is_the_kernel_up_to_gemv_rows(gk: CpuKernels) -> None:
    """Without the switch, M > GEMV_MAX_ROWS takes the dequantize + GEMM route (why the switch exists); with it the
    same rows equal the decode kernel's, row by row."""
    lin = _gguf_linear(Q.Q4_K, 64, 256, gk)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(3))
    decode = torch.cat([lin(x[i : i + 1]) for i in range(40)])
    set_batch_invariant(lin)
    assert torch.equal(lin(x), decode)
    set_batch_invariant(lin, False)
    assert not lin.batch_invariant


def test_tied_logits_rows_independent(gk: CpuKernels) -> None:
    g = torch.Generator().manual_seed(4)
    table = torch.randn(300, 256, generator=g).numpy()
    emb = GGUFEmbedding.from_raw(torch.from_numpy(quantize(table, Q.Q6_K)), Q.Q6_K, (300, 256), impl=gk)
    set_batch_invariant(emb)
    _rows_alone_equal_rows_together(emb.as_logits, torch.randn(100, 256, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_linear_fixed_tiles(dtype: torch.dtype) -> None:
    lin = Linear(192, 160, bias=True)
    torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(5))
    torch.nn.init.normal_(lin.bias, generator=torch.Generator().manual_seed(6))
    lin = lin.to(dtype)
    set_batch_invariant(lin)
    x = torch.randn(100, 192, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.inference_mode():
        _rows_alone_equal_rows_together(lin, x)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        assert torch.allclose(lin(x).float(), ref.float(), rtol=tol, atol=tol)


def test_fixed_tiles_shapes() -> None:
    calls: list[int] = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        return t * 2

    x = torch.randn(2, 35, 3)
    assert torch.equal(fixed_tiles(fn, x), x * 2)
    assert set(calls) == {TILE_ROWS}
    assert fixed_tiles(fn, torch.randn(0, 3)).shape == (0, 3)


# --- attention ----------------------------------------------------------------------------------------------------
def _backend(kind: str, gk: CpuKernels, layer: Attention, blocks: int, bs: int):
    if kind == "cpu":
        return CpuFusedBackend([layer], gk, num_blocks=blocks, block_size=bs, dtype=torch.float32, batch_invariant=True)
    return TorchRefBackend([layer], num_blocks=blocks, block_size=bs, dtype=torch.float32, batch_invariant=True)


@pytest.mark.parametrize("kind", ["cpu", "torch"])
@pytest.mark.parametrize("window", [None, 5])
def test_attention_same_per_query_whatever_the_split(gk: CpuKernels, kind: str, window: int | None) -> None:
    """A 23-token sequence prefilled whole, in chunks of 8, or token by token, beside another sequence or alone:
    each query's output is bitwise the same."""
    layer = Attention(4, 2, 64, 0.125, sliding_window=window)
    n, bs = 23, 4
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(n, h, 64, generator=g) for h in (4, 2, 2))
    other = [torch.randn(9, h, 64, generator=g) for h in (4, 2, 2)]
    table = torch.tensor([[5, 1, 7, 2, 9, 3]])  # not consecutive: spans are gathered
    other_table = torch.tensor([[11, 12, 13, 0, 0, 0]])

    def run(splits: list[int], with_other: bool) -> torch.Tensor:
        be = _backend(kind, gk, layer, 16, bs)
        outs, done = [], 0
        for s in splits:
            qs, ks, vs = q[done : done + s], k[done : done + s], v[done : done + s]
            slots = [int(table[0, p // bs]) * bs + p % bs for p in range(done, done + s)]
            ql, cl, tables = [s], [done + s], table
            if with_other:
                qs, ks, vs = (torch.cat([a, b]) for a, b in zip((qs, ks, vs), other, strict=True))
                slots += [int(other_table[0, p // bs]) * bs + p % bs for p in range(9)]
                ql, cl, tables = [s, 9], [done + s, 9], torch.cat([table, other_table])
            ctx = AttentionContext(ql, cl, torch.tensor(slots), tables, be)
            be.prepare(ctx)
            outs.append(be.forward(qs, ks, vs, layer, ctx)[:s])
            done += s
        return torch.cat(outs)

    whole = run([n], False)
    assert torch.equal(run([8, 8, 7], False), whole)
    assert torch.equal(run([1] * n, False), whole)
    assert torch.equal(run([n], True), whole)
    assert torch.equal(run([15, 8], True), whole)
    # and it is attention: equal to the causal reference within float32 summation order
    from autoglm.layers.attention.torch_ref import causal_attention

    assert torch.allclose(whole, causal_attention(layer, q, k, v), rtol=1e-4, atol=1e-5)




# --- the switch reaches the engine ---------------------------------------------------------------------------------
def test_deterministic_flag_and_env_reach_the_engine_config() -> None:
    import argparse

    from autoglm.config import EngineConfig
    from autoglm.server.config import ServerConfig, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert ServerConfig.from_sources(vars(parser.parse_args(["--deterministic"])), environ={}).deterministic
    assert ServerConfig.from_sources({}, environ={"AUTOGLM_DETERMINISTIC": "1"}).deterministic
    assert not ServerConfig.from_sources({}, environ={}).deterministic
    assert EngineConfig.from_sources({}, env={"AUTOGLM_DETERMINISTIC": "true"}).deterministic
    assert not EngineConfig().deterministic  # opt-in (BENCHMARKS.md "Deterministic greedy (issue 11)")
