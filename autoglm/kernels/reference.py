"""The reference `Kernels`: plain torch ops on any device and dtype — the numerics every faster backend is held to.

GGUF matmuls dequantize a slab of rows per call (`GGUFBlockFormat.matmul`, bit-exact with `gguf.quants`); norms,
rotary and decode attention are the torch compositions the models were validated with against transformers.
It holds no state, so one shared instance (`REFERENCE`) is every module's default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from autoglm.kernels.base import (
    DecoderLayerModules,
    DecodeStack,
    GemvKernel,
    GGUFBlockFormat,
    PagedDecodeKV,
    RopeOperands,
)


class TorchKernels:
    """Torch compositions of every `Kernels` op (see `autoglm.kernels.base.Kernels` for the contracts)."""

    name = "reference"
    fused_decode_attention = False

    def __deepcopy__(self, memo: dict[int, object]) -> object:
        return self  # shared by every module that computes with it: a copied model keeps the same kernels

    def matmul(self, x: Tensor, raw: Tensor, fmt: GGUFBlockFormat, bias: Tensor | None = None) -> Tensor:
        if fmt.packed:
            raise ValueError("packed GGUF weights need the kernels that packed them (reference: file order only)")
        return fmt.matmul(x, raw, bias)

    def take_rows(self, raw: Tensor, fmt: GGUFBlockFormat, ids: Tensor | None, dtype: torch.dtype) -> Tensor:
        if fmt.packed:
            raise ValueError("packed GGUF weights need the kernels that packed them (reference: file order only)")
        return fmt.take_rows(raw, ids, dtype)

    def direct_gemv(self, fmt: GGUFBlockFormat) -> tuple[GemvKernel, int] | None:
        return None

    def can_pack(self, fmt: GGUFBlockFormat) -> bool:
        return False

    def pack(self, raw: Tensor, fmt: GGUFBlockFormat) -> Tensor:
        raise ValueError(f"the reference kernels keep {fmt.qtype.name} weights in file order (nothing to pack)")

    def silu_mul(self, gate: Tensor, up: Tensor) -> Tensor:
        return torch.nn.functional.silu(gate) * up

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, offset: float) -> Tensor:
        # x: [..., D]
        if offset == 0.0:  # GLM/LLaMA: cast back to x's dtype before scaling (transformers' order; bf16 parity)
            dtype = x.dtype
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(eps))  # in-place add: fewer allocs
            return weight * h.to(dtype)
        h = x.float()  # Gemma: everything in float32, scale by (offset + w), cast at the end
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(eps))
        return torch.addcmul(h, h, weight.float()).type_as(x)  # h * (1 + w) in one op (offset is 0 or 1)

    def add_rms_norm(
        self, h: Tensor, y: Tensor, post: Tensor, pre: Tensor | None, eps: float, offset: float
    ) -> tuple[Tensor, Tensor | None]:
        # h, y: [T, D]
        h = h + self.rms_norm(y, post, eps, offset)
        return h, None if pre is None else self.rms_norm(h, pre, eps, offset)

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
        # x: [T, H, D]; cos, sin: [T, 1, D]; perm: [D] (each dim's rotation partner, sign carried by sin)
        if weight is not None:
            x = self.rms_norm(x, weight, eps, offset)
        return torch.addcmul(x * cos, x.index_select(-1, perm), sin)

    def attend_decode(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        # q: [H, D]; k, v: [n, KV, D], every key visible -> [H, D]. Plain matmuls: CPU SDPA's flash kernel costs
        # ~2.5x more for a single query. Head h uses KV head h // (H / KV), as in HF's repeat_kv.
        heads, dim = q.shape[-2], q.shape[-1]
        kvh = k.shape[1]
        qg = q.reshape(kvh, heads // kvh, dim)  # [KV, G, D]
        s = torch.matmul(qg, k.to(q.dtype).permute(1, 2, 0))  # [KV, G, n]
        p = torch.softmax(s.mul_(scale), dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(p, v.to(q.dtype).transpose(0, 1))  # [KV, G, D]
        return o.view(q.shape)

    def attend_decode_paged(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lo: Tensor, hi: Tensor, scale: float
    ) -> Tensor | None:
        return None  # no single-call kernel: the torch backend gathers blocks and masks (attention/torch_ref.py)

    def decode_stack(self, layers: Sequence[DecoderLayerModules]) -> DecodeStack | None:
        return None  # the modules' own forward is the reference

    def decode_layers(self, h: Tensor, stack: DecodeStack, rope: RopeOperands, kv: PagedDecodeKV) -> Tensor | None:
        return None


REFERENCE = TorchKernels()
