// AVX2 tiles of the packed layout (packed_tiles.h): the same bytes as the AVX-512 tiles read, as two 256-bit halves
// per 64-byte quad vector (rows 0-7, then rows 8-15). vpmaddubsw (u8 weights x the s8 activation quad broadcast)
// gives int16 pairs per row; int16 partial sums of G quads are widened by vpmaddwd with ones. G per type keeps
// every int16 exact (no saturation), with |x| <= 127 (quantize_act_row): 2 * G * umax * 127 <= 32767, i.e.
//   4-bit (Q4_0, Q4_K: u <= 15): G = 8 (30480); Q5_0 (u <= 31): G = 4 (31496); Q6_K (u <= 63): G = 2 (32004);
//   Q8_0 (stored w + 128): signed w, |w| x sign(x, w) per quad (G = 1: 2 * 128 * 127 = 32512), no zero point.
// The integer dots are exact, and the float ops per output are those of the AVX-512 tiles in the same order, so the
// outputs are bitwise equal. A tile row's accumulators are two __m256 (16 outputs).
#pragma once

namespace autoglm::packed {

struct Acc {
  __m256 v[2];
};
inline void acc_zero(Acc& a) { a.v[0] = a.v[1] = _mm256_setzero_ps(); }
inline void acc_store(const Acc& a, float* y) {
  _mm256_storeu_ps(y, a.v[0]);
  _mm256_storeu_ps(y + 8, a.v[1]);
}

inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i load64(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m256 load_half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 u8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 i8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
inline __m256i bcast4(const int8_t* p) {  // vpbroadcastd from memory: a load, no shuffle
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// init + sum over quads k < N of w[k] . (x quad k), int32 per row, int16 partial sums of G quads
template <int N, int G>
inline __m256i dot_quads(const __m256i* w, const int8_t* xb, __m256i acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int k0 = 0; k0 < N; k0 += G) {
    __m256i s = _mm256_maddubs_epi16(w[k0], bcast4(xb + 4 * k0));
    for (int k = k0 + 1; k < k0 + G; ++k) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[k], bcast4(xb + 4 * k)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, ones));
  }
  return acc;
}

// signed w[k] (Q8_0): sum over the 8 quads of w . x as |w| x sign(x, w)
inline __m256i dot_quads_signed(const __m256i* w, const int8_t* xb) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  for (int k = 0; k < 8; ++k) {
    const __m256i s = _mm256_maddubs_epi16(_mm256_abs_epi8(w[k]), _mm256_sign_epi8(bcast4(xb + 4 * k), w[k]));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, ones));
  }
  return acc;
}

// half h of 4 nibble vectors -> its 8 quad vectors
inline void nibbles(const uint8_t* p, int h, __m256i* w) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int t = 0; t < 4; ++t) {
    const __m256i v = load256(p + 64 * t + 32 * h);
    w[t] = _mm256_and_si256(v, m4);
    w[t + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  }
}

// v + 16 in byte i where bit i of bits is set (Q5_0's 5th bits of 8 rows x 4 elements)
inline __m256i add16_bits(__m256i v, uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(  // byte i <- byte i / 8 of bits
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bm = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bm), bm);
  return _mm256_add_epi8(v, _mm256_and_si256(set, _mm256_set1_epi8(16)));
}

// Q4_0 / Q5_0 / Q8_0 group: one 32-element block of 16 rows
template <int64_t Q, int R>
inline void simple_block(const uint8_t* g, int64_t b, const ActP* a, Acc* acc) {
  for (int h = 0; h < 2; ++h) {
    __m256i w[8];
    const __m256 dw = load_half8(g + 16 * h);
    if constexpr (Q == Q8_0) {
      for (int k = 0; k < 8; ++k) w[k] = _mm256_xor_si256(load256(g + 32 + 64 * k + 32 * h), _mm256_set1_epi8(-128));
    } else {
      nibbles(g + (Q == Q5_0 ? 96 : 32), h, w);
      if constexpr (Q == Q5_0) {
        for (int k = 0; k < 8; ++k) {
          uint32_t m;
          std::memcpy(&m, g + 32 + 8 * k + 4 * h, 4);  // bits 32h..32h+31 of word k: rows 8h..8h+7
          w[k] = add16_bits(w[k], m);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = a[r].q + 32 * b;
      __m256i dot;
      if constexpr (Q == Q8_0) {
        dot = dot_quads_signed(w, xb);  // = the u8 dot + init (-128 * sum(x)), exactly
      } else {
        dot = dot_quads<8, Q == Q5_0 ? 4 : 8>(w, xb, _mm256_set1_epi32(a[r].init[b]));
      }
      const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(a[r].d[b]));
      acc[r].v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[r].v[h]);
    }
  }
}

