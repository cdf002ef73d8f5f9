// Fused kernels on raw GGUF (ggml) blocks, JIT-built by autoglm/quant/gguf_kernels.py.
//
// gemv:        y[M, N] = x[M, K] @ W[N, K].T with W kept as blocks. Activations are quantized to int8 per block of
//              32 (float32 scale, like llama.cpp's q8_0 but with an exact scale) and dotted with the weight blocks
//              by AVX512-VNNI vpdpbusd; the result equals F.linear(x_q, W) up to float32 summation order, where
//              x_q = scale * round(x / scale). Without VNNI a float-activation path (row dequantized in L1) is used.
// dequantize:  W as float32 / bfloat16 [N, K], bit-exact with ggml's dequantize_row_* (fp-contract off).
// decode helpers (end of file): rms_norm, add_rms_norm, norm_rope, attend_decode for the per-token path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__)
#define AUTOGLM_VNNI 1
#include <immintrin.h>
#else
#define AUTOGLM_VNNI 0
#endif

namespace {

// GGML type ids (gguf.GGMLQuantizationType)
enum QType : int64_t { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// block geometry: (elements, bytes)
inline bool layout(int64_t q, int64_t& bs, int64_t& ts) {
  switch (q) {
    case Q4_0: bs = 32; ts = 18; return true;
    case Q5_0: bs = 32; ts = 22; return true;
    case Q8_0: bs = 32; ts = 34; return true;
    case Q4_K: bs = 256; ts = 144; return true;
    case Q5_K: bs = 256; ts = 176; return true;
    case Q6_K: bs = 256; ts = 210; return true;
    default: return false;
  }
}

// 6-bit (scale, min) pair j of a Q4_K / Q5_K super-block (ggml get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// ---- dequantize one block -> float (same arithmetic order as ggml, so bit-exact) -----------------------------------
// __restrict: uint8 may alias anything, and without it the compiler will not vectorize the float stores
void deq_q8_0(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) y[i] = q[i] * d;
}

void deq_q4_0(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = ((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = ((qs[j] >> 4) - 8) * d;
  }
}

void deq_q5_0(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const uint8_t h0 = ((qh >> j) << 4) & 0x10;
    const uint8_t h1 = (qh >> (j + 12)) & 0x10;
    y[j] = (((qs[j] & 0x0F) | h0) - 16) * d;
    y[j + 16] = (((qs[j] >> 4) | h1) - 16) * d;
  }
}

void deq_q4_k(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* sc = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0; j < 4; ++j) {
    uint8_t s1, m1, s2, m2;
    scale_min_k4(2 * j, sc, s1, m1);
    scale_min_k4(2 * j + 1, sc, s2, m2);
    const float d1 = d * s1, mm1 = dmin * m1, d2 = d * s2, mm2 = dmin * m2;
    for (int l = 0; l < 32; ++l) y[64 * j + l] = d1 * (q[l] & 0xF) - mm1;
    for (int l = 0; l < 32; ++l) y[64 * j + 32 + l] = d2 * (q[l] >> 4) - mm2;
    q += 32;
  }
}

