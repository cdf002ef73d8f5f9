"""`CpuKernels`: the JIT-built C++ ops (`csrc/`) behind the `Kernels` interface, for float32 CPU tensors.

GGUF matmuls, picked per call by the number of activation rows M (measured in `benchmarks/kernels.py`):
- M <= `GEMV_MAX_ROWS` (decode): `csrc/gemv.cpp` reads the raw blocks once per call, unpacking each weight block
  once for a tile of up to 8 rows (each row's result is independent of the batch, bitwise). Activations are
  quantized to int8 per block of 32 with a float32 scale and dotted with the weight's integers by the variant's ISA
  (`csrc/core/`: avx512 vpdpbusd, avx2 vpmaddubsw/vpmaddwd, scalar; every variant bitwise equal to scalar); the
  result equals `F.linear(x_q, W)` up to float32 summation order, where `x_q = d * round(x / d)`,
  `d = max|x_block| / 127` — so |y - F.linear(x, W)| <= |W| @ (d / 2) per block.
- larger M (prefill), packed weights (`prefill_int8`, the default where they exist and prefill is not bf16): the
  packed kernel at any M, int8 activations per 32 as in decode (llama.cpp's prefill rounds activations the same
  way); 1.1-1.4x a float32 GEMM at 512 rows, 1.5-2x at 128 (BENCHMARKS.md, "Packed prefill").
- larger M otherwise: the weight is dequantized once per call, a slab of rows at a time into a buffer this object
  owns (bounded memory, one per thread and dtype), by the same C++ code (bit-exact with `gguf.quants`), then one
  GEMM per slab — in bfloat16 on CPUs with AMX BF16 tiles (`prefill_bf16`: weight and activations rounded to
  bfloat16), else float32.
Packed weights (`pack`, the avx512 and avx2 variants: `has_packed`; see `autoglm.kernels.cpu.pack`): one vpdpbusd
(avx2: two 8-row vpmaddubsw halves, bitwise the same result) yields 16 outputs, ~2-4.6x faster decode matmuls on
avx512, 1.4-2.3x on avx2; bf16 prefill dequantizes slabs straight from the packed layout.
Decode helpers: rms_norm, add_rms_norm (residual + post-norm + next pre-norm), norm_rope (per-head norm + rotary),
attend_decode / attend_decode_paged; each equal to its torch composition up to summation order. Inputs the C++ ops
do not take (other dtypes or devices, unsupported GGUF types) go to the torch reference.
Types: Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K. Memory: no float copy of the model is ever kept; transient slabs only.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import Tensor

from autoglm.kernels.base import (
    AttentionShape,
    DecoderLayerModules,
    DecodeStack,
    GemvKernel,
    GGUFBlockFormat,
    PagedDecodeKV,
    RopeOperands,
)
from autoglm.kernels.cpu import pack as packing
from autoglm.kernels.cpu import variants
from autoglm.kernels.reference import REFERENCE

Q = GGMLQuantizationType
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_SUPPORTED_IDS = frozenset(int(q) for q in SUPPORTED_TYPES)  # int keys: enum hashing is slow per token

# activation rows up to which the fused kernel beats dequantize-once + GEMM (benchmarks/kernels.py). The kernel
# unpacks each weight block once for up to 8 rows, so its cost grows by less than a row per row; at 16 rows it still
# beats or ties the GEMM on every gemma-3-270m shape (Q4_K 640x2048 ties, Q5_0/Q6_K/Q8_0 lm_head win clearly)
GEMV_MAX_ROWS = 16
_Q8K_IDS = frozenset((12, 13, 14))  # Q4_K, Q5_K, Q6_K (gguf.GGMLQuantizationType)
_PACKED_Q8K_IDS = frozenset((12, 14))  # the packed tiles' K-quants: q8_K activations (csrc/gemv_packed.cpp)
# prefill dequantizes at most this many weight elements at a time into a reused buffer (16 MiB of float32)
DEQUANT_SLAB_ELEMENTS = 1 << 22
_FUSED_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # KV cache dtypes attention.cpp reads


class _CpuDecodeStack(NamedTuple):
    """`CpuKernels.decode_stack`: csrc/decode_layer.cpp's operands, 7 linears per layer (q, k, v, o, gate, up,
    down) flat, one norm of each kind per layer (q/k norms: Qwen3's, or None)."""

    kernels: CpuKernels
    attn: list[AttentionShape]
    weights: list[Tensor]
    kinds: list[int]  # CpuKernels.gemv_kind of each weight
    qids: list[int]
    biases: list[Tensor | None]
    in_norms: list[Tensor | None]
    post_norms: list[Tensor | None]
    eps: float
    q_norms: list[Tensor | None]
    k_norms: list[Tensor | None]
    qk_eps: float


def cpu_has_amx_bf16() -> bool:
    """Whether the CPU has AMX BF16 tiles (Sapphire Rapids and later Xeons; oneDNN's bf16 GEMMs use them)."""
    return "amx_bf16" in variants.cpu_features()


def _f32_cpu(x: Tensor, w: Tensor) -> bool:
    return x.dtype == torch.float32 and w.dtype == torch.float32 and x.is_cpu and w.is_cpu


class CpuKernels:
    """The C++ kernels of one built extension (`ext`, from `autoglm.kernels.cpu.load`).

    prefill_bf16: prefill GEMMs in bfloat16 (default: the avx512 variant on a CPU with AMX BF16 tiles; an activation
    error (2^-9 relative) no larger than decode's int8-per-32 rounding). Not on AVX512-BF16 alone: there the packed
    int8 kernel ran 3x faster than dequantize + bf16 GEMM at 512 tokens (BENCHMARKS.md, 2026-12-07); False:
    float32 prefill GEMMs where the int8 kernel does not run.
    prefill_int8: prefill on packed weights through the packed int8 kernel (default: when prefill is not bf16);
    False: dequantize + GEMM as for unpacked weights (float32 activations).
    slab_elements: weight elements dequantized per prefill slab.
    """

    name = "cpu"
    fused_decode_attention = True

    def __init__(
        self,
        ext: ModuleType,
        *,
        prefill_bf16: bool | None = None,
        prefill_int8: bool | None = None,
        slab_elements: int = DEQUANT_SLAB_ELEMENTS,
        q8k_file_order: bool = False,
    ) -> None:
        self.ext = ext
        self.isa = str(ext.isa())  # the variant (autoglm.kernels.cpu.variants): "avx512", "avx2", "scalar", ...
        self.has_vnni = bool(ext.has_vnni())  # AVX512-VNNI built in (the packed tiles' vpdpbusd)
        self.has_packed = bool(ext.has_packed())  # the packed layout's kernel built in (AVX512-VNNI or AVX2 tiles)
        # AMX is an AVX-512-era feature: a variant below avx512 stands for a CPU without it
        self.prefill_bf16 = (cpu_has_amx_bf16() and self.isa == "avx512") if prefill_bf16 is None else prefill_bf16
        self.prefill_int8 = (not self.prefill_bf16) if prefill_int8 is None else prefill_int8
        self.slab_elements = slab_elements
        self._scratch: dict[tuple[int, torch.dtype], Tensor] = {}  # (thread, dtype) -> reused slab buffer
        gemv = ext.gemv
        # q8k_file_order: unpacked Q4_K/Q5_K/Q6_K decode on q8_K activations too (csrc/core/kquant_q8k.h: bitwise the
        # packed tiles' result, but its NEON/scalar dot is slow); off: unpacked rows keep per-32 activations
        self.q8k = q8k_file_order and hasattr(ext, "gemv_q8k")
        gemv_q8k = ext.gemv_q8k if self.q8k else None

        def direct(x: Tensor, raw: Tensor, qid: int) -> Tensor:  # = matmul() for float32 [M <= GEMV_MAX_ROWS, K]
            if gemv_q8k is not None and qid in _Q8K_IDS:
                return gemv_q8k(x, raw, qid)
            return gemv(x, raw, qid, False)

        self._direct: GemvKernel = direct

    def __repr__(self) -> str:
        return (
            f"CpuKernels(isa={self.isa}, packed={self.has_packed}, prefill_bf16={self.prefill_bf16}, "
            f"prefill_int8={self.prefill_int8})"
        )

    def __deepcopy__(self, memo: dict[int, object]) -> object:
        return self  # shared by every module that computes with it: a copied model keeps the same kernels

    # --- GGUF block matmuls ------------------------------------------------------------------------------------
    def supports(self, fmt: GGUFBlockFormat) -> bool:
        return int(fmt.qtype) in _SUPPORTED_IDS

    def quantize_activations(self, x: Tensor, fmt: GGUFBlockFormat | None = None) -> Tensor:
        """x [M, K] -> the float32 activations the int8 kernel for `fmt` effectively multiplies by: d * q per 256
        (llama.cpp's q8_K) for packed Q4_K / Q6_K, else per 32."""
        q8k = fmt is not None and fmt.packed and int(fmt.qtype) in _PACKED_Q8K_IDS
        return self.ext.quantize_activations(x.float().contiguous(), q8k)

    def gemv(self, x: Tensor, raw: Tensor, fmt: GGUFBlockFormat, exact_activations: bool = False) -> Tensor:
        """x [M, cols] @ W.T -> [M, rows] float32 by the fused kernel (int8 activations unless `exact_activations`)."""
        if fmt.packed:
            return self.ext.gemv_packed(x.float().contiguous(), raw, int(fmt.qtype))
        if self.q8k and not exact_activations and int(fmt.qtype) in _Q8K_IDS:
            return self.ext.gemv_q8k(x.float().contiguous(), raw, int(fmt.qtype))
        return self.ext.gemv(x.float().contiguous(), raw, int(fmt.qtype), exact_activations)

    def gemm(self, x: Tensor, raw: Tensor, fmt: GGUFBlockFormat) -> Tensor:
        """x [M, cols] @ W.T -> [M, rows] in x's dtype: W dequantized once per call, a slab of rows at a time, into a
        reused buffer (at most `slab_elements`), then one GEMM per slab in x's dtype (float32 or bfloat16)."""
        step = max(1, min(fmt.rows, self.slab_elements // fmt.cols))
        if fmt.packed:  # slabs start on a 16-row group
            step = max(packing.GROUP_ROWS, step // packing.GROUP_ROWS * packing.GROUP_ROWS)
        out = x.new_empty(x.shape[0], fmt.rows)
        for s in range(0, fmt.rows, step):
            n = min(step, fmt.rows - s)
            w = self._slab(n, fmt.cols, x.dtype)  # [slab, cols]
            if fmt.packed:
                self.ext.dequantize_packed_out(raw, int(fmt.qtype), fmt.cols, s, w)
            else:
                self.ext.dequantize_out(raw[s : s + n], int(fmt.qtype), fmt.cols, w)
            out[:, s : s + n] = F.linear(x, w)
        return out

    def _slab(self, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        # one reused buffer per (thread, dtype): fresh 64 MiB tensors per call cost more in page faults than decoding
        key = (threading.get_ident(), dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < rows * cols:
            buf = torch.empty(max(rows * cols, self.slab_elements), dtype=dtype)
            self._scratch[key] = buf
        return buf[: rows * cols].view(rows, cols)

    def matmul(self, x: Tensor, raw: Tensor, fmt: GGUFBlockFormat, bias: Tensor | None = None) -> Tensor:
        if not self.supports(fmt):
            return REFERENCE.matmul(x, raw, fmt, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, fmt.cols)  # [M, cols]
        if x2.device.type != "cpu" or raw.device.type != "cpu":
            raise RuntimeError("the CPU kernels run on CPU tensors only")
        if x2.shape[0] <= GEMV_MAX_ROWS or (fmt.packed and self.prefill_int8):
            y = self.gemv(x2, raw, fmt).to(x.dtype)
        else:
            cd = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
            if self.prefill_bf16 and cd == torch.float32:
                cd = torch.bfloat16
            y = self.gemm(x2.to(cd), raw, fmt).to(x.dtype)
        y = y.reshape(*lead, fmt.rows)
        return y + bias.to(x.dtype) if bias is not None else y

    def take_rows(self, raw: Tensor, fmt: GGUFBlockFormat, ids: Tensor | None, dtype: torch.dtype) -> Tensor:
        # the C++ dequantizer (bitwise gguf.quants'): the reference's torch ops took 0.3 ms for a decode step's one
        # embedding row
        qid = int(fmt.qtype)
        if qid not in _SUPPORTED_IDS:
            return fmt.take_rows(raw, ids, dtype)
        if fmt.packed:
            sel = self.unpack_rows(raw, fmt, torch.arange(fmt.rows) if ids is None else ids.reshape(-1))
        else:
            sel = raw if ids is None else raw.index_select(0, ids.reshape(-1))
        w = self.ext.dequantize(sel, qid, fmt.cols, dtype == torch.bfloat16)
        return w if dtype in (torch.float32, torch.bfloat16) else w.to(dtype)

    def unpack_rows(self, raw: Tensor, fmt: GGUFBlockFormat, ids: Tensor) -> Tensor:
        """Rows `ids` of packed blocks back in file order: [N, row_bytes] uint8."""
        return self.ext.unpack_rows(raw, int(fmt.qtype), fmt.cols, ids.long())

    def direct_gemv(self, fmt: GGUFBlockFormat) -> tuple[GemvKernel, int] | None:
        if not self.supports(fmt):
            return None
        return (self.ext.gemv_packed if fmt.packed else self._direct), GEMV_MAX_ROWS

    def gemv_kind(self, fmt: GGUFBlockFormat) -> int | None:
        """How `direct_gemv`'s kernel multiplies `fmt` (csrc/decode_layer.cpp's GemvKind): 0 the packed tiles,
        1 file order with per-32 activations, 2 file order on q8_K; None: no direct kernel."""
        qid = int(fmt.qtype)
        return self._gemv_kind(fmt.packed, qid) if qid in _SUPPORTED_IDS else None

    def _gemv_kind(self, packed: bool, qid: int) -> int:
        return 0 if packed else 2 if self.q8k and qid in _Q8K_IDS else 1

    def can_pack(self, fmt: GGUFBlockFormat) -> bool:
        return self.has_packed and packing.packable(fmt)

    def pack(self, raw: Tensor, fmt: GGUFBlockFormat) -> Tensor:
        return packing.pack(self.ext, raw, fmt)

    # --- norms and rotary --------------------------------------------------------------------------------------
    def silu_mul(self, gate: Tensor, up: Tensor) -> Tensor:
        # in place on the fresh gate projection, one pass (csrc/norm_ops.cpp); the decode stack calls the same loop
        if _f32_cpu(gate, up) and gate.shape == up.shape and gate.is_contiguous() and not gate.requires_grad:
            return self.ext.silu_mul_(gate, up.contiguous())
        return REFERENCE.silu_mul(gate, up)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, offset: float) -> Tensor:
        if _f32_cpu(x, weight):
            return self.ext.rms_norm(x.contiguous(), weight, eps, offset)
        return REFERENCE.rms_norm(x, weight, eps, offset)

    def add_rms_norm(
        self, h: Tensor, y: Tensor, post: Tensor, pre: Tensor | None, eps: float, offset: float
    ) -> tuple[Tensor, Tensor | None]:
        if _f32_cpu(h, post) and y.dtype == torch.float32 and (pre is None or pre.dtype == torch.float32):
            return self.ext.add_rms_norm(h.contiguous(), y.contiguous(), post, pre, eps, offset)
        return REFERENCE.add_rms_norm(h, y, post, pre, eps, offset)

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
        if _f32_cpu(x, cos) and (weight is None or weight.dtype == torch.float32):
            return self.ext.norm_rope(x.contiguous(), weight, eps, offset, cos, sin, rotary_dim, interleaved)
        return REFERENCE.norm_rope(x, weight, eps, offset, cos, sin, perm, rotary_dim, interleaved)

    # --- decode attention --------------------------------------------------------------------------------------
    def attend_decode(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        # K/V read once in the cache's dtype (no gather, no mask)
        if q.dtype == torch.float32 and q.is_cpu and k.dtype in _FUSED_CACHE_DTYPES:
            return self.ext.attend_decode(q.contiguous(), k, v, scale)
        return REFERENCE.attend_decode(q, k, v, scale)

    def attend_decode_paged(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lo: Tensor, hi: Tensor, scale: float
    ) -> Tensor | None:
        # one call for the whole batch, reading each sequence's blocks where they are (no gather)
        if q.dtype != torch.float32 or not q.is_cpu or k_cache.dtype not in _FUSED_CACHE_DTYPES:
            return None
        if not k_cache.is_contiguous():
            return None
        return self.ext.attend_decode_paged(q.contiguous(), k_cache, v_cache, block_tables, lo, hi, scale)

    # --- a stack of decoder layers ----------------------------------------------------------------------------
    def decode_stack(self, layers: Sequence[DecoderLayerModules]) -> _CpuDecodeStack | None:
        # what csrc/decode_layer.cpp runs for these modules (each module's forward's kernels, in its order), as
        # flat lists: read once where the model keeps the stack (`LlamaModel.prepare_decode`), else every step
        if not layers:
            return None
        attn = layers[0].attn
        geometry = (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
        weights: list[Tensor] = []
        kinds: list[int] = []
        qids: list[int] = []
        biases: list[Tensor | None] = []
        norms: tuple[list[Tensor | None], ...] = ([], [], [], [])
        eps: list[float | None] = [None, None]  # one eps per pair (layer norms, q/k norms) in the C++ signature
        for mods in layers:
            a = mods.attn
            if (a.num_heads, a.num_kv_heads, a.head_dim, a.scale) != geometry:
                return None
            for lin in mods.linears:
                # GGUFLinear on these kernels; a dense linear (no such method) runs its own forward
                get = getattr(lin, "decode_operands", None)
                ops = get(self) if get is not None else None
                if ops is None:
                    return None
                w, fmt, qid, bias = ops
                if qid not in _SUPPORTED_IDS or not w.is_cpu or (bias is not None and bias.dtype != torch.float32):
                    return None
                weights.append(w)
                kinds.append(self._gemv_kind(fmt.packed, qid))
                qids.append(qid)
                biases.append(bias)
            for i, n in enumerate((mods.input_norm, mods.post_norm, mods.q_norm, mods.k_norm)):
                if n is None:
                    if i < 2:
                        return None
                    norms[i].append(None)
                    continue
                # LLaMA's RMSNorm (scale = weight) on these kernels; Gemma's (1 + weight) has no such method
                get = getattr(n, "decode_operands", None)
                ops = get(self) if get is not None else None
                if ops is None or ops[0].dtype != torch.float32:
                    return None
                e = eps[i // 2]
                if e is None:
                    eps[i // 2] = e = ops[1]
                elif ops[1] != e:
                    return None
                norms[i].append(ops[0])
        return _CpuDecodeStack(
            self, [m.attn for m in layers], weights, kinds, qids, biases, norms[0], norms[1], float(eps[0] or 0.0),
            norms[2], norms[3], float(eps[1] or 0.0),
        )  # fmt: skip

    def decode_layers(self, h: Tensor, stack: DecodeStack, rope: RopeOperands, kv: PagedDecodeKV) -> Tensor | None:
        # one C++ call (csrc/decode_layer.cpp) over the stack's operands
        if not isinstance(stack, _CpuDecodeStack) or stack.kernels is not self:
            return None
        if not (h.dtype == torch.float32 and h.is_cpu and h.dim() == 2 and h.shape[0] <= GEMV_MAX_ROWS):
            return None
        if rope.cos.dtype != torch.float32:
            return None  # kv: the backend's decode_kv hands over only caches attend_decode_paged reads
        a = stack.attn[0]
        return self.ext.decode_layers(
            h.contiguous(), stack.weights, stack.kinds, stack.qids, stack.biases, stack.in_norms, stack.post_norms,
            stack.eps, stack.q_norms, stack.k_norms, stack.qk_eps, rope.cos, rope.sin, rope.rotary_dim or a.head_dim,
            rope.interleaved, kv.k_caches, kv.v_caches, kv.slots, kv.block_tables, kv.lo, kv.hi, float(a.scale),
            a.num_heads, a.num_kv_heads, a.head_dim,
        )  # fmt: skip
