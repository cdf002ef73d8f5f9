"""The kernel interface: one object holds every op a model's hot path can hand to a faster implementation.

Chosen once per model (gpt-fast style), never switched for the whole process:
- linear layers over GGUF blocks take it at construction: `GGUFLinear(..., impl=kernels)` / `GGUFEmbedding`;
- norms, rotary and attention modules receive it through `bind_kernels(model, kernels)`, which a loader calls once
  per model. They implement `UsesKernels`: a typed Protocol, so binding finds its targets by type, not by sniffing
  attributes. A module never bound keeps `REFERENCE` (plain torch ops, `autoglm.kernels.reference`).
Two models in one process may hold different kernels; a model loaded later never changes an earlier one's numerics.

Implementations: `autoglm.kernels.reference.TorchKernels` (torch compositions, every device and dtype) and
`autoglm.kernels.cpu.ops.CpuKernels` (JIT-built C++ for float32 CPU tensors; anything else is delegated to the
reference). Every op of an implementation must equal the reference up to float32 summation order, except the
documented activation rounding of the int8 decode GEMV (`CpuKernels` docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from gguf import GGMLQuantizationType
from torch import Tensor, nn


class GGUFBlockFormat(Protocol):
    """How a [rows, cols] weight is stored as GGUF blocks (`autoglm.layers.linear.gguf.GGUFBlockFormat`), with its
    reference arithmetic for weights in file order."""

    @property
    def qtype(self) -> GGMLQuantizationType: ...
    @property
    def rows(self) -> int: ...
    @property
    def cols(self) -> int: ...
    @property
    def packed(self) -> bool: ...

    def unpacked(self, rows: int | None = None) -> GGUFBlockFormat:
        """This format in file order (optionally for `rows` rows)."""
        ...

    def take_rows(self, raw: Tensor, ids: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor: ...

    def matmul(self, x: Tensor, raw: Tensor, bias: Tensor | None = None) -> Tensor: ...


# Direct decode matmul: x [M, in] float32 contiguous (M <= its max rows), raw blocks, GGML type id -> [M, out] float32
GemvKernel = Callable[[Tensor, Tensor, int], Tensor]


class AttentionShape(Protocol):
    """The geometry `decode_layers` reads of an attention module (`autoglm.layers.attention.Attention`)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None


class DecoderLayerModules(NamedTuple):
    """The modules of one LLaMA-family pre-norm decoder layer, as `Kernels.decode_layers` reads them."""

    linears: tuple[nn.Module, ...]  # q, k, v, o, gate, up, down
    input_norm: nn.Module
    post_norm: nn.Module
    q_norm: nn.Module | None  # Qwen3's per-head norms
    k_norm: nn.Module | None
    attn: AttentionShape


class PagedDecodeKV(NamedTuple):
    """Every layer's paged cache for a decode step, as an attention backend hands it to `Kernels.decode_layers`:
    where the step's K/V rows go (`slots` [B]) and the cache positions lo[b] <= j < hi[b] each sequence sees."""

    k_caches: list[Tensor]  # per layer [blocks, block_size, KV, D]
    v_caches: list[Tensor]
    slots: Tensor  # [B] int64
    block_tables: Tensor  # [B, max_blocks] int64
    lo: Tensor  # [B] int64
    hi: Tensor  # [B] int64


class RopeOperands(NamedTuple):
    """A step's whole-head rotary tables (`autoglm.layers.rotary.RopeTables` without its partner index)."""

    cos: Tensor  # [T, 1, D]
    sin: Tensor  # [T, 1, D]
    rotary_dim: int
    interleaved: bool


class DecodeStack(Protocol):
    """A stack of decoder layers' operands, read once by `Kernels.decode_stack` for that object's
    `decode_layers`: valid while the modules keep their weights, norms and kernels."""

    @property
    def kernels(self) -> Kernels:
        """The implementation that read it (only its decode_layers runs it)."""
        ...

    @property
    def attn(self) -> Sequence[AttentionShape]:
        """Each layer's attention, in order (the backend finds its caches by these)."""
        ...