void deq_q5_k(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* sc = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  for (int j = 0; j < 4; ++j) {
    uint8_t s1, m1, s2, m2;
    scale_min_k4(2 * j, sc, s1, m1);
    scale_min_k4(2 * j + 1, sc, s2, m2);
    const float d1 = d * s1, mm1 = dmin * m1, d2 = d * s2, mm2 = dmin * m2;
    const uint8_t u1 = 1 << (2 * j), u2 = 2 << (2 * j);
    for (int l = 0; l < 32; ++l) y[64 * j + l] = d1 * ((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - mm1;
    for (int l = 0; l < 32; ++l) y[64 * j + 32 + l] = d2 * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - mm2;
    ql += 32;
  }
}

void deq_q6_k(const uint8_t* __restrict b, float* __restrict y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = h2f(b + 208);
  for (int n = 0; n < 2; ++n) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int8_t>((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

using DeqFn = void (*)(const uint8_t*, float*);

DeqFn deq_fn(int64_t q) {
  switch (q) {
    case Q4_0: return deq_q4_0;
    case Q5_0: return deq_q5_0;
    case Q8_0: return deq_q8_0;
    case Q4_K: return deq_q4_k;
    case Q5_K: return deq_q5_k;
    case Q6_K: return deq_q6_k;
    default: return nullptr;
  }
}

void deq_row(DeqFn f, const uint8_t* row, int64_t nb, int64_t bs, int64_t ts, float* y) {
  for (int64_t b = 0; b < nb; ++b) f(row + b * ts, y + b * bs);
}

// ---- activations quantized per 32: x ~= d[b] * q[32 b + i] --------------------------------------------------------
struct ActQ {
  const int8_t* q;     // [K]
  const float* d;      // [K/32] scale
  const float* s;      // [K/32] d * sum(q) of the block (the quantized block's sum, for Q4_K/Q5_K mins)
  const int32_t* ns4;  // [K/4] -sum of each 4 consecutive q (one vpdpbusd lane): pre-loads the zero-point term
};

void quantize_act_row(const float* x, int64_t K, int8_t* q, float* d, float* s, int32_t* ns4) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.f;
    const float id = db > 0.f ? 1.f / db : 0.f;
    int32_t sum = 0;
    for (int g = 0; g < 8; ++g) {
      int32_t s4 = 0;
      for (int i = 4 * g; i < 4 * g + 4; ++i) {
        int v = static_cast<int>(std::nearbyint(xb[i] * id));
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        q[32 * b + i] = static_cast<int8_t>(v);
        s4 += v;
      }
      ns4[8 * b + g] = -s4;
      sum += s4;
    }
    d[b] = db;
    s[b] = db * static_cast<float>(sum);
  }
}

#if AUTOGLM_VNNI
inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

inline float fh2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// s8 x s8 dot of 32 bytes via u8 x s8 vpdpbusd: |w| . (sign(w) * x)
inline __m256i dot_s8(__m256i init, __m256i w, __m256i x) {
  const __mmask32 neg = _mm256_movepi8_mask(w);
  const __m256i sx = _mm256_mask_sub_epi8(x, neg, _mm256_setzero_si256(), x);
  return _mm256_dpbusd_epi32(init, _mm256_abs_epi8(w), sx);
}

// 16 packed bytes -> 32 nibbles: low nibbles are elements 0..15, high nibbles 16..31
inline __m256i nibbles16(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

// ---- multi-row dots: each weight block is loaded and unpacked once, then dotted with R <= 8 activation rows ----
// y[r * ys] = W_row . x_r for r < R. The weight side (unpacking, |w| and sign, scales) is done once per block for all
// R rows. K-quants take a super-block's 8 blocks as a group: per row the 8 blocks' int32 vpdpbusd lanes are reduced to
// one int32 per block (exact), so one convert and one FMA per row apply all 8 scales (accumulator lane j holds
// sub-block j). Each row's arithmetic is the same for every R, so a row's result does not depend on the batch.
constexpr int kMaxTile = 8;

// p[0..7] (8 int32 lanes each) -> lo = sums of lanes 0..3 of p0..p7, hi = sums of lanes 4..7 (exact)
inline void hsum8_halves(const __m256i* p, __m256i& lo, __m256i& hi) {
  const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  lo = _mm256_permute2x128_si256(g0, g1, 0x20);
  hi = _mm256_permute2x128_si256(g0, g1, 0x31);
}

// per row r: p_j = u_j . x_r[block b0 + j] (+ init -2^SHIFT * sum4(x): the weight's zero point) for j < cnt;
// acc[r] += float(sum p_j) * ws_j * d_r[b0 + j]
template <int R, int SHIFT>
inline void group32(const __m256i* u, __m256 ws, int cnt, int64_t b0, const ActQ* a, __m256* acc) {
  const __m256i z = _mm256_setzero_si256();
  const __mmask8 valid = static_cast<__mmask8>((1u << cnt) - 1);
  for (int r = 0; r < R; ++r) {
    __m256i p[8];
    for (int j = 0; j < 8; ++j) {
      if (j < cnt) {
        const int64_t b = b0 + j;
        const __m256i init = SHIFT > 0 ? _mm256_slli_epi32(load256(a[r].ns4 + 8 * b), SHIFT) : z;
        p[j] = _mm256_dpbusd_epi32(init, u[j], load256(a[r].q + 32 * b));
      } else {
        p[j] = z;
      }
    }
    __m256i lo, hi;
    hsum8_halves(p, lo, hi);
    const __m256 ad = _mm256_maskz_loadu_ps(valid, a[r].d + b0);  // [8] activation scales of the group
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_mul_ps(ws, ad), acc[r]);
  }
}

// Q4_0 / Q5_0 / Q8_0: per block (rows of 640 columns are 20 blocks: groups of 8 measured slower here); one
// float accumulator vector per row (two for Q8_0: independent chains)
template <int R>
void dot_q8_0(const uint8_t* row, const ActQ* a, int64_t nb, float* y, int64_t ys) {
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  const __m256i z = _mm256_setzero_si256();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {  // two blocks per step: independent accumulators for ILP
    const uint8_t* k0 = row + 34 * b;
    const uint8_t* k1 = k0 + 34;
    const __m256i w0 = load256(k0 + 2), w1 = load256(k1 + 2);
    // s8 x s8 via u8 x s8 vpdpbusd: |w| . (sign(w) * x)
    const __mmask32 n0 = _mm256_movepi8_mask(w0), n1 = _mm256_movepi8_mask(w1);
    const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
    const float d0 = fh2f(k0), d1 = fh2f(k1);
    for (int r = 0; r < R; ++r) {
      const __m256i x0 = load256(a[r].q + 32 * b), x1 = load256(a[r].q + 32 * b + 32);
      const __m256i p0 = _mm256_dpbusd_epi32(z, a0, _mm256_mask_sub_epi8(x0, n0, z, x0));
      const __m256i p1 = _mm256_dpbusd_epi32(z, a1, _mm256_mask_sub_epi8(x1, n1, z, x1));
      acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * a[r].d[b]), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * a[r].d[b + 1]), acc1[r]);
    }
  }
  for (; b < nb; ++b) {
    const uint8_t* k0 = row + 34 * b;
    const __m256i w0 = load256(k0 + 2);
    const float d0 = fh2f(k0);
    for (int r = 0; r < R; ++r)
      acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8(z, w0, load256(a[r].q + 32 * b))),
                                _mm256_set1_ps(d0 * a[r].d[b]), acc0[r]);
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

