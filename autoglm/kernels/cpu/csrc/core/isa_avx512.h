// x86-64-v4 + AVX512-VNNI primitives: u8 x s8 dots by vpdpbusd on 256-bit vectors (AVX512VL), the rest shared
// with AVX2 (isa_x86.h).
#pragma once

#include <immintrin.h>

namespace autoglm::isa {

constexpr const char* kName = "avx512";

inline __m256i dot32(__m256i u, __m256i x, __m256i init) { return _mm256_dpbusd_epi32(init, u, x); }

}  // namespace autoglm::isa

#include "isa_x86.h"