class Kernels(Protocol):
    """Ops over GGUF blocks, norms, rotary and decode attention. Shapes: T tokens, H heads, D head dim."""

    name: str  # "reference", "cpu" (logged by the loader, shown in tests' ids)
    fused_decode_attention: bool  # decode attention has kernels: `make_backend` picks the fused backend

    # --- GGUF block matmuls ------------------------------------------------------------------------------------
    def matmul(self, x: Tensor, raw: Tensor, fmt: GGUFBlockFormat, bias: Tensor | None = None) -> Tensor:
        """x [..., cols] @ W.T (+ bias) -> [..., rows] in x's dtype; W is `raw` read as `fmt` (bounded memory)."""
        ...

    def take_rows(self, raw: Tensor, fmt: GGUFBlockFormat, ids: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Rows `ids` ([N] long, all when None) of W dequantized: [N, cols] in `dtype`."""
        ...

    def direct_gemv(self, fmt: GGUFBlockFormat) -> tuple[GemvKernel, int] | None:
        """(kernel, max rows) that `GGUFLinear.forward` may call directly for float32 CPU decode, or None.

        It must return what `matmul` returns for those inputs (it only skips the Python routing)."""
        ...

    def can_pack(self, fmt: GGUFBlockFormat) -> bool:
        """Whether `pack` would rearrange a weight of `fmt` into this implementation's faster layout."""
        ...

    def pack(self, raw: Tensor, fmt: GGUFBlockFormat) -> Tensor:
        """raw [rows, row_bytes] in file order -> the packed layout (same bytes, other order)."""
        ...

    # --- norms and rotary --------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, offset: float) -> Tensor:
        """x [..., D] -> rms_norm(x) * (offset + weight): offset 0 casts before scaling (GLM), 1 scales in float32
        (Gemma)."""
        ...

    def silu_mul(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up (the gated MLP's activation; same shapes). May write into `gate`'s storage: the caller
        passes a fresh projection output and reads only the result."""
        ...

    def add_rms_norm(
        self, h: Tensor, y: Tensor, post: Tensor, pre: Tensor | None, eps: float, offset: float
    ) -> tuple[Tensor, Tensor | None]:
        """h + rms_norm(y) * (offset + post), and that sum's rms_norm * (offset + pre) when `pre` is given."""
        ...

    def norm_rope(
        self,
        x: Tensor,
        weight: Tensor | None,
        eps: float,
        offset: float,
        cos: Tensor,
        sin: Tensor,
        perm: Tensor,
        rotary_dim: int,
        interleaved: bool,
    ) -> Tensor:
        """x [T, H, D] -> per-head rms_norm (if `weight`) rotated: out = x * cos + x[..., perm] * sin."""
        ...

    # --- decode attention --------------------------------------------------------------------------------------
    def attend_decode(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """One query per head over every given key: q [H, D] or [1, H, D], k/v [n, KV, D] -> q's shape."""
        ...

    def attend_decode_paged(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lo: Tensor, hi: Tensor, scale: float
    ) -> Tensor | None:
        """q [B, H, D]; caches [blocks, block_size, KV, D]; sequence b sees cache positions lo[b] <= j < hi[b] of
        its block table -> [B, H, D], or None when this implementation has no kernel for these inputs."""
        ...

    # --- a stack of decoder layers ----------------------------------------------------------------------------
    def decode_stack(self, layers: Sequence[DecoderLayerModules]) -> DecodeStack | None:
        """The operands `decode_layers` runs for these layers, read from the modules now; None when this
        implementation has no one-call kernel for them (the caller runs the modules)."""
        ...

    def decode_layers(self, h: Tensor, stack: DecodeStack, rope: RopeOperands, kv: PagedDecodeKV) -> Tensor | None:
        """LLaMA-family pre-norm layers for a decode step in one call: h [B, D] -> for each layer h + attn(norm(h)),
        then + mlp(norm(.)) ([B, D]), storing the step's K/V at `kv.slots`. Must equal the modules' own forward
        bitwise; None when this implementation cannot run these inputs (the caller runs the modules)."""
        ...


@runtime_checkable
class UsesKernels(Protocol):
    """A module whose forward runs ops from a `Kernels` object (norms, rotary, attention)."""

    def use_kernels(self, kernels: Kernels) -> None:
        """Run this module's ops with `kernels` from now on."""
        ...


def bind_kernels(model: nn.Module, kernels: Kernels) -> int:
    """Give `kernels` to every `UsesKernels` module of `model` (a loader calls this once per model, after filling
    its weights); returns how many modules took them. Linear layers are not touched: they got theirs at
    construction."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, UsesKernels):
            mod.use_kernels(kernels)
            n += 1
    return n