template <int R>
void dot_q4_0(const uint8_t* row, const ActQ* a, int64_t nb, float* y, int64_t ys) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* k = row + 18 * b;
    const __m256i w = nibbles16(k + 2);
    const float d = fh2f(k);
    for (int r = 0; r < R; ++r) {
      // q in 0..15, value q - 8: the lane init -8 * sum4(x) supplies the offset
      const __m256i init = _mm256_slli_epi32(load256(a[r].ns4 + 8 * b), 3);
      const __m256i p = _mm256_dpbusd_epi32(init, w, load256(a[r].q + 32 * b));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a[r].d[b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(acc[r]);
}

template <int R>
void dot_q5_0(const uint8_t* row, const ActQ* a, int64_t nb, float* y, int64_t ys) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i h16 = _mm256_set1_epi8(16);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* k = row + 22 * b;
    uint32_t qh;
    std::memcpy(&qh, k + 2, 4);
    __m256i w = nibbles16(k + 6);
    w = _mm256_mask_add_epi8(w, static_cast<__mmask32>(qh), w, h16);  // bit j of qh is element j's 5th bit
    const float d = fh2f(k);
    for (int r = 0; r < R; ++r) {
      const __m256i init = _mm256_slli_epi32(load256(a[r].ns4 + 8 * b), 4);
      const __m256i p = _mm256_dpbusd_epi32(init, w, load256(a[r].q + 32 * b));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a[r].d[b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(acc[r]);
}

// Q4_K / Q5_K: w = d*sc[s]*q - dmin*m[s] per 32-element sub-block s; a super-block is one group of 8
template <bool Q5, int R>
void dot_qk_affine(const uint8_t* row, const ActQ* a, int64_t nsb, float* y, int64_t ys) {
  constexpr int64_t TS = Q5 ? 176 : 144;
  __m256 acc[R], macc[R];
  for (int r = 0; r < R; ++r) acc[r] = macc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), h16 = _mm256_set1_epi8(16);
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* k = row + TS * sb;
    const float d = fh2f(k), dmin = fh2f(k + 2);
    const uint8_t* scp = k + 4;
    const uint8_t* qs = k + (Q5 ? 48 : 16);
    __m256i qhv = _mm256_setzero_si256();
    if constexpr (Q5) qhv = load256(k + 16);
    __m256i u[8];
    alignas(32) float wsf[8], mf[8];
    for (int j = 0; j < 4; ++j) {
      uint8_t s1, mn1, s2, mn2;
      scale_min_k4(2 * j, scp, s1, mn1);
      scale_min_k4(2 * j + 1, scp, s2, mn2);
      const __m256i bytes = load256(qs + 32 * j);
      __m256i lo = _mm256_and_si256(bytes, m4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
      if constexpr (Q5) {
        lo = _mm256_mask_add_epi8(lo, _mm256_test_epi8_mask(qhv, _mm256_set1_epi8(1 << (2 * j))), lo, h16);
        hi = _mm256_mask_add_epi8(hi, _mm256_test_epi8_mask(qhv, _mm256_set1_epi8(2 << (2 * j))), hi, h16);
      }
      u[2 * j] = lo;
      u[2 * j + 1] = hi;
      wsf[2 * j] = d * s1;
      wsf[2 * j + 1] = d * s2;
      mf[2 * j] = dmin * mn1;
      mf[2 * j + 1] = dmin * mn2;
    }
    group32<R, 0>(u, _mm256_load_ps(wsf), 8, 8 * sb, a, acc);
    // the mins: sum_s dmin * m[s] * (d_x * sum(q_x)) over the 8 sub-blocks
    const __m256 mv = _mm256_load_ps(mf);
    for (int r = 0; r < R; ++r) macc[r] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(a[r].s + 8 * sb), macc[r]);
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(acc[r]) - hsum(macc[r]);
}

template <int R>
void dot_q6_k(const uint8_t* row, const ActQ* a, int64_t nsb, float* y, int64_t ys) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* k = row + 210 * sb;
    const __m256 d = _mm256_set1_ps(fh2f(k + 208));
    // 16 int8 scales: chunk c's elements 0..15 use sc[2c] (even), 16..31 sc[2c+1] (odd)
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + 192));
    const __m128i ev = _mm_shuffle_epi8(sc, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m128i od = _mm_shuffle_epi8(sc, _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m256 wl = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ev)));
    const __m256 wh = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(od)));
    __m256i u[8];
    for (int h = 0; h < 2; ++h) {
      const __m256i qhv = load256(k + 128 + 32 * h);
      for (int j = 0; j < 4; ++j) {
        const __m256i qlv = load256(k + 64 * h + 32 * (j & 1));
        const __m256i low = _mm256_and_si256(j >= 2 ? _mm256_srli_epi16(qlv, 4) : qlv, m4);
        const __m256i high = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qhv, 2 * j), 4), m30);
        u[4 * h + j] = _mm256_or_si256(low, high);  // chunk 4 h + j of the super-block, q in 0..63
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256i p[8];
      for (int c = 0; c < 8; ++c) {
        const int64_t b = 8 * sb + c;
        // value q - 32: the lane init -32 * sum4(x) supplies the offset
        const __m256i init = _mm256_slli_epi32(load256(a[r].ns4 + 8 * b), 5);
        p[c] = _mm256_dpbusd_epi32(init, u[c], load256(a[r].q + 32 * b));
      }
      __m256i lo, hi;
      hsum8_halves(p, lo, hi);
      const __m256 ad = _mm256_loadu_ps(a[r].d + 8 * sb);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(wl, ad), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(wh, ad), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(acc[r]);
}

