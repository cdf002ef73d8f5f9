// The packed-layout tiles (layout: pack.cpp) shared by gemv_packed.cpp's driver: the activation row they read and the
// per-ISA block functions (packed_tiles_avx512.h: one vpdpbusd per quad vector; packed_tiles_avx2.h: two 256-bit
// halves with vpmaddubsw). Both compute the same exact integer dots and the same float ops per output in the same
// order, so their outputs are bitwise equal. AUTOGLM_PACKED (kernels.h) says whether this build has either.
#pragma once

#include "kernels.h"

namespace autoglm::packed {

// one activation row. Block-32 types (Q4_0, Q5_0, Q8_0): int8 per 32 (quantize_act_row), d per 32 and init =
// -off * sum(q) per 32. K-quants (Q4_K, Q6_K): q8_K (common.h quantize_q8k), d per 256, and for the integer
// super-block reduction of kquant_q8k.h: init16 = -32 * sum(q) per 16 (Q6_K's zero point), bsum16 = sum(q) per 16
// and bsum32 = sum(q) per 32 as int16, read two at a time as one int32 (Q6_K's offset, Q4_K's mins).
struct ActP {
  const int8_t* q;
  const float* d;
  const int32_t* init;
  const int32_t* init16;
  const int16_t* bsum16;
  const int16_t* bsum32;
};

#if AUTOGLM_PACKED
// ggml's get_scale_min_k4 for sub-block j of every row at once: B[t] holds scale byte t of the rows (one lane per
// row; 16 rows in the AVX-512 tiles, 8 in each AVX2 half)
inline void q4_k_scale_min(const __m128i* B, int j, __m128i& sc, __m128i& mn) {
  const __m128i m63 = _mm_set1_epi8(63), m15 = _mm_set1_epi8(15), m48 = _mm_set1_epi8(0x30);
  if (j < 4) {
    sc = _mm_and_si128(B[j], m63);
    mn = _mm_and_si128(B[j + 4], m63);
  } else {
    const __m128i top_s = _mm_and_si128(_mm_srli_epi16(B[j - 4], 2), m48);  // bits 6-7 -> 4-5
    const __m128i top_m = _mm_and_si128(_mm_srli_epi16(B[j], 2), m48);
    sc = _mm_or_si128(_mm_and_si128(B[j + 4], m15), top_s);
    mn = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(B[j + 4], 4), m15), top_m);
  }
}

// the mins of sub-blocks 2p and 2p + 1, interleaved per row lane: (m_2p, m_2p+1) byte pairs, rows 0-7 in lo and
// rows 8-15 in hi (an AVX2 half has 8 rows: lo only)
inline void q4_k_min_pairs(const __m128i* B, int p, __m128i& lo, __m128i& hi) {
  __m128i s0, m0, s1, m1;
  q4_k_scale_min(B, 2 * p, s0, m0);
  q4_k_scale_min(B, 2 * p + 1, s1, m1);
  lo = _mm_unpacklo_epi8(m0, m1);
  hi = _mm_unpackhi_epi8(m0, m1);
}

inline int32_t load_i32(const void* p) {  // two adjacent int16 as one int32 (little-endian: the first is the low half)
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
#endif

}  // namespace autoglm::packed

// each defines Acc (a tile row's 16 float accumulators), acc_zero, acc_store and the block functions simple_block<Q,
// R>, q4_k_block<R>, q6_k_block<R> (one 16-row group x one block, R activation rows)
#if AUTOGLM_VNNI
#include "packed_tiles_avx512.h"
#elif AUTOGLM_PACKED
#include "packed_tiles_avx2.h"
#endif
