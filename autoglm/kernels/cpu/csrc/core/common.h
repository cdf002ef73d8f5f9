// Torch-free core of the CPU kernels: GGML block geometry, fp16, per-32 int8 activations, dequantization and the
// decode GEMV over row ranges. Raw pointers + std only: the same files compile into the torch extension (one per ISA
// variant, autoglm/kernels/cpu/variants.py) and, with a plain g++ and a tiny driver, for another architecture.
// The numeric contract every ISA must keep is in README.md next to this file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <array>
#include <utility>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace autoglm {

// GGML type ids (gguf.GGMLQuantizationType)
enum QType : int64_t { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

// IEEE half -> float, exact (every half is a float); bit manipulation so no ISA or library is needed
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    int e = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
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

// q8_K activations for one 256-value super-block, as llama.cpp's quantize_row_q8_K_ref: the value of largest |x|
// (the first, if tied) maps to -127, iscale = -127 / max, q = min(127, round(iscale * x)), d = 1 / iscale (so d may
// be negative and q = -round(127 x / amax)); bsum16[g] = sum of q over values 16 g .. 16 g + 15. All zero when x is.
// The same integers on every ISA (part of the numeric contract: the K-quant packed tiles and kquant_q8k.h both read
// it): 16 independent max lanes, then the first value at that |x| (the same value the strict scan finds), and
// round-to-nearest-even by llama.cpp's nearest_int (add 1.5 * 2^23; exact for |v| < 2^22, here |v| <= 127), equal to
// std::nearbyint. A GEMV's fixed cost while the other threads wait: the plain loops (what -O3 makes of them) took
// ~0.29 us a super-block, 10 us for a 8,960-wide down projection's row; the AVX-512 / AVX2 bodies 0.09 us. NaN and
// infinities take the same integers on every path (max ignores a NaN |x|; the int32 -> int8 step truncates).
inline void quantize_q8k(const float* x, int8_t* q, float& d, int16_t* bsum16) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 lanes = _mm512_setzero_ps();
  // maxps returns its second operand when either is NaN: a NaN |x| keeps the lane, as std::max(lane, |x|)
  for (int i = 0; i < 256; i += 16) lanes = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + i), abs_mask), lanes);
  const float amax = _mm512_reduce_max_ps(lanes);
#elif defined(__AVX2__)
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 l0 = _mm256_setzero_ps(), l1 = _mm256_setzero_ps();
  for (int i = 0; i < 256; i += 16) {
    l0 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), l0);
    l1 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i + 8), abs_mask), l1);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(_mm256_max_ps(l0, l1)), _mm256_extractf128_ps(_mm256_max_ps(l0, l1), 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
  float lanes[16] = {0};
  for (int i = 0; i < 256; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] = std::max(lanes[j], std::fabs(x[i + j]));  // NaN: keeps the lane
  float amax = 0.f;
  for (float l : lanes) amax = std::max(amax, l);
#endif
  if (amax == 0.f) {
    d = 0.f;
    std::memset(q, 0, 256);
    std::memset(bsum16, 0, 16 * sizeof(int16_t));
    return;
  }
  int at = 0;  // the first value at amax (amax is one of the |x|)
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (const __m512 am = _mm512_set1_ps(amax);; at += 16) {
    const __mmask16 k = _mm512_cmp_ps_mask(_mm512_and_ps(_mm512_loadu_ps(x + at), abs_mask), am, _CMP_EQ_OQ);
    if (k) {
      at += __builtin_ctz(k);
      break;
    }
  }
#elif defined(__AVX2__)
  for (const __m256 am = _mm256_set1_ps(amax);; at += 8) {
    const int k = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + at), abs_mask), am, _CMP_EQ_OQ));
    if (k) {
      at += __builtin_ctz(k);
      break;
    }
  }
#else
  while (std::fabs(x[at]) != amax) ++at;