// a tile of R activation rows against one weight row
using TileFn = void (*)(const uint8_t*, const ActQ*, int64_t, float*, int64_t);

template <template <int> class Dot>
struct Tiles {
  static constexpr TileFn fns[kMaxTile] = {Dot<1>::f, Dot<2>::f, Dot<3>::f, Dot<4>::f,
                                           Dot<5>::f, Dot<6>::f, Dot<7>::f, Dot<8>::f};
};

#define AUTOGLM_TILE(NAME, ...)              \
  template <int R>                           \
  struct NAME {                              \
    static constexpr TileFn f = __VA_ARGS__; \
  };
AUTOGLM_TILE(TQ4_0, dot_q4_0<R>)
AUTOGLM_TILE(TQ5_0, dot_q5_0<R>)
AUTOGLM_TILE(TQ8_0, dot_q8_0<R>)
AUTOGLM_TILE(TQ4_K, dot_qk_affine<false, R>)
AUTOGLM_TILE(TQ5_K, dot_qk_affine<true, R>)
AUTOGLM_TILE(TQ6_K, dot_q6_k<R>)
#undef AUTOGLM_TILE

// tiles[R - 1] computes R rows at once
const TileFn* tile_fns(int64_t q) {
  switch (q) {
    case Q4_0: return Tiles<TQ4_0>::fns;
    case Q5_0: return Tiles<TQ5_0>::fns;
    case Q8_0: return Tiles<TQ8_0>::fns;
    case Q4_K: return Tiles<TQ4_K>::fns;
    case Q5_K: return Tiles<TQ5_K>::fns;
    case Q6_K: return Tiles<TQ6_K>::fns;
    default: return nullptr;
  }
}
#endif

