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
// Plain C++ everywhere (part of the numeric contract: the K-quant packed tiles and kquant_q8k.h both read it), written
// so that -O3 vectorises it: 16 independent max lanes, then the first value at that |x| (the same value the strict
// scan finds), and round-to-nearest-even by llama.cpp's nearest_int (add 1.5 * 2^23; exact for |v| < 2^22, here
// |v| <= 127), equal to std::nearbyint. The scalar loops took ~5 us per 1536-value decode row, a GEMV's fixed cost
// while the other threads wait.
inline void quantize_q8k(const float* x, int8_t* q, float& d, int16_t* bsum16) {
  float lanes[16] = {0};
  for (int i = 0; i < 256; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] = std::max(lanes[j], std::fabs(x[i + j]));  // NaN: keeps the lane
  float amax = 0.f;
  for (float l : lanes) amax = std::max(amax, l);
  if (amax == 0.f) {
    d = 0.f;
    std::memset(q, 0, 256);
    std::memset(bsum16, 0, 16 * sizeof(int16_t));
    return;
  }
  int at = 0;
  while (std::fabs(x[at]) != amax) ++at;  // amax is one of the |x|
  const float iscale = -127.f / x[at];
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
