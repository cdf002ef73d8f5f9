"""Linear and embedding layers whose weights stay in GGUF block format in memory.

The module owns the raw blocks as a uint8 buffer named `weight` ([rows, row_bytes], exactly the bytes of the file
(or, once a kernel backend packed it, the same bytes rearranged: `GGUFBlockFormat.packed`),
possibly a view of its mmap), so a loader fills it by the usual HF name (`...down_proj.weight`) and `.nbytes` is
what the file holds. All arithmetic goes through a `GGUFBlockFormat` (`dequantize`, `matmul`, `rows`): the seam
where fast kernels plug in later (`register_matmul_kernel`), without touching the modules or the models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor, nn

from autoglm.errors import WeightMismatch
from autoglm.quant.gguf_blocks import as_byte_tensor, block_layout, check_type, dequantize_blocks, row_nbytes

# matmul dequantizes at most this many weight elements at a time, so a 150k-row lm_head never gets a float copy
_MATMUL_CHUNK_ELEMENTS = 1 << 24

# x [..., in], raw [out, row_bytes] uint8 -> [..., out]; registered per type by a faster backend
MatmulKernel = Callable[[Tensor, Tensor, "GGUFBlockFormat"], Tensor]
_KERNELS: dict[GGMLQuantizationType, MatmulKernel] = {}


def register_matmul_kernel(qtype: GGMLQuantizationType, kernel: MatmulKernel) -> None:
    """Route `GGUFBlockFormat.matmul` for `qtype` to `kernel` (which must equal x @ dequantize(raw).T)."""
    _KERNELS[GGMLQuantizationType(qtype)] = kernel


# Decode fast path: x [M, in] float32 contiguous (M <= max_rows), raw [out, row_bytes], GGML type id -> [M, out]
# float32. `GGUFLinear.forward` calls it directly: the generic route costs ~10 us of Python per call, which is
# ~1.2 ms per token over a 126-matmul model. It must return what the registered matmul kernel (`owner`) returns, and
# is used only while `owner` is the registered kernel (emptying `_KERNELS` still pins the reference path).
GemvKernel = Callable[[Tensor, Tensor, int], Tensor]
_GEMV: dict[int, tuple[GemvKernel, int, MatmulKernel]] = {}
_PACKED_KEY = 256  # _GEMV key offset of a type's kernel for packed weights

# Packed weights (`GGUFBlockFormat.packed`): a kernel backend may rearrange a module's blocks into its own layout
# (same bytes, other order) on first use. `_UNPACK_ROWS(raw, fmt, ids)` gives rows `ids` back in file order (every
# other reader goes through it); `_PACKER(module)` packs a module marked `_pack_pending`.
UnpackRows = Callable[[Tensor, "GGUFBlockFormat", Tensor], Tensor]
_UNPACK_ROWS: UnpackRows | None = None
_PACKER: Callable[[nn.Module], None] | None = None


def set_packing(packer: Callable[[nn.Module], None], unpack_rows: UnpackRows) -> None:
    """Install the backend that packs modules marked `_pack_pending` and reads packed rows back in file order."""
    global _PACKER, _UNPACK_ROWS
    _PACKER, _UNPACK_ROWS = packer, unpack_rows


def adopt_packed(mod: GGUFLinear | GGUFEmbedding, packed: Tensor) -> None:
    """Make `packed` (the backend's rearrangement of `mod.weight`) the module's weight."""
    mod.weight = packed
    mod.weight_format = replace(mod.weight_format, packed=True)
    if isinstance(mod, GGUFLinear):  # its direct small-M kernel is keyed by type and layout
        mod._gemv_key = int(mod.weight_format.qtype) + _PACKED_KEY
    mod._pack_pending = False


def _pack_if_pending(mod: nn.Module) -> None:
    if mod._pack_pending and _PACKER is not None:
        _PACKER(mod)


def register_gemv_kernel(
    qtype: GGMLQuantizationType,
    kernel: GemvKernel | None,
    max_rows: int = 0,
    owner: MatmulKernel | None = None,
    packed: bool = False,
) -> None:
    """Install (or with None remove) the direct float32 small-M kernel `GGUFLinear.forward` uses for `qtype`
    (weights in file order, or `packed`) while `owner` is its registered matmul kernel."""
    key = int(qtype) + (_PACKED_KEY if packed else 0)
    if kernel is None or owner is None:
        _GEMV.pop(key, None)
    else:
        _GEMV[key] = (kernel, max_rows, owner)


@dataclass(frozen=True)
class GGUFBlockFormat:
    """How to read a [rows, cols] weight stored as GGUF blocks: `qtype` plus the logical (torch-order) shape."""

    qtype: GGMLQuantizationType
    rows: int
    cols: int
    packed: bool = False  # blocks rearranged by a kernel backend (see `set_packing`); same bytes, other order

    @property
    def row_bytes(self) -> int:
        return row_nbytes(self.qtype, self.cols)

    @property
    def raw_shape(self) -> tuple[int, int]:
        return (self.rows, self.row_bytes)

    def dequantize(self, raw: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """raw [rows, row_bytes] -> [rows, cols] in `dtype` (a transient float copy: callers should not keep it)."""
        return self.take_rows(raw, None, dtype)

    def take_rows(self, raw: Tensor, ids: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows `ids` ([N] long) of the weight, dequantized: [N, cols]. Only those rows are decoded."""
        sel = self.take_rows_raw(raw, ids)
        ts = block_layout(self.qtype)[1]
        w = dequantize_blocks(sel.reshape(-1, ts), self.qtype).view(sel.shape[0], self.cols)
        return w if dtype == torch.float32 else w.to(dtype)

    def take_rows_raw(self, raw: Tensor, ids: Tensor | None = None) -> Tensor:
        """Rows `ids` (all when None) of the blocks in file order: [N, row_bytes] uint8."""
        if not self.packed:
            return raw if ids is None else raw.index_select(0, ids.reshape(-1))
        assert _UNPACK_ROWS is not None, "packed weights need their backend's unpack_rows"
        return _UNPACK_ROWS(raw, self, torch.arange(self.rows) if ids is None else ids.reshape(-1))

    def matmul(self, x: Tensor, raw: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [..., cols] @ W.T (+ bias) -> [..., rows], decoding W a slab of rows at a time (bounded memory)."""
        b = bias.to(x.dtype) if bias is not None else None
        kernel = _KERNELS.get(self.qtype)
        if kernel is not None:
            y = kernel(x, raw, self)
            return y + b if b is not None else y
        if self.packed:  # reference path over packed blocks: back to file order first (a transient byte copy)
            return replace(self, packed=False).matmul(x, self.take_rows_raw(raw), bias)
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
    """

    _pack_pending = False  # a kernel backend packs `weight` on first use (`set_packing`)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: GGMLQuantizationType | int,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "<linear>",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_format = GGUFBlockFormat(check_type(qtype, name), out_features, in_features)
        self._qid = int(self.weight_format.qtype)  # plain int key: enum hashing is slow on the per-token path
        self._gemv_key = self._qid
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
    ) -> GGUFLinear:
        """Wrap raw GGUF bytes of a [out, in] weight without copying them (a memmap stays a memmap)."""
        out_f, in_f = int(shape[0]), int(shape[1])
        mod = cls(in_f, out_f, qtype, bias=False, device="meta", name=name)
        mod.weight = _raw_tensor(raw, mod.weight_format, name)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        return mod

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
        return self.weight_format.dequantize(self.weight, dtype)

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        _pack_if_pending(self)
        fast = _GEMV.get(self._gemv_key)
        if (
            fast is not None
            and x.dim() == 2
            and x.shape[0] <= fast[1]
            and x.dtype == torch.float32
            and x.is_cpu
            and _KERNELS.get(self.weight_format.qtype) is fast[2]
        ):
            y = fast[0](x.contiguous(), self.weight, self._qid)  # [M, out] (packed or not, as keyed)
            return y if self.bias is None else y.add_(self.bias)
        return self.weight_format.matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={self.qtype.name}, bias={self.bias is not None}"
        )