void check_raw(const torch::Tensor& raw, int64_t q, int64_t K, int64_t& bs, int64_t& ts) {
  TORCH_CHECK(layout(q, bs, ts), "gguf_kernels: unsupported GGML type id ", q);
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == torch::kUInt8 && raw.dim() == 2, "raw must be CPU uint8 2-D");
  TORCH_CHECK(K % bs == 0 && raw.size(1) == K / bs * ts, "raw row bytes ", raw.size(1), " do not match ", K, " columns");
  TORCH_CHECK(raw.stride(1) == 1, "raw rows must be contiguous");
}

float dot_float(const float* w, const float* x, int64_t K) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= K; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += w[i + j] * x[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < K; ++i) s += w[i] * x[i];
  return s;
}

}  // namespace

bool has_vnni() { return AUTOGLM_VNNI != 0; }

// y [M, N] float32 = x [M, K] float32 @ W.T; int8 activations (VNNI) unless exact_activations or no VNNI
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& raw, int64_t q, bool exact_activations) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = raw.size(0);
  int64_t bs, ts;
  check_raw(raw, q, K, bs, ts);
  const int64_t nb = K / bs, rs = raw.stride(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(8, N / (8 * at::get_num_threads()) + 1);
#if AUTOGLM_VNNI
  if (!exact_activations) {
    std::vector<int8_t> aq(M * K);
    std::vector<float> ad(M * K / 32), as(M * K / 32);
    std::vector<int32_t> an(M * K / 4);
    for (int64_t m = 0; m < M; ++m)
      quantize_act_row(xp + m * K, K, aq.data() + m * K, ad.data() + m * K / 32, as.data() + m * K / 32,
                       an.data() + m * K / 4);
    std::vector<ActQ> acts(M);
    for (int64_t m = 0; m < M; ++m)
      acts[m] = {aq.data() + m * K, ad.data() + m * K / 32, as.data() + m * K / 32, an.data() + m * K / 4};
    const TileFn* tiles = tile_fns(q);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = wp + n * rs;  // one row stays in L1; each block is unpacked once per tile of rows
        for (int64_t m = 0; m < M; m += kMaxTile) {
          const int64_t r = std::min<int64_t>(kMaxTile, M - m);
          tiles[r - 1](row, acts.data() + m, nb, yp + m * N + n, N);
        }
      }
    });
    return y;
  }
#endif
  const DeqFn f = deq_fn(q);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(K);
    for (int64_t n = n0; n < n1; ++n) {
      deq_row(f, wp + n * rs, nb, bs, ts, w.data());
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot_float(w.data(), xp + m * K, K);
    }
  });
  return y;
}

// out [N, K] (float32 or bfloat16, contiguous) = W; bit-exact float32 values (bfloat16: rounded to nearest even).
// Writing into a caller-owned buffer matters: a fresh 64 MiB tensor per call costs more in page faults than decoding.
void dequantize_out(const torch::Tensor& raw, int64_t q, int64_t K, torch::Tensor& out) {
  const int64_t N = raw.size(0);
  int64_t bs, ts;
  check_raw(raw, q, K, bs, ts);
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == torch::kFloat32) && out.is_contiguous() && out.size(0) == N &&
                  out.size(1) == K, "out must be a contiguous float32/bfloat16 [", N, ", ", K, "] tensor");
  const int64_t nb = K / bs, rs = raw.stride(0);
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  const DeqFn f = deq_fn(q);
  at::parallel_for(0, N, 4, [&](int64_t n0, int64_t n1) {
    std::vector<float> tmp(bf16 ? K : 0);
    for (int64_t n = n0; n < n1; ++n) {
      if (!bf16) {
        deq_row(f, wp + n * rs, nb, bs, ts, out.data_ptr<float>() + n * K);
        continue;
      }
      deq_row(f, wp + n * rs, nb, bs, ts, tmp.data());
      c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + n * K;
      for (int64_t i = 0; i < K; ++i) o[i] = c10::BFloat16(tmp[i]);
    }
  });
}

