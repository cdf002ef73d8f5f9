// Decode GEMV of Q4_K / Q5_K / Q6_K weights on q8_K activations (int8 per 256 with one float scale and per-16
// sums), llama.cpp-style, torch-free: raw pointers, weight rows [n0, n1), up to KQ_MAX_M activation rows at once so
// each weight super-block is unpacked once. ISA by macro (AUTOGLM_ISA_AVX512 / AUTOGLM_ISA_AVX2 / none: scalar).
//
// Numeric contract (every ISA bitwise equal to scalar):
//  - quantize_row_q8k gives the same integers on every ISA: llama.cpp's quantize_row_q8_K_ref (common.h quantize_q8k).
//  - per super-block the weight is unpacked to unsigned u[256] with one int16 scale per 16; the integer dot
//    sumi = sum_g sc_g * sum_{i in g} u_i q_i (and the min/offset term from bsums) is exact int32, so any SIMD
//    order gives the same value.
//  - floats: one accumulator per (weight row, activation row), sequential over super-blocks:
//    acc = fma(float(sumi), d_w * d_x, acc); Q4_K/Q5_K then acc = fma(-float(summ), dmin_w * d_x, acc).
//    Build with -ffp-contract=off; the fmas are explicit (std::fma).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(AUTOGLM_ISA_AVX512) || defined(AUTOGLM_ISA_AVX2)
#include <immintrin.h>
#endif

namespace autoglm {
namespace kq {

constexpr int KQ_MAX_M = 8;

struct BlockQ8K {  // 256 activations: x ~= d * qs
  float d;
  int8_t qs[256];
  int16_t bsums[16];  // sum of each 16 qs
};

inline const char* kq_isa() {
#if defined(AUTOGLM_ISA_AVX512)
  return "avx512";
#elif defined(AUTOGLM_ISA_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// k multiple of 256; the same integers on every ISA (the activation grid is part of the contract: common.h quantize_q8k)
inline void quantize_row_q8k(const float* x, BlockQ8K* y, int64_t k) {
  for (int64_t b = 0; b < k / 256; ++b) quantize_q8k(x + 256 * b, y[b].qs, y[b].d, y[b].bsums);
}

struct Unpacked {  // one weight super-block, shared by the M activation rows
  alignas(64) uint8_t u[256];
  alignas(32) int16_t sc[16];  // scale per 16 (Q4_K/Q5_K: the 6-bit scale of its 32-block twice)
  int16_t mn[8];               // Q4_K/Q5_K: 6-bit min per 32
  float d, dmin;
};

inline void unpack_q4k(const uint8_t* b, Unpacked& w) {
  w.d = h2f(b);
  w.dmin = h2f(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    uint8_t s, m;
    scale_min_k4(j, scales, s, m);
    w.sc[2 * j] = w.sc[2 * j + 1] = s;
    w.mn[j] = m;
  }
#if defined(AUTOGLM_ISA_AVX512) || defined(AUTOGLM_ISA_AVX2)
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w.u + 64 * c), _mm256_and_si256(q, mask));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w.u + 64 * c + 32),
                       _mm256_and_si256(_mm256_srli_epi16(q, 4), mask));
  }
#else
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) {
      w.u[64 * c + l] = qs[32 * c + l] & 0xF;
      w.u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
    }
#endif
}

inline void unpack_q5k(const uint8_t* b, Unpacked& w) {
  w.d = h2f(b);
  w.dmin = h2f(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int j = 0; j < 8; ++j) {
    uint8_t s, m;
    scale_min_k4(j, scales, s, m);
    w.sc[2 * j] = w.sc[2 * j + 1] = s;
    w.mn[j] = m;
  }
#if defined(AUTOGLM_ISA_AVX512) || defined(AUTOGLM_ISA_AVX2)
  const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
  for (int c = 0; c < 4; ++c) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    const __m256i bl = _mm256_set1_epi8(static_cast<char>(1 << (2 * c)));
    const __m256i bh = _mm256_set1_epi8(static_cast<char>(1 << (2 * c + 1)));
    const __m256i hl = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bl), bl), b4);
    const __m256i hh = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bh), bh), b4);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w.u + 64 * c), _mm256_or_si256(_mm256_and_si256(q, m4), hl));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w.u + 64 * c + 32),
                       _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), hh));
  }
