// x86-64-v3 (AVX2 + FMA + F16C) primitives: u8 x s8 dots by vpmaddubsw + vpmaddwd (no saturation: |u| <= 128 and
// |x| <= 127 keep each pair below 2^15). CPUs with AVX-VNNI could use vpdpbusd here (same integers).
#pragma once

#include <immintrin.h>

namespace autoglm::isa {

constexpr const char* kName = "avx2";

inline __m256i dot32(__m256i u, __m256i x, __m256i init) {
  const __m256i p16 = _mm256_maddubs_epi16(u, x);
  return _mm256_add_epi32(init, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

}  // namespace autoglm::isa

#include "isa_x86.h"