torch::Tensor dequantize(const torch::Tensor& raw, int64_t q, int64_t K, bool bf16) {
  auto out = torch::empty({raw.size(0), K}, raw.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  dequantize_out(raw, q, K, out);
  return out;
}

// x [M, K] float32 -> x_q as float32 (d * q): the activations the int8 path multiplies by (tests, error bounds)
torch::Tensor quantize_activations(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) % 32 == 0,
              "x must be float32 [M, K], K % 32 == 0");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int8_t> q(K);
  std::vector<float> d(K / 32), s(K / 32);
  std::vector<int32_t> n4(K / 4);
  auto out = torch::empty_like(x);
  for (int64_t m = 0; m < M; ++m) {
    quantize_act_row(x.data_ptr<float>() + m * K, K, q.data(), d.data(), s.data(), n4.data());
    float* o = out.data_ptr<float>() + m * K;
    for (int64_t i = 0; i < K; ++i) o[i] = d[i / 32] * q[i];
  }
  return out;
}

// ---- decode-path helpers (float32, CPU): fused small ops that cost more in dispatch than in arithmetic ------------
// Used by autoglm/layers (norm, rotary, attention) when the extension is installed; each equals its torch
// composition up to float32 summation order (tests/unit/test_decode_ops.py).

namespace {

// sum of squares with 16 independent lanes (fp-contract is off and there is no -ffast-math: the lanes are what
// lets the compiler vectorize the reduction)
inline float sumsq(const float* x, int64_t D) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= D; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < D; ++i) s += x[i] * x[i];
  return s;
}

// out = x * rsqrt(mean(x^2) + eps) * (offset + w); w == nullptr: no scale
inline void norm_row(const float* x, const float* w, float offset, float eps, int64_t D, float* out) {
  const float r = 1.f / std::sqrt(sumsq(x, D) / static_cast<float>(D) + eps);
  if (w == nullptr) {
    for (int64_t i = 0; i < D; ++i) out[i] = x[i] * r;
  } else {
    for (int64_t i = 0; i < D; ++i) out[i] = x[i] * r * (offset + w[i]);
  }
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), name,
              " must be a contiguous CPU float32 tensor");
}

const float* weight_ptr(const c10::optional<torch::Tensor>& w, int64_t D) {
  if (!w.has_value()) return nullptr;
  check_rows(*w, "norm weight");
  TORCH_CHECK(w->numel() == D, "norm weight has ", w->numel(), " elements for rows of ", D);
  return w->data_ptr<float>();
}

}  // namespace

// x [..., D] -> rms_norm(x) * (offset + w) (w None: no scale); rows in parallel
torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, double offset) {
  check_rows(x, "x");
  const int64_t D = x.size(-1), T = x.numel() / D;
  const float* wp = weight_ptr(w, D);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) norm_row(xp + t * D, wp, offset, eps, D, op + t * D);
  });
  return out;
}

// The sandwich-norm residual step: h' = h + rms_norm(y) * (offset + w1); returns (h', rms_norm(h') * (offset + w2))
// or (h', None) without w2. h and y [T, D].
std::tuple<torch::Tensor, c10::optional<torch::Tensor>> add_rms_norm(
    const torch::Tensor& h, const torch::Tensor& y, const torch::Tensor& w1, const c10::optional<torch::Tensor>& w2,
    double eps, double offset) {
  check_rows(h, "h");
  check_rows(y, "y");
  TORCH_CHECK(h.sizes() == y.sizes(), "h and y must have the same shape");
  const int64_t D = h.size(-1), T = h.numel() / D;
  const float* w1p = weight_ptr(w1, D);
  const float* w2p = weight_ptr(w2, D);
  auto hn = torch::empty_like(h);
  c10::optional<torch::Tensor> xn;
  if (w2p != nullptr) xn = torch::empty_like(h);
  const float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>();
  float* hnp = hn.data_ptr<float>();
  float* xnp = w2p != nullptr ? xn->data_ptr<float>() : nullptr;
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> tmp(D);
    for (int64_t t = t0; t < t1; ++t) {
      norm_row(yp + t * D, w1p, offset, eps, D, tmp.data());
      float* o = hnp + t * D;
      for (int64_t i = 0; i < D; ++i) o[i] = hp[t * D + i] + tmp[i];
      if (xnp != nullptr) norm_row(o, w2p, offset, eps, D, xnp + t * D);
    }
  });
  return {hn, xn};
}