#else
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) {
      w.u[64 * c + l] = (qs[32 * c + l] & 0xF) | (((qh[l] >> (2 * c)) & 1) << 4);
      w.u[64 * c + 32 + l] = (qs[32 * c + l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
    }
#endif
}

inline void unpack_q6k(const uint8_t* b, Unpacked& w) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  w.d = h2f(b + 208);
  w.dmin = 0.0f;
  for (int g = 0; g < 16; ++g) w.sc[g] = sc[g];
#if defined(AUTOGLM_ISA_AVX512) || defined(AUTOGLM_ISA_AVX2)
  // the 2 high bits land at bit 4-5 of each byte; 16-bit shifts leak across bytes only into masked-off bits
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  for (int h = 0; h < 2; ++h, ql += 64, qh += 32) {
    uint8_t* u = w.u + 128 * h;
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
    const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    auto put = [&](int off, __m256i lo, __m256i hi) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(u + off),
                         _mm256_or_si256(_mm256_and_si256(lo, m4), _mm256_and_si256(hi, m30)));
    };
    put(0, a, _mm256_slli_epi16(hb, 4));
    put(32, b, _mm256_slli_epi16(hb, 2));
    put(64, _mm256_srli_epi16(a, 4), hb);
    put(96, _mm256_srli_epi16(b, 4), _mm256_srli_epi16(hb, 2));
  }
#else
  for (int h = 0; h < 2; ++h, ql += 64, qh += 32) {
    uint8_t* u = w.u + 128 * h;
    for (int l = 0; l < 32; ++l) {
      u[l] = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4);
      u[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
      u[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      u[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
    }
  }
#endif
}

// sum_g sc_g * sum_{i in g} u_i * q_i, exact int32 (u <= 63, |q| <= 127, |sc| <= 127)
inline int32_t dot_scaled(const Unpacked& w, const int8_t* q) {
#if defined(AUTOGLM_ISA_AVX512)
  __m512i acc = _mm512_setzero_si512();
  for (int c = 0; c < 4; ++c) {
    const __m512i u = _mm512_load_si512(reinterpret_cast<const void*>(w.u + 64 * c));
    const __m512i x = _mm512_loadu_si512(reinterpret_cast<const void*>(q + 64 * c));
    const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, x);  // lane l: elements 4l..4l+3
    // scale of lane l is sc[4c + l/4]
    const __m128i s16 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.sc + 4 * c));
    const __m512i s = _mm512_permutexvar_epi32(
        _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
        _mm512_zextsi128_si512(_mm_cvtepi16_epi32(s16)));
    acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(d, s));
  }
  return _mm512_reduce_add_epi32(acc);
#elif defined(AUTOGLM_ISA_AVX2)
  __m256i acc = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i u = _mm256_load_si256(reinterpret_cast<const __m256i*>(w.u + 32 * c));
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c));
    const __m256i p = _mm256_maddubs_epi16(u, x);  // int16 lanes 0-7: group 2c, 8-15: group 2c+1
    const __m256i s = _mm256_set_m128i(_mm_set1_epi16(w.sc[2 * c + 1]), _mm_set1_epi16(w.sc[2 * c]));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
  }
  __m128i r = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4E));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xB1));
  return _mm_cvtsi128_si32(r);
#else
  int32_t s = 0;
  for (int g = 0; g < 16; ++g) {
    int32_t t = 0;
    for (int i = 16 * g; i < 16 * g + 16; ++i) t += static_cast<int32_t>(w.u[i]) * q[i];
    s += w.sc[g] * t;
  }
  return s;
#endif
}

// y[m * ldy + n] = W[n] . x[m] for n in [n0, n1), m < M (M <= KQ_MAX_M); W rows (rs bytes apart) of nsb
// super-blocks of type qtype; X[m * nsb + b] is super-block b of activation row m
inline void gemv_q8k(int64_t qtype, const uint8_t* W, int64_t rs, int64_t nsb, const BlockQ8K* X, int M, float* Y, int64_t ldy,
                     int64_t n0, int64_t n1) {
  const int64_t ts = qtype == Q4_K ? 144 : (qtype == Q5_K ? 176 : 210);
  const bool has_min = qtype != Q6_K;
  Unpacked w;
  for (int64_t n = n0; n < n1; ++n) {
    float acc[KQ_MAX_M] = {};
    const uint8_t* row = W + n * rs;
    for (int64_t b = 0; b < nsb; ++b) {
      const uint8_t* blk = row + b * ts;
      if (qtype == Q4_K) unpack_q4k(blk, w);
      else if (qtype == Q5_K) unpack_q5k(blk, w);
      else unpack_q6k(blk, w);
      for (int m = 0; m < M; ++m) {
        const BlockQ8K& x = X[m * nsb + b];
        const int32_t sumi = dot_scaled(w, x.qs);
        if (has_min) {
          int32_t summ = 0;
          for (int j = 0; j < 8; ++j) summ += w.mn[j] * (x.bsums[2 * j] + x.bsums[2 * j + 1]);
          acc[m] = std::fma(static_cast<float>(sumi), w.d * x.d, acc[m]);
          acc[m] = std::fma(-static_cast<float>(summ), w.dmin * x.d, acc[m]);
        } else {
          int32_t off = 0;  // Q6_K stores q + 32
          for (int g = 0; g < 16; ++g) off += w.sc[g] * x.bsums[g];
          acc[m] = std::fma(static_cast<float>(sumi - 32 * off), w.d * x.d, acc[m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) Y[m * ldy + n] = acc[m];
  }
}

}  // namespace kq
}  // namespace autoglm
