// x86-64-v3 (AVX2 + FMA + F16C) primitives: u8 x s8 dots by vpmaddubsw + vpmaddwd (no saturation: |u| <= 128 and
// |x| <= 127 keep each pair below 2^15). The avxvnni variant (the same sources built with -mavxvnni) takes the VEX
// vpdpbusd instead: the same integers, one instruction.
#pragma once

#include <immintrin.h>

namespace autoglm::isa {

#if defined(__AVXVNNI__)
constexpr const char* kName = "avxvnni";

inline __m256i dot32(__m256i u, __m256i x, __m256i init) { return _mm256_dpbusd_avx_epi32(init, u, x); }
#else
constexpr const char* kName = "avx2";

inline __m256i dot32(__m256i u, __m256i x, __m256i init) {
  const __m256i p16 = _mm256_maddubs_epi16(u, x);
  return _mm256_add_epi32(init, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
#endif

}  // namespace autoglm::isa

#include "isa_x86.h"
