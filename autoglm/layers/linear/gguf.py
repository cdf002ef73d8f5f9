"""Linear and embedding layers whose weights stay in GGUF block format in memory.

The module owns the raw blocks as a uint8 buffer named `weight` ([rows, row_bytes], exactly the bytes of the file
(or, once `prepare_weights` packed it for its kernels, the same bytes rearranged: `GGUFBlockFormat.packed`),
possibly a view of its mmap), so a loader fills it by the usual HF name (`...down_proj.weight`) and `.nbytes` is
what the file holds. `GGUFBlockFormat` is the format and its reference arithmetic; each module computes with the
`Kernels` object it was constructed with (`impl=`, default the torch reference): the loader chooses it once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor, nn

from autoglm.errors import WeightMismatch
from autoglm.gguf.blocks import as_byte_tensor, block_layout, check_type, dequantize_blocks, row_nbytes
from autoglm.kernels.base import GemvKernel, Kernels
from autoglm.kernels.reference import REFERENCE
from autoglm.layers.linear.batch_invariant import fixed_tiles

# matmul dequantizes at most this many weight elements at a time, so a 150k-row lm_head never gets a float copy
_MATMUL_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class GGUFBlockFormat:
    """How to read a [rows, cols] weight stored as GGUF blocks: `qtype` plus the logical (torch-order) shape."""

    qtype: GGMLQuantizationType
    rows: int
    cols: int
    packed: bool = False  # blocks rearranged by the module's kernels (`prepare_weights`); same bytes, other order

    @property
    def row_bytes(self) -> int:
        return row_nbytes(self.qtype, self.cols)

    @property
    def raw_shape(self) -> tuple[int, int]:
        return (self.rows, self.row_bytes)

    def unpacked(self, rows: int | None = None) -> GGUFBlockFormat:
        """This format in file order (for rows a kernel has unpacked), optionally for `rows` rows."""
        return replace(self, packed=False, rows=self.rows if rows is None else rows)

    def dequantize(self, raw: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """raw [rows, row_bytes] -> [rows, cols] in `dtype` (a transient float copy: callers should not keep it)."""
        return self.take_rows(raw, None, dtype)

    def take_rows(self, raw: Tensor, ids: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows `ids` ([N] long, all when None) of the weight in file order, dequantized: [N, cols]."""
        self._check_file_order()
        sel = raw if ids is None else raw.index_select(0, ids.reshape(-1))
        ts = block_layout(self.qtype)[1]
        w = dequantize_blocks(sel.reshape(-1, ts), self.qtype).view(sel.shape[0], self.cols)
        return w if dtype == torch.float32 else w.to(dtype)

    def matmul(self, x: Tensor, raw: Tensor, bias: Tensor | None = None) -> Tensor:
        """Reference x [..., cols] @ W.T (+ bias) -> [..., rows], decoding W a slab of rows at a time (bounded
        memory); W in file order."""
        self._check_file_order()
        b = bias.to(x.dtype) if bias is not None else None
        step = max(1, _MATMUL_CHUNK_ELEMENTS // max(1, self.cols))
        if step >= self.rows:
            return F.linear(x, self.dequantize(raw, x.dtype), b)
        out = x.new_empty(*x.shape[:-1], self.rows)
        ts = block_layout(self.qtype)[1]
        for s in range(0, self.rows, step):
            slab = raw[s : s + step]
            w = dequantize_blocks(slab.reshape(-1, ts), self.qtype).view(slab.shape[0], self.cols)
            e = s + slab.shape[0]
            out[..., s:e] = F.linear(x, w.to(x.dtype), b[s:e] if b is not None else None)
        return out

    def _check_file_order(self) -> None:
        if self.packed:
            raise ValueError(f"{self.qtype.name} weight is packed: read it through the kernels that packed it")


def _raw_tensor(raw: Tensor | np.ndarray, fmt: GGUFBlockFormat, name: str) -> Tensor:
    t = as_byte_tensor(raw)
    if t.numel() != fmt.rows * fmt.row_bytes:
        raise WeightMismatch(
            f"tensor {name!r}: {t.numel()} bytes of {fmt.qtype.name}, expected {fmt.rows * fmt.row_bytes} "
            f"for shape [{fmt.rows}, {fmt.cols}]"
        )
    return t.view(fmt.raw_shape)


class GGUFLinear(nn.Module):
    """y = x @ W.T + b with W kept as GGUF blocks (`weight`: uint8 [out_features, row_bytes]).

    Same attributes and forward as `autoglm.layers.linear.Linear`; the bias (if any) is a float parameter.
    `impl` computes the products (default: the torch reference); the loader passes the kernels it chose once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: GGMLQuantizationType | int,
        bias: bool = False,
        *,
        impl: Kernels = REFERENCE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "<linear>",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.impl = impl
        self.weight_format = GGUFBlockFormat(check_type(qtype, name), out_features, in_features)
        self._qid = int(self.weight_format.qtype)  # plain int: enum conversion is slow on the per-token path
        self._direct = impl.direct_gemv(self.weight_format)
        self.batch_invariant = False  # every M through the row-independent path (set_batch_invariant)
        self.register_buffer("weight", torch.empty(self.weight_format.raw_shape, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_raw(
        cls,
        raw: Tensor | np.ndarray,
        qtype: GGMLQuantizationType | int,
        shape: tuple[int, int],
        bias: Tensor | None = None,
        name: str = "<linear>",
        *,
        impl: Kernels = REFERENCE,
    ) -> GGUFLinear:
        """Wrap raw GGUF bytes of a [out, in] weight without copying them (a memmap stays a memmap)."""
        out_f, in_f = int(shape[0]), int(shape[1])
        mod = cls(in_f, out_f, qtype, bias=False, impl=impl, device="meta", name=name)
        mod.weight = _raw_tensor(raw, mod.weight_format, name)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        return mod

    @classmethod
    def replacing(cls, mod: nn.Module, qtype: GGMLQuantizationType | int, *, impl: Kernels, name: str) -> GGUFLinear:
        """An unfilled (meta) GGUFLinear of `mod`'s shape and bias, to take its place before a weight fill."""
        with torch.device("meta"):
            return cls(mod.in_features, mod.out_features, qtype, bias=mod.bias is not None, impl=impl, name=name)

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.weight_format.qtype

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds: the raw blocks plus the bias."""
        b = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.weight.numel() + b

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """A transient float copy of W [out, in] (for tests and conversions; forward does not keep one)."""
        return self.impl.take_rows(self.weight, self.weight_format, None, dtype)

    def adopt_packed(self, packed: Tensor) -> None:
        """Make `packed` (`impl.pack` of this module's weight) the weight: same bytes, the kernels' layout."""
        self.weight = packed
        self.weight_format = replace(self.weight_format, packed=True)
        self._direct = self.impl.direct_gemv(self.weight_format)  # the direct kernel is keyed by the layout

    def decode_operands(self, kernels: Kernels) -> tuple[Tensor, GGUFBlockFormat, int, Tensor | None] | None:
        """(weight, its format, its type id, bias) for `kernels.decode_layers` when this layer computes with
        `kernels`, else None. Read past nn.Module's attribute fallback: a decode step reads ~200 of these."""
        if self.impl is not kernels:
            return None
        return self._buffers["weight"], self.weight_format, self._qid, self._parameters.get("bias")

    def set_batch_invariant(self, enabled: bool) -> None:
        """Compute every row alone, at any M: the fused GEMV (int8 activations per row, each row bitwise independent
        of the others) where the kernels have one, else fixed GEMM tiles. Prefill then runs the decode kernel."""
        self.batch_invariant = enabled

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        fast = self._direct
        if (
            fast is not None
            and x.dim() == 2
            and (x.shape[0] <= fast[1] or self.batch_invariant)
            and x.dtype == torch.float32
            and x.is_cpu
        ):
            # decode: straight to the kernel; the generic route costs ~10 us of Python per call (~1.2 ms a token)
            y = fast[0](x.contiguous(), self.weight, self._qid)  # [M, out]
            return y if self.bias is None else y.add_(self.bias)
        if self.batch_invariant:
            return invariant_matmul(self.impl, self._direct, x, self.weight, self.weight_format, self.bias)
        return self.impl.matmul(x, self.weight, self.weight_format, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={self.qtype.name}, bias={self.bias is not None}, impl={self.impl.name}"
        )


class GGUFEmbedding(nn.Module):
    """Token embedding with the table kept as GGUF blocks (`weight`: uint8 [num_embeddings, row_bytes]).

    `forward(ids)` decodes only the looked-up rows; `as_logits(hidden)` is hidden @ table.T for tied output heads.
    `impl` as for `GGUFLinear`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        qtype: GGMLQuantizationType | int,
        *,
        impl: Kernels = REFERENCE,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        name: str = "<embedding>",
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype  # dtype of the looked-up rows
        self.impl = impl
        self.weight_format = GGUFBlockFormat(check_type(qtype, name), num_embeddings, embedding_dim)
        self.batch_invariant = False  # as_logits row-independent at any M (as GGUFLinear.set_batch_invariant)
        self.register_buffer("weight", torch.empty(self.weight_format.raw_shape, dtype=torch.uint8, device=device))

    @classmethod
    def from_raw(
        cls,
        raw: Tensor | np.ndarray,
        qtype: GGMLQuantizationType | int,
        shape: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        name: str = "<embedding>",
        *,
        impl: Kernels = REFERENCE,
    ) -> GGUFEmbedding:
        """Wrap raw GGUF bytes of a [vocab, dim] table without copying them."""
        mod = cls(int(shape[0]), int(shape[1]), qtype, impl=impl, device="meta", dtype=dtype, name=name)
        mod.weight = _raw_tensor(raw, mod.weight_format, name)
        return mod

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.weight_format.qtype

    @property
    def nbytes(self) -> int:
        return self.weight.numel()

    def adopt_packed(self, packed: Tensor) -> None:
        """As `GGUFLinear.adopt_packed`."""
        self.weight = packed
        self.weight_format = replace(self.weight_format, packed=True)

    def set_batch_invariant(self, enabled: bool) -> None:
        self.batch_invariant = enabled

    def forward(self, input_ids: Tensor) -> Tensor:
        # input_ids: [...] -> [..., dim]
        rows = self.impl.take_rows(self.weight, self.weight_format, input_ids.reshape(-1).long(), self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def as_logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., dim] @ table.T -> [..., vocab] (tied lm_head), decoded a slab at a time."""
        if self.batch_invariant:
            direct = self.impl.direct_gemv(self.weight_format)
            return invariant_matmul(self.impl, direct, hidden, self.weight, self.weight_format, None)
        return self.impl.matmul(hidden, self.weight, self.weight_format)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}, impl={self.impl.name}"


def invariant_matmul(
    impl: Kernels,
    direct: tuple[GemvKernel, int] | None,
    x: Tensor,
    raw: Tensor,
    fmt: GGUFBlockFormat,
    bias: Tensor | None,
) -> Tensor:
    """x [..., cols] @ W.T (+ bias) with each row's result independent of the other rows: the kernels' fused GEMV at
    any M for float32 CPU rows, else `impl.matmul` over fixed row tiles (batch_invariant.py)."""
    if direct is not None and x.dtype == torch.float32 and x.is_cpu:
        x2 = x.reshape(-1, fmt.cols).contiguous()
        y = direct[0](x2, raw, int(fmt.qtype)).reshape(*x.shape[:-1], fmt.rows)
        return y if bias is None else y + bias.to(y.dtype)
    return fixed_tiles(lambda t: impl.matmul(t, raw, fmt, bias), x)


def prepare_weights(model: nn.Module) -> int:
    """Pack every GGUF weight of `model` whose kernels have a faster layout (`Kernels.can_pack`), now; returns how
    many modules were packed (0 on a second call). Modules sharing one tensor (a tied lm_head) share its packed copy.

    An explicit step, run once before serving (the runner calls it when it is built): packing reads each weight's
    file pages once and releases them as the packed copy is written, so peak memory stays near the file size."""
    shared: dict[int, Tensor] = {}  # source data_ptr -> packed tensor
    n = 0
    for mod in model.modules():
        if not isinstance(mod, GGUFLinear | GGUFEmbedding):
            continue
        fmt = mod.weight_format
        if fmt.packed or mod.weight.device.type != "cpu" or not mod.impl.can_pack(fmt):
            continue
        key = mod.weight.data_ptr()
        packed = shared.get(key)
        if packed is None:
            packed = shared[key] = mod.impl.pack(mod.weight, fmt)
        mod.adopt_packed(packed)
        n += 1
    return n