#endif
  const float iscale = -127.f / x[at];
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 is = _mm512_set1_ps(iscale), magic = _mm512_set1_ps(12582912.f);
  const __m512i off = _mm512_set1_epi32(0x4B400000), top = _mm512_set1_epi32(127);
  for (int g = 0; g < 16; ++g) {  // a separate multiply and add, as the plain loop under -ffp-contract=off
    const __m512 t = _mm512_add_ps(_mm512_mul_ps(is, _mm512_loadu_ps(x + 16 * g)), magic);
    const __m512i v = _mm512_min_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), off), top);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * g), _mm512_cvtepi32_epi8(v));  // truncating, as the cast
    bsum16[g] = static_cast<int16_t>(_mm512_reduce_add_epi32(v));
  }
  d = 1.f / iscale;
  return;
#elif defined(__AVX2__)
  const __m256 is = _mm256_set1_ps(iscale), magic = _mm256_set1_ps(12582912.f);
  const __m256i off = _mm256_set1_epi32(0x4B400000), top = _mm256_set1_epi32(127);
  // each int32's low byte to the front of its 128-bit lane, then the two lanes' first dwords together
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i gather = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  for (int g = 0; g < 16; ++g) {
    __m256i v[2];
    for (int h = 0; h < 2; ++h) {
      const __m256 t = _mm256_add_ps(_mm256_mul_ps(is, _mm256_loadu_ps(x + 16 * g + 8 * h)), magic);
      v[h] = _mm256_min_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), off), top);
      const __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v[h], low_bytes), gather);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + 16 * g + 8 * h), _mm256_castsi256_si128(b));
    }
    const __m256i s8 = _mm256_add_epi32(v[0], v[1]);
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    bsum16[g] = static_cast<int16_t>(_mm_cvtsi128_si32(s4));
  }
  d = 1.f / iscale;
  return;
#endif
  for (int g = 0; g < 16; ++g) {
    int32_t v[16];
    for (int i = 0; i < 16; ++i) {
      const float t = iscale * x[16 * g + i] + 12582912.f;  // 1.5 * 2^23: the integer lands in the low mantissa
      int32_t bits;
      std::memcpy(&bits, &t, 4);
      v[i] = std::min(127, bits - 0x4B400000);
    }
    int s = 0;
    for (int i = 0; i < 16; ++i) {
      q[16 * g + i] = static_cast<int8_t>(v[i]);
      s += v[i];
    }
    bsum16[g] = static_cast<int16_t>(s);
  }
  d = 1.f / iscale;
}

// one weight block -> float32, bit-exact with ggml (built with -ffp-contract=off)
using DeqFn = void (*)(const uint8_t*, float*);
DeqFn deq_fn(int64_t q);
void deq_row(DeqFn f, const uint8_t* row, int64_t nb, int64_t bs, int64_t ts, float* y);

// activations quantized per 32: x ~= d[b] * q[32 b + i], d = max|x_block| / 127; s[b] = d * sum(q of block b);
// ns4[j] = -(sum of q[4 j .. 4 j + 3]). Scalar code for every ISA: the int8 values are identical everywhere.
void quantize_act_row(const float* x, int64_t K, int8_t* q, float* d, float* s, int32_t* ns4);

// one quantized activation row (pointers into quantize_act_row's outputs)
struct ActQ {
  const int8_t* q;     // [K]
  const float* d;      // [K/32]
  const float* s;      // [K/32]
  const int32_t* ns4;  // [K/4]
};

// ---- decode GEMV (gemv_core.cpp, compiled once per ISA variant) ----
constexpr int kMaxTile = 8;  // activation rows sharing one unpacking of a weight block

// whether the core GEMV takes GGML type q
bool gemv_supported(int64_t q);
// y[m * ys + n] = W[n] . x_m for n in [n0, n1), m < M; W rows of nb blocks at wp + n * rs; acts[M] quantized rows
void gemv_rows(int64_t q, const uint8_t* wp, int64_t rs, int64_t nb, int64_t n0, int64_t n1, const ActQ* acts,
               int64_t M, float* y, int64_t ys);
// the ISA this core was compiled for ("scalar", "avx2", "avx512", "neon")
const char* isa_name();

}  // namespace autoglm