class GGUFEmbedding(nn.Module):
    """Token embedding with the table kept as GGUF blocks (`weight`: uint8 [num_embeddings, row_bytes]).

    `forward(ids)` decodes only the looked-up rows; `as_logits(hidden)` is hidden @ table.T for tied output heads.
    """

    _pack_pending = False  # as GGUFLinear

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        qtype: GGMLQuantizationType | int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        name: str = "<embedding>",
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype  # dtype of the looked-up rows
        self.weight_format = GGUFBlockFormat(check_type(qtype, name), num_embeddings, embedding_dim)
        self.register_buffer("weight", torch.empty(self.weight_format.raw_shape, dtype=torch.uint8, device=device))

    @classmethod
    def from_raw(
        cls,
        raw: Tensor | np.ndarray,
        qtype: GGMLQuantizationType | int,
        shape: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        name: str = "<embedding>",
    ) -> GGUFEmbedding:
        """Wrap raw GGUF bytes of a [vocab, dim] table without copying them."""
        mod = cls(int(shape[0]), int(shape[1]), qtype, device="meta", dtype=dtype, name=name)
        mod.weight = _raw_tensor(raw, mod.weight_format, name)
        return mod

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.weight_format.qtype

    @property
    def nbytes(self) -> int:
        return self.weight.numel()

    def forward(self, input_ids: Tensor) -> Tensor:
        # input_ids: [...] -> [..., dim]
        _pack_if_pending(self)
        rows = self.weight_format.take_rows(self.weight, input_ids.reshape(-1).long(), self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def as_logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., dim] @ table.T -> [..., vocab] (tied lm_head), decoded a slab at a time."""
        _pack_if_pending(self)
        return self.weight_format.matmul(hidden, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"
