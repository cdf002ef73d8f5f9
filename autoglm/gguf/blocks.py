"""GGUF (ggml) block layouts decoded in torch: raw bytes -> float32, vectorised over all blocks at once.

Each decoder takes `blocks` [n_blocks, type_size] uint8 and returns [n_blocks, block_size] float32, doing the
float32 arithmetic in the same order as `gguf.quants` (and ggml's `dequantize_row_*`) so the result is bit-exact.
Block sizes come from `gguf.GGML_QUANT_SIZES`; layouts are ggml's `block_*` structs (little-endian).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from torch import Tensor

from autoglm.errors import CorruptFile, UnsupportedQuantType

Q = GGMLQuantizationType

# IQ4_NL / IQ4_XS non-linear 4-bit code book (ggml `kvalues_iq4nl`).
_IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Dequantize this many blocks at a time, so the intermediates of one call stay ~100 MiB whatever the tensor size.
_CHUNK_BLOCKS = 1 << 16


def block_layout(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) from `gguf.GGML_QUANT_SIZES`."""
    return GGML_QUANT_SIZES[Q(qtype)]


def row_nbytes(qtype: GGMLQuantizationType, n_cols: int, name: str = "<tensor>") -> int:
    """Bytes of one row of `n_cols` elements; the row must be a whole number of blocks."""
    bs, ts = block_layout(qtype)
    if n_cols % bs:
        raise UnsupportedQuantType(
            f"tensor {name!r}: row of {n_cols} elements is not a multiple of the {Q(qtype).name} block size {bs}"
        )
    return n_cols // bs * ts


def as_byte_tensor(raw: Tensor | np.ndarray) -> Tensor:
    """A uint8 view of `raw` (numpy array, memmap, or tensor) without copying."""
    if isinstance(raw, Tensor):
        return raw if raw.dtype == torch.uint8 else raw.contiguous().view(torch.uint8)
    arr = np.ascontiguousarray(raw)
    arr = arr.reshape(-1).view(np.uint8) if arr.dtype != np.uint8 else arr
    with warnings.catch_warnings():
        # GGUFReader memmaps are read-only; we never write through this view.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


# --- field helpers -------------------------------------------------------------------------------------------------
def _f16(b: Tensor) -> Tensor:
    # b: [n, 2] uint8 -> [n, 1] float32 (exact widening)
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    # qs: [..., k] uint8 -> [..., 2, k]: low nibbles first, then high nibbles (ggml order)
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(b: Tensor, n_bits: int, width: int) -> Tensor:
    # b: [..., k] uint8 -> [..., 8 // width, k]: field j of every byte, j = 0 .. 8/width-1 (low bits first)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device).view(-1, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << n_bits) - 1)


def _k4_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    # scales: [n, 12] packed 6-bit (scale, min) pairs of Q4_K / Q5_K -> two [n, 8] float32
    s = scales.view(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float(), mn.float()


# --- decoders: [n, type_size] uint8 -> [n, block_size] float32 ----------------------------------------------------
def _deq_f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32)


def _deq_f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()


def _deq_bf16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.bfloat16).float()


def _deq_q8_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    x = b[:, 2:].view(torch.int8).float()
    return x * d


def _deq_q4_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).reshape(-1, 32).float() - 8.0
    return d * q


def _deq_q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).reshape(-1, 32).float()
    return (d * q) + m


def _q5_values(qh: Tensor, qs: Tensor) -> Tensor:
    # qh: [n, 4] (bit j = high bit of element j), qs: [n, 16] -> [n, 32] uint8 in 0..31
    hi = _bits(qh, 1, 1).transpose(-1, -2).reshape(-1, 32)  # [n, 4 bytes, 8 bits] -> element j = byte j//8 bit j%8
    lo = _nibbles(qs).reshape(-1, 32)
    return lo | (hi << 4)


def _deq_q5_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    q = _q5_values(b[:, 2:6], b[:, 6:]).float() - 16.0
    return d * q


def _deq_q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _q5_values(b[:, 4:8], b[:, 8:]).float()
    return (d * q) + m


def _deq_q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    # qs: [n, 2 halves, 32] -> 2-bit fields [n, 2, 4 shifts, 32] -> 16 sub-blocks of 16
    q = _bits(qs.reshape(n, 2, 32), 2, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, QK_K)


def _deq_q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    lo = _nibbles(scales[:, :8]).reshape(n, 16)  # low 4 bits of the 16 6-bit scales
    hi = _bits(scales[:, 8:12], 2, 2).reshape(n, 16)  # high 2 bits
    sc = (lo | (hi << 4)).float() - 32.0
    dl = (d * sc).view(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 2, 2).reshape(n, 16, 16)
    qh = _bits(hmask, 1, 1).reshape(n, 16, 16)  # [n, 8 bits, 32] -> bit k covers elements 32k .. 32k+31
    q = ql.float() - ((qh ^ 1) << 2).float()  # a clear high bit means "subtract 4"
    return (dl * q).view(n, QK_K)


