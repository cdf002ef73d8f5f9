"""INT4 weight-only linear layer: group-wise affine quantization along the input dimension.

Format (gpt-fast / torchao convention, the one `aten._weight_int4pack_mm_for_cpu` computes):
    w[n, g*G + i] ≈ (q[n, g*G + i] - 8) * scale[g, n] + zero[g, n],   q in 0..15, G = group size (32/64/128/256)
On disk (safetensors) a layer is `<name>.qweight` uint8 [out, in/2] (byte j of row n holds q[n, 2j] in its low
nibble and q[n, 2j+1] in its high nibble; portable, independent of torch's kernel layout) +
`<name>.scales_and_zeros` bfloat16 [in/G, out, 2] (+ `<name>.bias`).

Runtime: `prepare()` repacks `qweight` into torch's CPU kernel layout (`weight_packed`) and drops the portable copy,
so memory holds one 4-bit copy; `state_dict()` rebuilds the portable form. Measured (BENCHMARKS.md): the packed
kernel with bfloat16 activations is the fastest path at every batch size on CPU; `_dyn_quant_matmul_4bit` has only a
scalar reference kernel on x86 (KleidiAI is ARM-only) and stores its weights as float32 there, so it is not used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.errors import UnsupportedQuantType
from autoglm.kernels.pages import release_pages

GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 32  # same granularity as GGUF Q4_K sub-blocks; no slower than 128 in the packed kernel
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_UNPACK_ROWS = 512  # identity rows per kernel call when rebuilding the portable form
_PACK_ROWS = 64  # output rows repacked at a time (a multiple of the CPU kernel's 64-row blocks)


def _check(out_features: int, in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise UnsupportedQuantType(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise UnsupportedQuantType(
            f"int4 with group size {group_size} needs in_features divisible by it, got {in_features}"
        )


def quantize_int4(weight: Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """weight [N, K] float -> (qweight uint8 [N, K/2] portable nibbles, scales_and_zeros bfloat16 [K/G, N, 2]).

    Per group: scale = (max - min) / 15 and zero = min + 8 * scale, both rounded to bfloat16 first; q is then
    computed against the rounded values, so |w - dequantize| <= scale / 2 up to that rounding.
    """
    if weight.dim() != 2:
        raise UnsupportedQuantType(f"int4 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    _check(n, k, group_size)
    wg = weight.detach().float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [N, K/G]
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.bfloat16).float()
    zero = (lo + 8.0 * scale).to(torch.bfloat16).float()
    q = torch.round((wg - (zero - 8.0 * scale)[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(n, k)
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K/2]
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
    return qweight.contiguous(), sz


def unpack_nibbles(qweight: Tensor) -> Tensor:
    """Portable uint8 [N, K/2] -> int32 [N, K] values 0..15."""
    n, half = qweight.shape
    q = torch.empty(n, half, 2, dtype=torch.int32, device=qweight.device)
    q[..., 0] = (qweight & 0x0F).to(torch.int32)
    q[..., 1] = (qweight >> 4).to(torch.int32)
    return q.reshape(n, 2 * half)


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """q int [N, K] (0..15) + scales_and_zeros [K/G, N, 2] -> weight [N, K]."""
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/G, 2]
    w = (q.reshape(n, k // group_size, group_size).float() - 8.0) * sz[..., 0:1] + sz[..., 1:2]
    return w.reshape(n, k).to(dtype)


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W group-wise int4 (see the module docstring); a drop-in for `Linear`.

    compute_dtype: activation dtype inside the kernel (bfloat16 default); float32 uses the exact
    dequantize-then-matmul path in float32 (slow reference). The output has the input's dtype.
    """

    format = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        _check(out_features, in_features, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        self.qweight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.scales_and_zeros = nn.Parameter(
            torch.empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16, device=device),
            requires_grad=False,
        )
        self.weight_packed: nn.Parameter | None
        self.register_parameter("weight_packed", None)  # torch's CPU kernel layout, made by prepare()
        fdtype = dtype or torch.float32
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=fdtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Module, *, group_size: int = DEFAULT_GROUP_SIZE, compute_dtype: torch.dtype = torch.bfloat16
    ) -> Int4Linear:
        """Quantize a dense layer (`weight` [out, in], optional `bias`); a `meta` layer gives a `meta` shell."""
        w: Tensor = linear.weight
        bias: Tensor | None = getattr(linear, "bias", None)
        out_f, in_f = w.shape
        mod = cls(
            in_f,
            out_f,
            bias is not None,
            group_size=group_size,
            device=w.device,
            dtype=w.dtype,
            compute_dtype=compute_dtype,
        )
        if w.is_meta:
            return mod
        qweight, sz = quantize_int4(w, group_size)
        mod.qweight = nn.Parameter(qweight, requires_grad=False)
        mod.scales_and_zeros = nn.Parameter(sz, requires_grad=False)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return mod

    # --- runtime packing -------------------------------------------------------------------------------------------
    @property
    def kernel_ok(self) -> bool:
        """torch's packed CPU kernel applies: CPU tensors, out_features % 16 == 0, a half-precision compute dtype."""
        t = self.weight_packed if self.weight_packed is not None else self.qweight
        return (
            t is not None
            and t.device.type == "cpu"
            and self.out_features % 16 == 0
            and self.compute_dtype in _KERNEL_DTYPES
        )

    def prepare(self) -> None:
        """Repack the portable `qweight` into the kernel layout and free it (no-op when done or not applicable)."""
        if self.weight_packed is not None or not self.kernel_ok or self.qweight is None or self.qweight.is_meta:
            return
        qweight = self.qweight
        # row chunks (multiples of the kernel's 64-row blocks) pack to the same bytes as the whole matrix and keep
        # the int32 unpacked transient small (it is 8x the 4-bit weight)
        packed = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
        for start in range(0, self.out_features, _PACK_ROWS):
            stop = min(start + _PACK_ROWS, self.out_features)
            q = unpack_nibbles(qweight[start:stop])
            packed[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.weight_packed = nn.Parameter(packed, requires_grad=False)
        self.qweight = None
        release_pages(qweight)  # the mmap'd portable copy must not stay resident beside the packed one

    def _kernel_sz(self, cd: torch.dtype) -> Tensor:
        cached = self.__dict__.get("_sz_cache")
        if cached is None or cached[0] is not self.scales_and_zeros or cached[1].dtype != cd:
            cached = (self.scales_and_zeros, self.scales_and_zeros.detach().to(cd).contiguous())
            self.__dict__["_sz_cache"] = cached
        return cached[1]

    def int_weight(self) -> Tensor:
        """q int32 [out, in], values 0..15 (from whichever form is held)."""
        if self.qweight is not None:
            return unpack_nibbles(self.qweight)
        assert self.weight_packed is not None
        # the kernel layout is torch-internal: read it back through the kernel itself with scale 1, zero 8
        unit = torch.empty(self.in_features // self.group_size, self.out_features, 2, dtype=torch.bfloat16)
        unit[..., 0], unit[..., 1] = 1.0, 8.0
        rows = []
        for start in range(0, self.in_features, _UNPACK_ROWS):
            stop = min(start + _UNPACK_ROWS, self.in_features)
            eye = torch.zeros(stop - start, self.in_features, dtype=torch.bfloat16)
            eye[:, start:stop] = torch.eye(stop - start, dtype=torch.bfloat16)
            rows.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_packed, self.group_size, unit))
        return torch.cat(rows).T.round().to(torch.int32).contiguous()  # [in, out] -> [out, in]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this layer multiplies by, [out, in]."""
        return dequantize_int4(self.int_weight(), self.scales_and_zeros, self.group_size, dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel_ok:
            self.prepare()
            assert self.weight_packed is not None
            cd = self.compute_dtype
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(cd).contiguous(), self.weight_packed, self.group_size, self._kernel_sz(cd)
            )
        else:
            w = self.dequantize(self.compute_dtype)
            y = F.linear(x2.to(self.compute_dtype), w)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    # --- state dict: always the portable form ------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight_packed", None)
        if self.qweight is None:
            q = self.int_weight().to(torch.uint8)
            destination[prefix + "qweight"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.qweight is None:  # loading replaces the packed form: go back to a portable slot
            device = self.weight_packed.device if self.weight_packed is not None else None
            self.weight_packed = None
            self.qweight = nn.Parameter(
                torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8, device=device),
                requires_grad=False,
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )
