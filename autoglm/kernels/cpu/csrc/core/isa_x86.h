// x86 primitives shared by isa_avx2.h and isa_avx512.h (AVX2 + FMA + F16C level). The including header first
// defines `dot32(w, x, init)`: init + the 8 int32 lanes of the u8 x s8 products of 32 bytes, lane i = bytes 4i..4i+3.
#pragma once

#include <immintrin.h>

#include "common.h"

namespace autoglm::isa {

using B32 = __m256i;
using I8 = __m256i;
using F8 = __m256;

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);  // exact, like half_to_float
}

inline B32 load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline B32 nibbles16(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
inline B32 nibbles_lo(B32 v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline B32 nibbles_hi(B32 v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
inline B32 add16_bits32(B32 v, uint32_t bits) {
  // byte i <- byte i/8 of bits, then test bit i%8
  __m256i q = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                  _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                                   2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bm = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  q = _mm256_cmpeq_epi8(_mm256_and_si256(q, bm), bm);
  return _mm256_add_epi8(v, _mm256_and_si256(q, _mm256_set1_epi8(16)));
}
inline B32 add16_where(B32 v, B32 h, uint8_t bit) {
  const __m256i b = _mm256_set1_epi8(static_cast<char>(bit));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(h, b), b);
  return _mm256_add_epi8(v, _mm256_and_si256(set, _mm256_set1_epi8(16)));
}
inline B32 q6k_chunk(B32 ql, B32 qh, int j) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  const __m256i low = _mm256_and_si256(j >= 2 ? _mm256_srli_epi16(ql, 4) : ql, m4);
  const __m256i high = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * j), 4), m30);
  return _mm256_or_si256(low, high);
}

// p[0..7] (8 int32 lanes each) -> lo = sums of lanes 0..3 of p0..p7, hi = sums of lanes 4..7 (exact)
inline void hsum8_halves(const __m256i* p, __m256i& lo, __m256i& hi) {
  const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  lo = _mm256_permute2x128_si256(g0, g1, 0x20);
  hi = _mm256_permute2x128_si256(g0, g1, 0x31);
}

template <bool SIGNED, int SHIFT>
inline void dots8(const B32* w, int cnt, const int8_t* x, const int32_t* ns4, I8& lo, I8& hi) {
  const __m256i z = _mm256_setzero_si256();
  __m256i p[8];
  for (int j = 0; j < 8; ++j) {
    if (j < cnt) {
      __m256i xv = load32(reinterpret_cast<const uint8_t*>(x + 32 * j));
      __m256i u = w[j];
      if constexpr (SIGNED) {  // s8 x s8 as |w| x (sign(w) * x)
        xv = _mm256_sign_epi8(xv, u);
        u = _mm256_abs_epi8(u);
      }
      const __m256i init =
          SHIFT > 0 ? _mm256_slli_epi32(load32(reinterpret_cast<const uint8_t*>(ns4 + 8 * j)), SHIFT) : z;
      p[j] = dot32(u, xv, init);
    } else {
      p[j] = z;
    }
  }
  hsum8_halves(p, lo, hi);
}

inline I8 add(I8 a, I8 b) { return _mm256_add_epi32(a, b); }
inline F8 zero() { return _mm256_setzero_ps(); }
inline F8 load8(const float* p) { return _mm256_loadu_ps(p); }
inline F8 load8n(const float* p, int cnt) {
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, m);
}
inline F8 cvt(I8 a) { return _mm256_cvtepi32_ps(a); }
inline F8 mul(F8 a, F8 b) { return _mm256_mul_ps(a, b); }
inline F8 fma(F8 a, F8 b, F8 c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(F8 v) {  // the canonical tree of isa_scalar.h
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

}  // namespace autoglm::isa