def _deq_q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k4_scale_min(b[:, 4:16])
    dl = (d * sc).view(n, 8, 1)
    ml = (dmin * mn).view(n, 8, 1)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (dl * q - ml).view(n, QK_K)


def _deq_q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k4_scale_min(b[:, 4:16])
    dl = (d * sc).view(n, 8, 1)
    ml = (dmin * mn).view(n, 8, 1)
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1, 1)  # [n, 8, 32]: bit k is the high bit of sub-block k
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).view(n, QK_K)


def _deq_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b[:, 208:210])
    dl = (d * scales.view(torch.int8).float()).view(n, 16, 1)
    lo = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    hi = _bits(qh.reshape(n, 2, 32), 2, 2).reshape(n, 8, 32)
    q = (lo | (hi << 4)).float() - 32.0
    return (dl * q.view(n, 16, 16)).view(n, QK_K)


def _deq_q8_k(b: Tensor) -> Tensor:
    # block_q8_K: float32 d, 256 int8, 16 int16 block sums (unused here)
    d = b[:, :4].contiguous().view(torch.float32)
    return b[:, 4:260].view(torch.int8).float() * d


def _iq4_lookup(idx: Tensor) -> Tensor:
    table = torch.tensor(_IQ4_KVALUES, dtype=torch.float32, device=idx.device)
    return table[idx.long()]


