"""K-quant encoders (Q2_K .. Q6_K) in torch, following ggml's reference quantizers (`quantize_row_q*_K_ref`).

The `gguf` package only writes the simple block types, so these are ours. Every step is vectorised over all
sub-blocks of all super-blocks; the only Python loops are over the fixed search steps of the reference algorithm
(its candidate scales, or its coordinate-descent passes), never over blocks. Sums run in torch's order rather than
C's, so a rare block may differ from llama.cpp's bytes in a last-bit tie; the error is the same.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import QK_K, GGMLQuantizationType
from torch import Tensor

from autoglm.gguf.blocks import f16_bytes

Q = GGMLQuantizationType

GROUP_MAX_EPS = 1e-15  # ggml: a sub-block whose largest magnitude is below this is all zeros


def _f16_round(x: Tensor) -> Tensor:
    # the value a float16 field will decode to
    return x.to(torch.float16).float()


def _seqsum(t: Tensor) -> Tensor:
    # t: [N, n] -> [N], summed left to right like the C loops (torch's pairwise sums differ in the last bit,
    # which flips a few of the reference's tie-breaks); n is 16 or 32, the loop is over columns, not blocks
    cols = t.t().contiguous()
    acc = cols[0].clone()
    for c in cols[1:]:
        acc += c
    return acc


def _f32_affine(a: float, b: float, step: int, c: float) -> float:
    # a + b*step + c evaluated in float32 like the C reference (the candidate scales are float expressions)
    f = np.float32
    return float(f(f(a) + f(b) * f(step)) + f(c))


def _rdiv(num: float, den: Tensor) -> Tensor:
    # scalar / tensor as one IEEE division: torch's `2.0 / t` is `t.reciprocal() * 2.0`, which rounds twice
    return torch.full_like(den, num) / den


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # num / den where den != 0, else 0 (keeps inf/nan out of rows the caller masks anyway)
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


# --- per-sub-block scale searches (x: [N, n] rows are sub-blocks) --------------------------------------------------
def make_qkx2_quants(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric (scale, min) fit with a grid search over the scale. Returns L [N, n] uint8, scale [N], -min [N]."""

    def err(diff: Tensor) -> Tensor:
        return diff.abs() if use_mad else diff * diff

    mn = x.amin(dim=1).clamp(max=0)  # the min is never above zero
    mx = x.amax(dim=1)
    flat = mx == mn
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = _rdiv(nmax, rng)
    scale = _rdiv(1.0, iscale)
    L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    best = _seqsum(w * err(scale[:, None] * L + mn[:, None] - x))
    for step in range(nstep + 1):
        rng = torch.where(flat, torch.ones_like(mx), mx - mn)
        iscale = _rdiv(_f32_affine(rmin, rdelta, step, nmax), rng)
        la = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
        sum_l = _seqsum(w * la)
        sum_l2 = _seqsum(w * la * la)
        sum_xl = _seqsum(w * la * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _safe_div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clip = this_min > 0  # a positive min is not representable: refit the scale alone
        this_scale = torch.where(clip, _safe_div(sum_xl, sum_l2), this_scale)
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        cur = _seqsum(w * err(this_scale[:, None] * la + this_min[:, None] - x))
        better = (D > 0) & (cur < best) & ~flat
        L = torch.where(better[:, None], la, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return L.to(torch.uint8), scale, -mn


def make_qx_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric fit weighted by x^2 (rmse_type 1), searching 18 scales around nmax. Returns L [N, n] (0..2nmax-1)
    and the scale [N] (signed: it maps L - nmax back to x)."""
    amax_i = x.abs().argmax(dim=1, keepdim=True)
    mx = x.gather(1, amax_i).squeeze(1)
    zero = x.abs().amax(dim=1) < GROUP_MAX_EPS
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lv = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return lv, _seqsum(w * x * lv), _seqsum(w * lv * lv)

    lv, sumlx, suml2 = fit(_rdiv(-nmax, mx_safe))
    scale = _safe_div(sumlx, suml2)
    best = scale * sumlx
    L = lv
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = fit(_rdiv(-_f32_affine(nmax, 0.1, step, 0), mx_safe))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better[:, None], lv, L)
        cand = _safe_div(sumlx, suml2)
        scale = torch.where(better, cand, scale)
        best = torch.where(better, cand * sumlx, best)
    L = torch.where(zero[:, None], torch.full_like(L, -nmax), L) + nmax  # ggml leaves L = 0 for all-zero groups
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return L.to(torch.uint8), scale


def make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric fit refined by coordinate descent (5 passes, one element at a time, x^2 weights).
    Returns L [N, n] (0..2nmax-1) and the scale [N]."""
    amax_i = x.abs().argmax(dim=1, keepdim=True)
    mx = x.gather(1, amax_i).squeeze(1)
    zero = x.abs().amax(dim=1) < GROUP_MAX_EPS
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)
    L = torch.round(_rdiv(-nmax, mx_safe)[:, None] * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx = _seqsum(w * x * L)
    suml2 = _seqsum(w * L * L)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[1]):  # sequential over element positions, as the reference does
            xi, wi, li = x[:, i], w[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = torch.round(_safe_div(xi * sl2, slx)).clamp(-nmax, nmax - 1)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    scale = torch.where(zero, torch.zeros_like(sumlx), _safe_div(sumlx, suml2))
    L = torch.where(zero[:, None], torch.full_like(L, -nmax), L) + nmax
    return L.to(torch.uint8), scale


# --- packing helpers ---------------------------------------------------------------------------------------------
def _pack_2bit(L: Tensor) -> Tensor:
    # L: [nb, 256] in 0..3 -> [nb, 64]: byte l of half h = L[128h + l] | L[128h+l+32] << 2 | ... << 6
    q = L.view(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=L.device).view(1, 1, 4, 1)
    return (q << shifts).sum(dim=2, dtype=torch.uint8).view(-1, 64)


def _pack_k4_scales(ls: Tensor, lm: Tensor) -> Tensor:
    # ls, lm: [nb, 8] 6-bit scales and mins -> the 12-byte packing of Q4_K / Q5_K
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat((lo, mid, hi), dim=1)


def _requantize(x: Tensor, d: Tensor, m: Tensor, L: Tensor, lo: int, hi: int) -> Tensor:
    # with the stored (fp16-rounded) scales: L = round((x + m) / d), kept where d == 0 (as ggml's `continue`)
    # x: [nb, S, n], d/m: [nb, S]
    ok = (d != 0)[..., None]
    q = torch.round((x + m[..., None]) / torch.where(ok, d[..., None], torch.ones_like(d[..., None]))).clamp(lo, hi)
    return torch.where(ok, q, L.float())


# --- super-block encoders: x [nb, 256] float32 -> [nb, type_size] uint8 -----------------------------------------
def _enc_k_scale_min(x: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[Tensor, ...]:
    # shared by Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32 with a 6-bit scale and min each
    nb = x.shape[0]
    xs = x.view(nb * 8, 32)
    av_x = torch.sqrt(_seqsum(xs * xs)[:, None] / 32)
    L, scales, mins = make_qkx2_quants(xs, av_x + xs.abs(), nmax, rmin, rdelta, nstep, use_mad=False)
    scales, mins, L = scales.view(nb, 8), mins.view(nb, 8), L.view(nb, 8, 32)
    max_scale = scales.amax(dim=1).clamp(min=0)
    max_min = mins.amax(dim=1).clamp(min=0)
    inv_scale = _safe_div(torch.full_like(max_scale, 63.0), max_scale)
    inv_min = _safe_div(torch.full_like(max_min, 63.0), max_min)
    ls = torch.round(inv_scale[:, None] * scales).clamp(0, 63).to(torch.uint8)
    lm = torch.round(inv_min[:, None] * mins).clamp(0, 63).to(torch.uint8)
    d, dmin = (max_scale / 63)[:, None], (max_min / 63)[:, None]
    dl = _f16_round(d) * ls.float()
    ml = _f16_round(dmin) * lm.float()
    L = _requantize(x.view(nb, 8, 32), dl, ml, L, 0, nmax).to(torch.uint8)
    head = torch.cat((f16_bytes(d), f16_bytes(dmin), _pack_k4_scales(ls, lm)), dim=1)
    return head, L


def _enc_q4_k(x: Tensor) -> Tensor:
    head, L = _enc_k_scale_min(x, 15, -1.0, 0.1, 20)
    qs = (L.view(-1, 4, 2, 32)[:, :, 0] | (L.view(-1, 4, 2, 32)[:, :, 1] << 4)).view(-1, 128)
    return torch.cat((head, qs), dim=1)


def _enc_q5_k(x: Tensor) -> Tensor:
    head, L = _enc_k_scale_min(x, 31, -0.5, 0.1, 15)
    low = L & 0x0F
    qs = (low.view(-1, 4, 2, 32)[:, :, 0] | (low.view(-1, 4, 2, 32)[:, :, 1] << 4)).view(-1, 128)
    shifts = torch.arange(8, dtype=torch.uint8, device=x.device).view(1, 8, 1)
    qh = ((L >> 4) << shifts).sum(dim=1, dtype=torch.uint8)  # [nb, 32]: bit k = high bit of sub-block k
    return torch.cat((head, qh, qs), dim=1)


def _enc_q6_k(x: Tensor) -> Tensor:
    nb = x.shape[0]
    L, scales = make_qx_quants(x.view(nb * 16, 16), 32)
    scales, L = scales.view(nb, 16), L.view(nb, 16, 16)
    max_scale = scales.gather(1, scales.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _rdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d = _rdiv(1.0, iscale)[:, None]
    sc = torch.round(iscale[:, None] * scales).clamp(-128, 127)
    dl = _f16_round(d) * sc
    L = _requantize(x.view(nb, 16, 16), dl, torch.zeros_like(dl), L.float() - 32, -32, 31) + 32
    L = L.to(torch.uint8).view(nb, 2, 4, 32)
    ql = torch.cat(((L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)), 2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=x.device).view(1, 1, 4, 1)
    qh = ((L >> 4) << shifts).sum(dim=2, dtype=torch.uint8)  # [nb, 2, 32]
    out = torch.cat((ql.reshape(nb, 128), qh.reshape(nb, 64), sc.to(torch.int8).view(torch.uint8), f16_bytes(d)), 1)
    return torch.where(zero[:, None], torch.zeros_like(out), out)  # ggml zeroes the whole block


def _enc_q3_k(x: Tensor) -> Tensor:
    nb = x.shape[0]
    L, scales = make_q3_quants(x.view(nb * 16, 16), 4)
    scales, L = scales.view(nb, 16), L.view(nb, 16, 16)
    max_scale = scales.gather(1, scales.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    has = max_scale != 0
    iscale = _rdiv(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    ls = (torch.round(iscale[:, None] * scales).clamp(-32, 31) + 32).to(torch.uint8)
    ls = torch.where(has[:, None], ls, torch.zeros_like(ls))
    d = torch.where(has, _rdiv(1.0, iscale), torch.zeros_like(iscale))[:, None]
    packed_lo = (ls[:, :8] & 0x0F) | ((ls[:, 8:] & 0x0F) << 4)
    hi2 = (ls >> 4).view(nb, 4, 4)  # [nb, j // 4, j % 4]
    packed_hi = (hi2 << torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=x.device).view(1, 4, 1)).sum(
        dim=1, dtype=torch.uint8
    )
    dl = _f16_round(d) * (ls.float() - 32)
    L = _requantize(x.view(nb, 16, 16), dl, torch.zeros_like(dl), L.float() - 4, -4, 3) + 4
    L = L.to(torch.uint8).view(nb, 8, 32)  # row k covers elements 32k .. 32k+31
    shifts = torch.arange(8, dtype=torch.uint8, device=x.device).view(1, 8, 1)
    hmask = ((L >> 2) << shifts).sum(dim=1, dtype=torch.uint8)  # bit k of hmask[m] = "L[32k + m] > 3"
    qs = _pack_2bit((L & 3).view(nb, 256))
    return torch.cat((hmask, qs, packed_lo, packed_hi, f16_bytes(d)), dim=1)


def _enc_q2_k(x: Tensor) -> Tensor:
    nb = x.shape[0]
    xs = x.view(nb * 16, 16)
    L, scales, mins = make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, L = scales.view(nb, 16), mins.view(nb, 16), L.view(nb, 16, 16)
    max_scale = scales.amax(dim=1).clamp(min=0)
    max_min = mins.amax(dim=1).clamp(min=0)
    ls = torch.round(_safe_div(torch.full_like(max_scale, 15.0), max_scale)[:, None] * scales).clamp(0, 15)
    lm = torch.round(_safe_div(torch.full_like(max_min, 15.0), max_min)[:, None] * mins).clamp(0, 15)
    d, dmin = (max_scale / 15)[:, None], (max_min / 15)[:, None]
    dl, ml = _f16_round(d) * ls, _f16_round(dmin) * lm
    L = _requantize(x.view(nb, 16, 16), dl, ml, L, 0, 3).to(torch.uint8)
    sc = ls.to(torch.uint8) | (lm.to(torch.uint8) << 4)
    return torch.cat((sc, _pack_2bit(L.view(nb, 256)), f16_bytes(d), f16_bytes(dmin)), dim=1)


K_ENCODERS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
    Q.Q2_K: _enc_q2_k,
    Q.Q3_K: _enc_q3_k,
    Q.Q4_K: _enc_q4_k,
    Q.Q5_K: _enc_q5_k,
    Q.Q6_K: _enc_q6_k,
}

assert all(QK_K == 256 for _ in K_ENCODERS)  # the layouts above are written for 256-element super-blocks