// Q4_K group: one 256-element super-block of 16 rows; w = d*sc[j]*q - dmin*m[j] per 32-element sub-block j
template <int R>
inline void q4_k_block(const uint8_t* g, int64_t sb, const ActP* a, Acc* acc) {
  for (int h = 0; h < 2; ++h) {
    const __m256 d = load_half8(g + 16 * h), dmin = load_half8(g + 32 + 16 * h);
    __m128i B[12];  // scale byte t of the 8 rows of this half
    for (int t = 0; t < 12; ++t) B[t] = load64(g + 64 + 16 * t + 8 * h);
    for (int j = 0; j < 8; ++j) {
      __m128i sc, mn;
      q4_k_scale_min(B, j, sc, mn);
      const __m256 scv = _mm256_mul_ps(d, u8_to_ps(sc)), mv = _mm256_mul_ps(dmin, u8_to_ps(mn));
      __m256i w[8];
      nibbles(g + 256 + 256 * j, h, w);
      const int64_t b = 8 * sb + j;
      for (int r = 0; r < R; ++r) {
        const __m256i dot = dot_quads<8, 8>(w, a[r].q + 32 * b, _mm256_setzero_si256());
        const __m256 sc_r = _mm256_mul_ps(scv, _mm256_set1_ps(a[r].d[b]));
        acc[r].v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc_r, acc[r].v[h]);
        acc[r].v[h] = _mm256_fnmadd_ps(mv, _mm256_set1_ps(a[r].s[b]), acc[r].v[h]);
      }
    }
  }
}

// no pair tile: two groups' weights and accumulators would not fit the 16 ymm registers
constexpr bool kPairQ4K = false;
constexpr int kPairRows = 1;
template <int R>
inline void q4_k_block2(const uint8_t*, int64_t, int64_t, const ActP*, Acc*) {}
constexpr bool kPairQ6K = false;
template <int R>
inline void q6_k_block2(const uint8_t*, int64_t, int64_t, const ActP*, Acc*) {}

// Q6_K group: one 256-element super-block of 16 rows; w = d*sc[e/16]*(q - 32)
template <int R>
inline void q6_k_block(const uint8_t* g, int64_t sb, const ActP* a, Acc* acc) {
  const __m256i m30 = _mm256_set1_epi8(0x30);
  for (int h = 0; h < 2; ++h) {
    const __m256 d = load_half8(g + 16 * h);
    for (int j = 0; j < 8; ++j) {
      const __m256 s_lo = _mm256_mul_ps(d, i8_to_ps(load64(g + 32 + 16 * (2 * j) + 8 * h)));
      const __m256 s_hi = _mm256_mul_ps(d, i8_to_ps(load64(g + 32 + 16 * (2 * j + 1) + 8 * h)));
      const uint8_t* sbp = g + 288 + 384 * j;
      __m256i w[8];
      nibbles(sbp, h, w);
      const __m256i H0 = load256(sbp + 256 + 32 * h), H1 = load256(sbp + 320 + 32 * h);
      // quad k's high bits sit at bits 2p of H[(k % 4) / 2], p = k % 2 + 2 (k / 4): move them to bits 4-5
      w[0] = _mm256_or_si256(w[0], _mm256_and_si256(_mm256_slli_epi16(H0, 4), m30));
      w[1] = _mm256_or_si256(w[1], _mm256_and_si256(_mm256_slli_epi16(H0, 2), m30));
      w[4] = _mm256_or_si256(w[4], _mm256_and_si256(H0, m30));
      w[5] = _mm256_or_si256(w[5], _mm256_and_si256(_mm256_srli_epi16(H0, 2), m30));
      w[2] = _mm256_or_si256(w[2], _mm256_and_si256(_mm256_slli_epi16(H1, 4), m30));
      w[3] = _mm256_or_si256(w[3], _mm256_and_si256(_mm256_slli_epi16(H1, 2), m30));
      w[6] = _mm256_or_si256(w[6], _mm256_and_si256(H1, m30));
      w[7] = _mm256_or_si256(w[7], _mm256_and_si256(_mm256_srli_epi16(H1, 2), m30));
      const int64_t b = 8 * sb + j;
      for (int r = 0; r < R; ++r) {
        const int8_t* xb = a[r].q + 32 * b;
        const __m256i lo = dot_quads<4, 2>(w, xb, _mm256_set1_epi32(a[r].init16[2 * b]));
        const __m256i hi = dot_quads<4, 2>(w + 4, xb + 16, _mm256_set1_epi32(a[r].init16[2 * b + 1]));
        const __m256 dx = _mm256_set1_ps(a[r].d[b]);
        acc[r].v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(s_lo, dx), acc[r].v[h]);
        acc[r].v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(s_hi, dx), acc[r].v[h]);
      }
    }
  }
}

}  // namespace autoglm::packed