def _deq_iq4_nl(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    q = _iq4_lookup(_nibbles(b[:, 2:]).reshape(-1, 32))
    return d * q


def _deq_iq4_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    sh = b[:, 2:4].long()
    sh = sh[:, 0] | (sh[:, 1] << 8)  # uint16 little-endian: 2 high bits per sub-block
    hi = (sh.view(n, 1) >> torch.arange(0, 16, 2, device=b.device)) & 3
    lo = _nibbles(b[:, 4:8]).transpose(-1, -2).reshape(n, 8)  # byte j holds sub-blocks 2j (low) and 2j+1 (high)
    sc = (lo.long() | (hi << 4)).float() - 32.0
    dl = (d * sc).view(n, 8, 1)
    q = _iq4_lookup(_nibbles(b[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32))
    return (dl * q).view(n, QK_K)


DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
    Q.F32: _deq_f32,
    Q.F16: _deq_f16,
    Q.BF16: _deq_bf16,
    Q.Q8_0: _deq_q8_0,
    Q.Q4_0: _deq_q4_0,
    Q.Q4_1: _deq_q4_1,
    Q.Q5_0: _deq_q5_0,
    Q.Q5_1: _deq_q5_1,
    Q.Q2_K: _deq_q2_k,
    Q.Q3_K: _deq_q3_k,
    Q.Q4_K: _deq_q4_k,
    Q.Q5_K: _deq_q5_k,
    Q.Q6_K: _deq_q6_k,
    Q.Q8_K: _deq_q8_k,
    Q.IQ4_NL: _deq_iq4_nl,
    Q.IQ4_XS: _deq_iq4_xs,
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(DEQUANTIZERS)


# --- encoders: [n, block_size] float32 -> [n, type_size] uint8 (bit-exact with gguf.quants) -------------------------
def f16_bytes(x: Tensor) -> Tensor:
    # x: [n, k] float32 -> [n, 2k] uint8, round-to-nearest-even like numpy's astype(float16)
    return x.to(torch.float16).view(torch.uint8)


def _inverse(d: Tensor) -> Tensor:
    # 1/d, and 0 where d == 0 (an all-zero block)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _pack_nibbles(q: Tensor) -> Tensor:
    # q: [n, 32] uint8 in 0..15 -> [n, 16]: element j in the low nibble, j+16 in the high nibble
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_high_bits(q: Tensor) -> Tensor:
    # q: [n, 32] uint8 in 0..31 -> [n, 4]: bit j of the little-endian uint32 = bit 4 of element j
    bits = ((q >> 4) & 1).view(-1, 4, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    return (bits << shifts).sum(dim=-1, dtype=torch.uint8)


def _abs_max_signed(x: Tensor) -> Tensor:
    # the element of largest magnitude, sign kept (first one on ties, like numpy argmax): [n, k] -> [n, 1]
    return x.gather(1, x.abs().argmax(dim=1, keepdim=True))


def _finite_or_zero(v: Tensor) -> Tensor:
    # gguf's astype(uint8 / int8) turns NaN and +-inf into 0 (x86's float -> int conversion gives 0x80000000, whose
    # low byte is 0). They arise where a block's scale underflows so that 1/d is inf (values ~1e-38).
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def _codes(v: Tensor, hi: int) -> Tensor:
    # trunc toward zero then clip to [0, hi], as gguf does with astype(uint8).clip(0, hi)
    return _finite_or_zero(v).trunc().clamp(0, hi).to(torch.uint8)


def _enc_q8_0(x: Tensor) -> Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    v = x * _inverse(d)
    a = v.abs()
    fl = a.floor()
    r = torch.sign(v) * (fl + (2 * (a - fl)).floor())  # round half away from zero, exactly (gguf np_roundf)
    return torch.cat((f16_bytes(d), _finite_or_zero(r).to(torch.int8).view(torch.uint8)), dim=1)


def _enc_q4_0(x: Tensor) -> Tensor:
    d = _abs_max_signed(x) / -8
    q = _codes(x * _inverse(d) + 8.5, 15)
    return torch.cat((f16_bytes(d), _pack_nibbles(q)), dim=1)


def _enc_q4_1(x: Tensor) -> Tensor:
    mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (mx - mn) / 15
    q = _codes((x - mn) * _inverse(d) + 0.5, 15)
    return torch.cat((f16_bytes(d), f16_bytes(mn), _pack_nibbles(q)), dim=1)


def _enc_q5_0(x: Tensor) -> Tensor:
    d = _abs_max_signed(x) / -16
    q = _codes(x * _inverse(d) + 16.5, 31)
    return torch.cat((f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)), dim=1)


def _enc_q5_1(x: Tensor) -> Tensor:
    mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (mx - mn) / 31
    q = _codes((x - mn) * _inverse(d) + 0.5, 31)
    return torch.cat((f16_bytes(d), f16_bytes(mn), _pack_high_bits(q), _pack_nibbles(q)), dim=1)


def _enc_f32(x: Tensor) -> Tensor:
    return x.contiguous().view(torch.uint8)


def _enc_f16(x: Tensor) -> Tensor:
    return f16_bytes(x)


def _enc_bf16(x: Tensor) -> Tensor:
    # round to nearest even on the bit pattern, NaN kept quiet (ggml_compute_fp32_to_bf16); torch's cast does both
    return x.to(torch.bfloat16).view(torch.uint8)


ENCODERS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
    Q.F32: _enc_f32,
    Q.F16: _enc_f16,
    Q.BF16: _enc_bf16,
    Q.Q8_0: _enc_q8_0,
    Q.Q4_0: _enc_q4_0,
    Q.Q4_1: _enc_q4_1,
    Q.Q5_0: _enc_q5_0,
    Q.Q5_1: _enc_q5_1,
}


def check_type(qtype: GGMLQuantizationType | int, name: str) -> GGMLQuantizationType:
    try:
        qt = Q(int(qtype))
    except ValueError:
        raise UnsupportedQuantType(f"tensor {name!r}: unknown GGML type id {int(qtype)}") from None
    if qt not in DEQUANTIZERS:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise UnsupportedQuantType(f"tensor {name!r}: GGML type {qt.name} is not supported (supported: {supported})")
    return qt


def dequantize_blocks(blocks: Tensor, qtype: GGMLQuantizationType) -> Tensor:
    """[n_blocks, type_size] uint8 -> [n_blocks, block_size] float32, in bounded-memory chunks."""
    fn = DEQUANTIZERS[qtype]
    if blocks.shape[0] <= _CHUNK_BLOCKS:
        return fn(blocks)
    bs = block_layout(qtype)[0]
    out = torch.empty(blocks.shape[0], bs, dtype=torch.float32, device=blocks.device)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[s : s + _CHUNK_BLOCKS] = fn(blocks[s : s + _CHUNK_BLOCKS])
    return out


def dequantize(
    raw: Tensor | np.ndarray,
    qtype: GGMLQuantizationType | int,
    shape: Sequence[int],
    name: str = "<tensor>",
) -> Tensor:
    """Raw GGUF tensor bytes -> float32 tensor of `shape` (torch order: last dim contiguous, e.g. [out, in]).

    Bit-exact with `gguf.quants.dequantize`. Raises `UnsupportedQuantType` naming the type and `name`, and
    `CorruptFile` when the byte count does not match `shape`.
    """
    qt = check_type(qtype, name)
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1] if shape else 1
    rb = row_nbytes(qt, n_cols, name)
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    data = as_byte_tensor(raw).reshape(-1)
    if data.numel() != n_rows * rb:
        raise CorruptFile(
            f"tensor {name!r}: {data.numel()} bytes of {qt.name} data, expected {n_rows * rb} for shape {list(shape)}"
        )
    ts = block_layout(qt)[1]
    return dequantize_blocks(data.view(-1, ts), qt).view(shape)
