// Portable scalar ISA primitives: the reference every other isa_*.h must equal bit for bit (README.md). Plain C++;
// fma is std::fma (one rounding), the float sum is the canonical tree.
#pragma once

#include "common.h"

namespace autoglm::isa {

constexpr const char* kName = "scalar";

struct B32 {  // one 32-element sub-block's weight values: u8 (0..63), or s8 for Q8_0
  uint8_t b[32];
};
struct I8 {  // 8 int32 lanes
  int32_t v[8];
};
struct F8 {  // 8 float lanes
  float v[8];
};

inline float h2f(const uint8_t* p) { return autoglm::h2f(p); }

inline B32 load32(const uint8_t* p) {
  B32 r;
  std::memcpy(r.b, p, 32);
  return r;
}
inline B32 nibbles16(const uint8_t* p) {
  B32 r;
  for (int i = 0; i < 16; ++i) {
    r.b[i] = p[i] & 0x0F;
    r.b[i + 16] = p[i] >> 4;
  }
  return r;
}
inline B32 nibbles_lo(const B32& v) {
  B32 r;
  for (int i = 0; i < 32; ++i) r.b[i] = v.b[i] & 0x0F;
  return r;
}
inline B32 nibbles_hi(const B32& v) {
  B32 r;
  for (int i = 0; i < 32; ++i) r.b[i] = v.b[i] >> 4;
  return r;
}
// v[i] + 16 where bit i of bits is set (Q5_0's fifth bits)
inline B32 add16_bits32(B32 v, uint32_t bits) {
  for (int i = 0; i < 32; ++i) v.b[i] = static_cast<uint8_t>(v.b[i] + (((bits >> i) & 1u) << 4));
  return v;
}
// v[i] + 16 where h[i] & bit (Q5_K's fifth bits)
inline B32 add16_where(B32 v, const B32& h, uint8_t bit) {
  for (int i = 0; i < 32; ++i) v.b[i] = static_cast<uint8_t>(v.b[i] + ((h.b[i] & bit) ? 16 : 0));
  return v;
}
// Q6_K chunk j (0..3) of a 128-element half: low nibble of ql (j < 2) or high (j >= 2), plus bits 2j..2j+1 of qh
inline B32 q6k_chunk(const B32& ql, const B32& qh, int j) {
  B32 r;
  for (int i = 0; i < 32; ++i) {
    const uint8_t lo = (j >= 2 ? ql.b[i] >> 4 : ql.b[i]) & 0x0F;
    r.b[i] = static_cast<uint8_t>(lo | (((qh.b[i] >> (2 * j)) & 3) << 4));
  }
  return r;
}

// Integer dots of up to 8 consecutive 32-element blocks j < cnt (lanes j >= cnt are 0), split in halves:
// lo[j] = sum_{i<16} w_j[i] * x[32 j + i] + (ns4[8 j] + .. + ns4[8 j + 3]) * 2^SHIFT, hi[j] the same over i >= 16.
// SIGNED: w is int8 (Q8_0), else unsigned. Exact integers (any summation order gives the same value).
template <bool SIGNED, int SHIFT>
inline void dots8(const B32* w, int cnt, const int8_t* x, const int32_t* ns4, I8& lo, I8& hi) {
  for (int j = 0; j < 8; ++j) {
    int32_t s[2] = {0, 0};
    if (j < cnt) {
      for (int h = 0; h < 2; ++h) {
        for (int i = 16 * h; i < 16 * h + 16; ++i) {
          const int32_t wv = SIGNED ? static_cast<int8_t>(w[j].b[i]) : w[j].b[i];
          s[h] += wv * x[32 * j + i];
        }
        if (SHIFT > 0)
          for (int g = 4 * h; g < 4 * h + 4; ++g) s[h] += ns4[8 * j + g] * (1 << SHIFT);
      }
    }
    lo.v[j] = s[0];
    hi.v[j] = s[1];
  }
}

inline I8 add(const I8& a, const I8& b) {
  I8 r;
  for (int j = 0; j < 8; ++j) r.v[j] = a.v[j] + b.v[j];
  return r;
}
inline F8 zero() { return F8{{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}}; }
inline F8 load8(const float* p) {
  F8 r;
  std::memcpy(r.v, p, 32);
  return r;
}
inline F8 load8n(const float* p, int cnt) {  // lanes >= cnt are 0
  F8 r = zero();
  for (int j = 0; j < cnt; ++j) r.v[j] = p[j];
  return r;
}
inline F8 cvt(const I8& a) {
  F8 r;
  for (int j = 0; j < 8; ++j) r.v[j] = static_cast<float>(a.v[j]);
  return r;
}
inline F8 mul(const F8& a, const F8& b) {
  F8 r;
  for (int j = 0; j < 8; ++j) r.v[j] = a.v[j] * b.v[j];
  return r;
}
inline F8 fma(const F8& a, const F8& b, const F8& c) {  // a * b + c, one rounding per lane
  F8 r;
  for (int j = 0; j < 8; ++j) r.v[j] = std::fma(a.v[j], b.v[j], c.v[j]);
  return r;
}
// the canonical tree: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))
inline float hsum(const F8& a) {
  const float s0 = a.v[0] + a.v[4], s1 = a.v[1] + a.v[5], s2 = a.v[2] + a.v[6], s3 = a.v[3] + a.v[7];
  return (s0 + s2) + (s1 + s3);
}

}  // namespace autoglm::isa