// x [T, H, D]: optional per-head rms_norm (w [D]), then rotary over the first R dims: out = n * cos + partner * sin
// with cos/sin [T, D] whole-head tables (sign folded into sin); partner of d is d^1 (interleaved) or d +- R/2.
torch::Tensor norm_rope(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, double offset,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t R, bool interleaved) {
  check_rows(x, "x");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(x.dim() == 3, "x must be [T, H, D]");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = R / 2;
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D, "cos/sin must hold [T, D] values");
  TORCH_CHECK(R % 2 == 0 && R <= D, "rotary dims must be even and <= head dims");
  const float* wp = weight_ptr(w, D);
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T * H, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> nrm(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / H;
      const float* src = xp + r * D;
      if (wp != nullptr) {
        norm_row(src, wp, offset, eps, D, nrm.data());
        src = nrm.data();
      }
      const float *c = cp + t * D, *sn = sp + t * D;
      float* o = op + r * D;
      if (interleaved) {
        for (int64_t i = 0; i < half; ++i) {
          o[2 * i] = src[2 * i] * c[2 * i] + src[2 * i + 1] * sn[2 * i];
          o[2 * i + 1] = src[2 * i + 1] * c[2 * i + 1] + src[2 * i] * sn[2 * i + 1];
        }
      } else {
        for (int64_t d = 0; d < half; ++d) o[d] = src[d] * c[d] + src[d + half] * sn[d];
        for (int64_t d = half; d < R; ++d) o[d] = src[d] * c[d] + src[d - half] * sn[d];
      }
      for (int64_t d = R; d < D; ++d) o[d] = src[d];
    }
  });
  return out;
}

#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// ---- single-query attention over a cache span (decode) ---------------------------------------------------------
// Memory-bound: every step reads each layer's whole K/V span once, so the loops stream rows in order, read a K row
// once for all the query heads that share it, and accept float16/bfloat16 caches converted in registers.

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

#if defined(__AVX512F__) && defined(__F16C__)
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// s[g * sn + j] = q[g] . k[j] for GB heads g and keys j in [j0, j1); D % 16 == 0
template <int GB, typename T>
void scores_avx(const float* q, const T* k, int64_t ks, int64_t j0, int64_t j1, int64_t D, float* s, int64_t sn) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* kr = k + j * ks;
    __m512 a[GB];
    for (int g = 0; g < GB; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 x = load16(kr + d);
      for (int g = 0; g < GB; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), x, a[g]);
    }
    for (int g = 0; g < GB; ++g) s[g * sn + j] = _mm512_reduce_add_ps(a[g]);
  }
}

// out[g, c0:c0+64] = sum_j p[g * pn + j] v[j, c0:c0+64] for GB heads
template <int GB, typename T>
void values_avx(const float* p, int64_t pn, const T* v, int64_t vs, int64_t n, int64_t c0, int64_t D, float* out) {
  __m512 acc[GB][4];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = v + j * vs + c0;
    __m512 x[4];
    for (int c = 0; c < 4; ++c) x[c] = load16(vr + 16 * c);
    for (int g = 0; g < GB; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * pn + j]);
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_fmadd_ps(w, x[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + g * D + c0 + 16 * c, acc[g][c]);
}
#define AUTOGLM_ATTN_AVX 1
#else
#define AUTOGLM_ATTN_AVX 0
#endif

