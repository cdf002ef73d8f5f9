"""INT8 weight-only linear layer: per-output-channel symmetric scales, activations stay in floating point.

Offline half: `quantize_int8(weight)` -> (int8 weight, float32 scales). Runtime half: `Int8Linear`, a drop-in for
`autoglm.layers.linear.Linear` (same `in_features`/`out_features`/forward). On disk (safetensors) a layer is
`<name>.weight` int8 [out, in] + `<name>.scales` float32 [out] (+ `<name>.bias`).

Kernels (CPU, torch 2.13, measured in BENCHMARKS.md): `aten._weight_int8pack_mm` is fast only with bfloat16/float16
activations (float32 activations hit a scalar path ~15x slower) and its cost grows linearly with the rows, so it
serves decode-sized batches; larger batches (prefill) convert the int8 weight to bfloat16 (exact) and use the
bfloat16 GEMM, applying the scales to the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.errors import UnsupportedQuantType
from autoglm.kernels.pages import release_pages

# rows up to which the packed GEMV-style kernel beats dequantize + GEMM (2 threads, 4096x4096; BENCHMARKS.md)
PACKED_MAX_ROWS = 96
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] float -> (q int8 [N, K], scales float32 [N]) with weight ≈ q * scales[:, None].

    Symmetric per output channel: scale = max|w_row| / 127, so |w - q*scale| <= scale / 2 elementwise.
    """
    if weight.dim() != 2:
        raise UnsupportedQuantType(f"int8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    # all-zero rows get scale 1 so that q = 0 (no division by zero)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias, weight int8 [out, in], scales [out].

    compute_dtype: the activation dtype inside the kernels (bfloat16 by default: the packed int8 kernel and the GEMM
    are fast in it on AVX-512 BF16 CPUs); float32 computes exactly in float32 (slow reference path).
    The output has the input's dtype.
    """

    format = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        fdtype = dtype or torch.float32
        # int weights as frozen Parameters so named_parameters() (sizes, devices, fill-by-name) sees them
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.scales = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=fdtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Quantize a dense layer (`weight` [out, in], optional `bias`); a `meta` layer gives a `meta` shell."""
        w: Tensor = linear.weight
        bias: Tensor | None = getattr(linear, "bias", None)
        out_f, in_f = w.shape
        mod = cls(in_f, out_f, bias is not None, device=w.device, dtype=w.dtype, compute_dtype=compute_dtype)
        if w.is_meta:
            return mod
        q, scales = quantize_int8(w)
        mod.weight = nn.Parameter(q, requires_grad=False)
        mod.scales = nn.Parameter(scales, requires_grad=False)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this layer multiplies by, [out, in]."""
        return (self.weight.to(torch.float32) * self.scales.float()[:, None]).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def prepare(self) -> None:
        """Make the int8 weight safe for the packed kernel (idempotent; `finalize_quantization` calls it).

        torch 2.13's `_weight_int8pack_mm` reads whole 64-byte lines from the weight's start for batches > 1: a
        weight not 64-byte aligned (safetensors/GGUF mmaps align to 8) can be read past its end and crash at a page
        boundary (reproduced). Such a weight is copied once into an aligned (torch-allocated) tensor.
        """
        w = self.weight
        if not w.is_meta and w.device.type == "cpu" and (w.data_ptr() % 64 or not w.is_contiguous()):
            self.weight = nn.Parameter(w.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)
            release_pages(w)  # the mmap'd original must not stay resident beside the copy (peak = weights once)

    def _kernel_scales(self, cd: torch.dtype) -> Tensor:
        # the kernel wants scales in the activation dtype; cached so decode steps do not re-cast them
        cached = self.__dict__.get("_scales_cache")
        if cached is None or cached[0] is not self.scales or cached[1].dtype != cd:
            cached = (self.scales, self.scales.detach().to(cd))
            self.__dict__["_scales_cache"] = cached
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        cd = self.compute_dtype
        if cd in _KERNEL_DTYPES and x2.device.type == "cpu" and x2.shape[0] <= PACKED_MAX_ROWS:
            # decode-sized: the packed int8 kernel reads 1 byte per weight
            if self.weight.data_ptr() % 64:
                self.prepare()
            y = torch.ops.aten._weight_int8pack_mm(x2.to(cd).contiguous(), self.weight, self._kernel_scales(cd))
        else:
            # int8 -> compute dtype is exact (|q| <= 127); scaling the [M, out] result is cheaper than the weight
            y = F.linear(x2.to(cd), self.weight.to(cd)).float() * self.scales.float()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )
