"""The decode path's fused CPU helpers and attention fast paths equal the plain torch composition.

Kernels (`autoglm/kernels/cpu/csrc/norm_ops.cpp`, `attention.cpp`): rms_norm, add_rms_norm, norm_rope,
attend_decode — each, through modules bound to `CpuKernels`, against the same modules on the reference kernels.
Attention: the cache-view, gathered-block and batched decode paths of both backends (`TorchRefBackend`,
`CpuFusedBackend`) against attention over the whole sequence. Models: a tiny Gemma 3 bound to the CPU kernels, decoding
through the fused backend's paged cache, matches transformers' logits (tests/models cover the reference path).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoglm.kernels import REFERENCE, bind_kernels
from autoglm.kernels.cpu import cpu_kernels
from autoglm.kernels.cpu.ops import CpuKernels
from autoglm.layers.attention import (
    Attention,
    AttentionBackend,
    AttentionContext,
    CpuFusedBackend,
    TorchRefBackend,
    make_backend,
)
from autoglm.layers.attention.torch_ref import causal_attention
from autoglm.layers.norm import GemmaRMSNorm, RMSNorm, add_norm
from autoglm.layers.rotary import RotaryEmbedding, apply_rope, rope_tables


@pytest.fixture(scope="module")
def gk() -> CpuKernels:
    k = cpu_kernels()
    assert k is not None, "the C++ kernels must build on the test machine (g++ and ninja are installed)"
    return k


@pytest.fixture(scope="module")
def ext(gk: CpuKernels) -> Any:
    return gk.ext


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def isa_ext(request: pytest.FixtureRequest, gk: CpuKernels) -> Any:
    """The kernels of each build: AVX-512 (where this CPU has it), AVX2 and the scalar fallback each have their own
    attention score, softmax and value loops and their own silu."""
    if request.param == "native":
        return gk.ext
    k = cpu_kernels(request.param)
    assert k is not None, f"the {request.param} variant must build on the test machine"
    return k.ext


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(1, 8960), (3, 37), (2, 5, 16), (1, 7), (6, 4099)])
def test_silu_mul_kernel(isa_ext: Any, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    gate, up = torch.randn(shape, generator=g) * 6, torch.randn(shape, generator=g)
    want = F.silu(gate) * up
    gate_copy = gate.clone()
    got = isa_ext.silu_mul_(gate_copy, up)
    assert got.data_ptr() == gate_copy.data_ptr()  # in place on the gate projection
    _close(got, want, tol=1e-6)
    # each row alone (another tail, another split across threads) gives the same bits
    rows = gate.reshape(-1, shape[-1])
    for i in range(rows.shape[0]):
        one = isa_ext.silu_mul_(rows[i : i + 1].clone(), up.reshape(-1, shape[-1])[i : i + 1])
        assert torch.equal(one, got.reshape(-1, shape[-1])[i : i + 1])


def test_silu_mul_kernel_at_extremes(isa_ext: Any) -> None:
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, 20.0, -20.0, 87.0, -87.0, 100.0, -100.0, 1e30, -1e30, 3e38])
    x = x.repeat(3)  # vector lanes and the tail
    got = isa_ext.silu_mul_(x.clone(), torch.ones_like(x))
    _close(got, F.silu(x), tol=1e-6)
    assert torch.isfinite(got).all()
    special = torch.tensor([float("inf"), float("nan")] * 9)
    out = isa_ext.silu_mul_(special.clone(), torch.ones_like(special))
    assert torch.equal(out.isnan(), special.isnan()) and (out[~special.isnan()] == float("inf")).all()


def test_silu_mul_dispatch(gk: CpuKernels) -> None:
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    _close(gk.silu_mul(gate.clone(), up), F.silu(gate) * up, tol=1e-6)
    # other dtypes and strided gates take the reference, bitwise torch's
    bf = gk.silu_mul(gate.bfloat16(), up.bfloat16())
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, F.silu(gate.bfloat16()) * up.bfloat16())
    strided = gate.t()
    assert torch.equal(gk.silu_mul(strided, up.t()), F.silu(strided) * up.t())


@pytest.mark.parametrize("cls", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("dim", [640, 48, 7])
def test_norms_and_residual_step(gk: CpuKernels, cls: type, dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    post, pre = cls(dim, 1e-6), cls(dim, 1e-6)
    with torch.no_grad():
        post.weight.copy_(torch.randn(dim, generator=g))
        pre.weight.copy_(torch.randn(dim, generator=g))
    h, y = torch.randn(5, dim, generator=g), torch.randn(5, dim, generator=g) * 3
    with torch.inference_mode():
        ref = (post(y), *add_norm(h, y, post, pre), add_norm(h, y, post)[0])  # never bound: the reference
        assert bind_kernels(nn.ModuleList([post, pre]), gk) == 2
        got = (post(y), *add_norm(h, y, post, pre), add_norm(h, y, post)[0])
        # bfloat16 inputs have no C++ kernel: the bound modules hand them to the reference, exactly
        hb, yb = h.bfloat16(), y.bfloat16()
        assert torch.equal(
            add_norm(hb, yb, post, pre)[1],
            REFERENCE.add_rms_norm(hb, yb, post.weight, pre.weight, post.eps, post.offset)[1],
        )
    for a, b in zip(got, ref, strict=True):
        assert a is not None and b is not None
        _close(a, b)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize(("rotary_dim", "head_dim"), [(64, 128), (256, 256), (8, 16)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_norm_rope(gk: CpuKernels, interleaved: bool, rotary_dim: int, head_dim: int, with_norm: bool) -> None:
    g = torch.Generator().manual_seed(rotary_dim + head_dim)
    rope = RotaryEmbedding(rotary_dim, 10_000.0, interleaved=interleaved)
    ref_tables = rope.tables(torch.tensor([0, 5, 511]), torch.float32, head_dim)
    x = torch.randn(3, 4, head_dim, generator=g)
    norm = GemmaRMSNorm(head_dim) if with_norm else None
    if norm is not None:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(head_dim, generator=g))
    with torch.inference_mode():
        ref = apply_rope(norm(x) if norm is not None else x, ref_tables)
        bind_kernels(nn.ModuleList([rope] + ([norm] if norm is not None else [])), gk)
        tables = rope.tables(torch.tensor([0, 5, 511]), torch.float32, head_dim)
        assert tables.kernels is gk and ref_tables.kernels is REFERENCE
        got = apply_rope(x, tables, norm)
        # and the table form equals the classic pairwise rotation
        cos, sin = rope.cos_sin(torch.tensor([0, 5, 511]), torch.float32)
        classic = rope.apply(norm(x) if norm is not None else x, cos, sin)
    _close(got, ref)
    _close(ref, classic)


def test_rope_tables_pass_through_dims_unchanged() -> None:
    ang = torch.rand(2, 4)
    t = rope_tables(ang.cos(), ang.sin(), 12, interleaved=True)
    x = torch.randn(2, 3, 12)
    assert torch.equal(apply_rope(x, t)[..., 8:], x[..., 8:])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q [H, D], k/v [n, KV, D] -> [H, D] by torch's reference attention
    h, kv = q.shape[0], k.shape[1]
    kk = k.float().repeat_interleave(h // kv, dim=1).transpose(0, 1)  # [H, n, D]
    vv = v.float().repeat_interleave(h // kv, dim=1).transpose(0, 1)
    return F.scaled_dot_product_attention(q[:, None], kk, vv, scale=scale)[:, 0]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    # 2, 4, 5, 6, 7, 8 heads per KV head: every grouping of the score and value loops
    [(4, 1, 256), (8, 2, 128), (10, 2, 64), (4, 2, 48), (12, 2, 128), (14, 2, 64), (16, 2, 128)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attend_decode_kernel(isa_ext: Any, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(heads * head_dim)
    cache_k = torch.randn(300, kv_heads, head_dim, generator=g).to(dtype)
    cache_v = torch.randn(300, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(heads, head_dim, generator=g)
    for lo, hi in [(0, 1), (17, 250), (0, 300)]:  # views into a bigger cache, as the decode path passes them
        k, v = cache_k[lo:hi], cache_v[lo:hi]
        _close(isa_ext.attend_decode(q, k, v, 0.125), _sdpa(q, k, v, 0.125), tol=2e-5)
    strided_k = torch.randn(40, kv_heads, 2 * head_dim, generator=g)[..., :head_dim].to(dtype)
    strided_v = torch.randn(40, kv_heads, 2 * head_dim, generator=g)[..., :head_dim].to(dtype)
    _close(isa_ext.attend_decode(q, strided_k, strided_v, 0.3), _sdpa(q, strided_k, strided_v, 0.3), tol=2e-5)


@pytest.mark.parametrize(("heads", "kv_heads"), [(12, 2), (8, 4), (6, 3), (4, 1)])
def test_attend_decode_is_bitwise_the_same_at_any_thread_count(isa_ext: Any, heads: int, kv_heads: int) -> None:
    # at 2 threads a long span with an even number of KV heads runs a KV head per thread (scores, softmax and
    # values in one region); at 1 thread, and for 3 or 1 KV heads, keys and value columns are split instead: the
    # same arithmetic per head either way
    g = torch.Generator().manual_seed(heads)
    k, v = torch.randn(2, 150, kv_heads, 128, generator=g)
    q = torch.randn(heads, 128, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = isa_ext.attend_decode(q, k, v, 0.09)
        torch.set_num_threads(2)
        two = isa_ext.attend_decode(q, k, v, 0.09)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    _close(two, _sdpa(q, k, v, 0.09), tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attend_decode_paged_equals_the_gathered_span(isa_ext: Any, dtype: torch.dtype) -> None:
    # the batched paged kernel reads each sequence's blocks in place: bitwise what attend_decode computes on the
    # gathered span (same arithmetic), for one sequence (parallel inside) and several (a sequence per thread)
    g = torch.Generator().manual_seed(3)
    blocks, bs, kv, d, h = 12, 4, 2, 64, 8
    kc = torch.randn(blocks, bs, kv, d, generator=g).to(dtype)
    vc = torch.randn(blocks, bs, kv, d, generator=g).to(dtype)
    tables = torch.tensor([[5, 1, 9, 0], [7, 3, 2, 11], [4, 4, 4, 4]])
    lo, hi = torch.tensor([0, 3, 0]), torch.tensor([13, 16, 2])  # sequence 1: a sliding-window tail
    q = torch.randn(3, h, d, generator=g)
    want = []
    for b in range(3):
        rows = torch.cat([kc[i] for i in tables[b]]), torch.cat([vc[i] for i in tables[b]])
        want.append(isa_ext.attend_decode(q[b], rows[0][lo[b] : hi[b]], rows[1][lo[b] : hi[b]], 0.125))
    got = isa_ext.attend_decode_paged(q, kc, vc, tables, lo, hi, 0.125)
    assert torch.equal(got, torch.stack(want))
    assert torch.equal(isa_ext.attend_decode_paged(q[:1], kc, vc, tables[:1], lo[:1], hi[:1], 0.125), want[0][None])
    with pytest.raises(RuntimeError, match="block id out of range"):
        isa_ext.attend_decode_paged(q[:1], kc, vc, torch.tensor([[blocks, 0, 0, 0]]), lo[:1], hi[:1], 0.125)


def _decode_case(
    attn: Attention, kernels: CpuKernels | None, lens: list[int], tables: list[list[int]], block_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill each sequence's cache through the cached prefill path, then one decode step; -> (decode out, reference)."""
    g = torch.Generator().manual_seed(seed)
    h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    nblocks = max(max(t) for t in tables) + 1
    shape = {"num_blocks": nblocks, "block_size": block_size, "dtype": torch.float32}
    backend: AttentionBackend = (
        TorchRefBackend([attn], **shape) if kernels is None else CpuFusedBackend([attn], kernels, **shape)
    )
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])
    qs, ks, vs = [], [], []
    for i, n in enumerate(lens):
        q, k, v = (
            torch.randn(n, h, d, generator=g),
            torch.randn(n, kv, d, generator=g),
            torch.randn(n, kv, d, generator=g),
        )
        slots = torch.tensor([tables[i][j // block_size] * block_size + j % block_size for j in range(n)])
        attn(
            q[:-1],
            k[:-1],
            v[:-1],
            AttentionContext([n - 1], [n - 1], slot_mapping=slots[:-1], block_tables=bt[i : i + 1], backend=backend),
        )
        qs.append(q)
        ks.append(k)
        vs.append(v)
    last = [n - 1 for n in lens]
    slots = torch.tensor([tables[i][p // block_size] * block_size + p % block_size for i, p in enumerate(last)])
    ctx = AttentionContext([1] * len(lens), list(lens), slot_mapping=slots, block_tables=bt, backend=backend)
    backend.prepare(ctx)
    out = attn(
        torch.stack([q[-1] for q in qs]), torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs]), ctx
    )
    ref = torch.stack([causal_attention(attn, q, k, v)[-1] for q, k, v in zip(qs, ks, vs, strict=True)])
    return out, ref


@pytest.mark.parametrize("use_fused", [False, True])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(
    ("lens", "tables"),
    [
        ([11], [[3, 4, 5]]),  # consecutive blocks: the cache-view path
        ([11], [[5, 1, 3]]),  # scattered blocks: gathered
        ([11, 4, 9], [[0, 1, 2], [7], [5, 3, 4]]),  # batched decode, mixed lengths
    ],
)
def test_decode_paths_equal_full_attention(
    gk: CpuKernels, use_fused: bool, window: int | None, lens: list[int], tables: list[list[int]]
) -> None:
    attn = Attention(4, 2, 64, scale=0.125, sliding_window=window)
    with torch.inference_mode():
        out, ref = _decode_case(attn, gk if use_fused else None, lens, tables, block_size=4, seed=len(lens))
    _close(out, ref, tol=2e-5)


def test_make_backend_follows_the_bound_kernels(gk: CpuKernels) -> None:
    layers = [Attention(4, 2, 16, scale=0.25), Attention(4, 2, 16, scale=0.25, sliding_window=3)]
    shape = {"num_blocks": 3, "block_size": 4, "dtype": torch.float16}
    ref = make_backend(layers, **shape)
    assert type(ref) is TorchRefBackend and ref.kv_cache(layers[1])[0].shape == (3, 4, 2, 16)
    assert all(not hasattr(m, "k_cache") for m in layers)  # the backend owns the cache, not the modules
    bind_kernels(nn.ModuleList(layers), gk)
    fused = make_backend(layers, **shape)
    assert isinstance(fused, CpuFusedBackend) and fused.kv_cache(layers[0])[1].dtype == torch.float16
    fused.release()
    with pytest.raises(KeyError):
        fused.kv_cache(layers[0])
    with pytest.raises(ValueError, match="backend"):  # a cached step without the backend that owns the cache
        layers[0](*(torch.randn(1, n, 16) for n in (4, 2, 2)), AttentionContext([1], [1], torch.tensor([0])))


def test_gemma3_decode_with_fused_ops_matches_transformers(gk: CpuKernels) -> None:
    pytest.importorskip("transformers")
    from tests.models.test_gemma3_parity import _hf_model, _ours

    hf = _hf_model("mixed")
    ours = _ours(hf)
    assert bind_kernels(ours, gk) > 0
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(5))
    block_size = 4
    table = torch.tensor([[2, 0, 5, 1, 3]])  # scattered on purpose
    layers = [m for m in ours.modules() if isinstance(m, Attention)]
    backend = make_backend(layers, num_blocks=6, block_size=block_size, dtype=torch.float32)
    assert isinstance(backend, CpuFusedBackend)

    def slots(pos: torch.Tensor) -> torch.Tensor:
        return table[0, pos // block_size] * block_size + pos % block_size

    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
        pos = torch.arange(12)
        ctx = AttentionContext([12], [12], slots(pos), table, backend=backend)
        got = [ours.compute_logits(ours(ids[:12], pos, ctx))]
        for p in range(12, 20):
            pt = torch.tensor([p])
            ctx = AttentionContext([1], [p + 1], slots(pt), table, backend=backend)
            backend.prepare(ctx)
            got.append(ours.compute_logits(ours(ids[p : p + 1], pt, ctx)))
    err = (torch.cat(got) - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


def test_a_gguf_load_does_not_change_another_models_numerics(gk: CpuKernels, tmp_path: Any) -> None:
    # the old process-wide switch made every float32 CPU model run the C++ ops after any GGUF load
    pytest.importorskip("transformers")
    from gguf import GGMLQuantizationType

    from autoglm.layers.linear.gguf import GGUFLinear
    from autoglm.loader.gguf import load_gguf
    from tests.fixtures.gguf import gemma3_to_gguf
    from tests.models.test_gemma3_parity import _hf_model, _ours

    hf = _hf_model("mixed")
    ours = _ours(hf)
    ids = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(6))

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return ours.compute_logits(ours(ids, torch.arange(9), AttentionContext.no_cache([9])))

    before = logits()
    gguf_model = load_gguf(gemma3_to_gguf(hf, tmp_path / "tiny.gguf", GGMLQuantizationType.Q8_0)).decoder
    quantized = [m for m in gguf_model.modules() if isinstance(m, GGUFLinear)]
    assert quantized and all(isinstance(m.impl, CpuKernels) for m in quantized)
    assert all(isinstance(m.kernels, CpuKernels) for m in gguf_model.modules() if isinstance(m, GemmaRMSNorm))
    assert all(m.kernels is REFERENCE for m in ours.modules() if isinstance(m, GemmaRMSNorm | Attention))
    assert torch.equal(logits(), before)  # bitwise: the torch model kept the torch ops