template <typename T>
void attend_impl(const float* q, const T* k, const T* v, int64_t ks0, int64_t ks1, int64_t vs0, int64_t vs1,
                 int64_t n, int64_t H, int64_t KV, int64_t D, float scale, float* out) {
  const int64_t G = H / KV;
  std::vector<float> s(H * n);  // scores / probabilities [H, n]
  const bool fast = AUTOGLM_ATTN_AVX && D % 64 == 0;
  at::parallel_for(0, n, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t kh = 0; kh < KV; ++kh) {
      const T* kb = k + kh * ks1;
      int64_t g = 0;
#if AUTOGLM_ATTN_AVX
      if (fast) {
        for (; g + 4 <= G; g += 4) scores_avx<4>(q + (kh * G + g) * D, kb, ks0, j0, j1, D, s.data() + (kh * G + g) * n, n);
        for (; g < G; ++g) scores_avx<1>(q + (kh * G + g) * D, kb, ks0, j0, j1, D, s.data() + (kh * G + g) * n, n);
      }
#endif
      for (; g < G; ++g) {
        const float* qh = q + (kh * G + g) * D;
        for (int64_t j = j0; j < j1; ++j) {
          const T* kr = kb + j * ks0;
          float a = 0.f;
          for (int64_t d = 0; d < D; ++d) a += qh[d] * to_f(kr[d]);
          s[(kh * G + g) * n + j] = a;
        }
      }
    }
  });
  for (int64_t h = 0; h < H; ++h) {  // softmax(scale * s) per head, float32
    float* sh = s.data() + h * n;
    float m = sh[0];
    for (int64_t j = 1; j < n; ++j) m = std::max(m, sh[j]);
    float z = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      sh[j] = std::exp((sh[j] - m) * scale);
      z += sh[j];
    }
    const float inv = 1.f / z;
    for (int64_t j = 0; j < n; ++j) sh[j] *= inv;
  }
  // out[h] = sum_j p[h, j] v[j]: threads take (kv head, 64-column chunk) units, so V is read once, no reduction
  const int64_t chunks = (D + 63) / 64;
  at::parallel_for(0, KV * chunks, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t kh = u / chunks, c0 = (u % chunks) * 64, c = std::min<int64_t>(64, D - c0);
      const T* vb = v + kh * vs1;
      int64_t g = 0;
#if AUTOGLM_ATTN_AVX
      if (fast) {
        for (; g + 4 <= G; g += 4) values_avx<4>(s.data() + (kh * G + g) * n, n, vb, vs0, n, c0, D, out + (kh * G + g) * D);
        for (; g < G; ++g) values_avx<1>(s.data() + (kh * G + g) * n, n, vb, vs0, n, c0, D, out + (kh * G + g) * D);
      }
#endif
      for (; g < G; ++g) {
        const float* p = s.data() + (kh * G + g) * n;
        float* o = out + (kh * G + g) * D + c0;
        std::fill(o, o + c, 0.f);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t d = 0; d < c; ++d) o[d] += p[j] * to_f(vb[j * vs0 + c0 + d]);
      }
    }
  });
}

}  // namespace

// One query per head over n cached keys, all visible: q [H, D] float32; k, v [n, KV, D] float32 / float16 / bfloat16
// (rows may be strided; each head's D values contiguous) -> [H, D] float32. Head h uses KV head h / (H / KV), as
// transformers' repeat_kv; softmax in float32.
torch::Tensor attend_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  check_rows(q, "q");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.scalar_type() == v.scalar_type(), "k/v must be [n, KV, D]");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && k.stride(2) == 1 && v.stride(2) == 1,
              "k/v must be CPU tensors with contiguous heads");
  const int64_t n = k.size(0), KV = k.size(1), D = k.size(2), H = q.numel() / D;
  TORCH_CHECK(n > 0 && q.numel() == H * D && H % KV == 0, "q must be [H, D] with H a multiple of KV");
  auto out = torch::empty({H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t a = k.stride(0), b = k.stride(1), c = v.stride(0), d = v.stride(1);
  switch (k.scalar_type()) {
    case torch::kFloat32:
      attend_impl(qp, k.data_ptr<float>(), v.data_ptr<float>(), a, b, c, d, n, H, KV, D, sc, op);
      break;
    case torch::kFloat16:
      attend_impl(qp, k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(), a, b, c, d, n, H, KV, D, sc, op);
      break;
    case torch::kBFloat16:
      attend_impl(qp, k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), a, b, c, d, n, H, KV, D, sc, op);
      break;
    default:
      TORCH_CHECK(false, "attend_decode: unsupported cache dtype ", k.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_vnni", &has_vnni);
  m.def("gemv", &gemv, "y = x @ W.T on raw GGUF blocks", py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", &dequantize, "raw GGUF blocks -> float32/bfloat16", py::call_guard<py::gil_scoped_release>());
  m.def("dequantize_out", &dequantize_out, "raw GGUF blocks -> out", py::call_guard<py::gil_scoped_release>());
  m.def("quantize_activations", &quantize_activations);
  m.def("rms_norm", &rms_norm, "rms_norm(x) * (offset + w)");
  m.def("add_rms_norm", &add_rms_norm, "h + rms_norm(y) * (offset + w1), then its rms_norm * (offset + w2)");
  m.def("norm_rope", &norm_rope, "optional per-head rms_norm, then rotary (x * cos + x[perm] * sin)");
  m.def("attend_decode", &attend_decode, "one query per head over n visible cached keys",
        py::call_guard<py::gil_scoped_release>());
}
