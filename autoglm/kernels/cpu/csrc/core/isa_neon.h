// ARM64 NEON primitives (issue 17), bit-identical to isa_scalar.h. Integer dots by sdot (vdotq_s32) when the
// compiler targets +dotprod (__ARM_FEATURE_DOTPROD), else by vmull_s8 + vpadalq_s16 (plain ARMv8 NEON); both give
// the exact integers, so the two builds are equal to each other and to scalar. The float path is lane-wise
// vmulq/vfmaq (one rounding, like std::fma) and hsum is the canonical tree. Weights are 0..63 (or s8 for Q8_0) and
// activations s8, so a signed x signed dot needs no sign trick (unlike x86's u8 x s8 vpmaddubsw).
// smmla (i8mm) is not used: it computes a 2x2 tile (2 weight rows x 2 activation rows), which the one-row dots8
// primitive cannot express; it would pay only with a 2x2 primitive in gemv_core.cpp (BENCHMARKS.md, ARM64 section).
#pragma once

#include <arm_neon.h>

#include "common.h"

namespace autoglm::isa {

constexpr const char* kName = "neon";

struct B32 {  // 32 weight bytes: a = bytes 0..15, b = 16..31
  uint8x16_t a, b;
};
struct I8 {  // 8 int32 lanes: a = 0..3, b = 4..7
  int32x4_t a, b;
};
struct F8 {  // 8 float lanes: a = 0..3, b = 4..7
  float32x4_t a, b;
};

inline float h2f(const uint8_t* p) {
  __fp16 h;  // fcvt: exact, like half_to_float
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

inline B32 load32(const uint8_t* p) { return {vld1q_u8(p), vld1q_u8(p + 16)}; }
inline B32 nibbles16(const uint8_t* p) {
  const uint8x16_t v = vld1q_u8(p);
  return {vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8(v, 4)};
}
inline B32 nibbles_lo(const B32& v) {
  const uint8x16_t m4 = vdupq_n_u8(0x0F);
  return {vandq_u8(v.a, m4), vandq_u8(v.b, m4)};
}
inline B32 nibbles_hi(const B32& v) { return {vshrq_n_u8(v.a, 4), vshrq_n_u8(v.b, 4)}; }

// 16 bytes, byte i = 16 where bit i of the 16-bit value is set
inline uint8x16_t bits16_to_16s(uint32_t bits16) {
  static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t rep = vcombine_u8(vdup_n_u8(static_cast<uint8_t>(bits16)), vdup_n_u8(static_cast<uint8_t>(bits16 >> 8)));
  return vandq_u8(vtstq_u8(rep, vld1q_u8(kBit)), vdupq_n_u8(16));
}
inline B32 add16_bits32(B32 v, uint32_t bits) {
  return {vaddq_u8(v.a, bits16_to_16s(bits & 0xFFFFu)), vaddq_u8(v.b, bits16_to_16s(bits >> 16))};
}
inline B32 add16_where(B32 v, const B32& h, uint8_t bit) {
  const uint8x16_t b = vdupq_n_u8(bit), s16 = vdupq_n_u8(16);
  return {vaddq_u8(v.a, vandq_u8(vtstq_u8(h.a, b), s16)), vaddq_u8(v.b, vandq_u8(vtstq_u8(h.b, b), s16))};
}
inline B32 q6k_chunk(const B32& ql, const B32& qh, int j) {
  const uint8x16_t m4 = vdupq_n_u8(0x0F), m3 = vdupq_n_u8(3);
  const int8x16_t sh = vdupq_n_s8(static_cast<int8_t>(-2 * j));  // vshlq by a negative count = right shift
  const auto one = [&](uint8x16_t l, uint8x16_t h) {
    const uint8x16_t low = j >= 2 ? vshrq_n_u8(l, 4) : vandq_u8(l, m4);
    return vorrq_u8(low, vshlq_n_u8(vandq_u8(vshlq_u8(h, sh), m3), 4));
  };
  return {one(ql.a, qh.a), one(ql.b, qh.b)};
}

// init + the 4 int32 partial sums of 16 byte products (lane i = bytes 4i..4i+3 with sdot; another grouping
// without it; only the lane total is used, and it is exact either way)
inline int32x4_t dot16(int32x4_t init, int8x16_t w, int8x16_t x) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(init, w, x);
#else
  const int16x8_t p0 = vmull_s8(vget_low_s8(w), vget_low_s8(x));  // |w x| <= 128 * 128: fits int16
  const int16x8_t p1 = vmull_high_s8(w, x);
  return vpadalq_s16(vpadalq_s16(init, p0), p1);
#endif
}

// lanes j of {d0..d3}: the total of d_j's four lanes (exact)
inline int32x4_t total4(int32x4_t d0, int32x4_t d1, int32x4_t d2, int32x4_t d3) {
  return vpaddq_s32(vpaddq_s32(d0, d1), vpaddq_s32(d2, d3));
}

template <bool SIGNED, int SHIFT>
inline void dots8(const B32* w, int cnt, const int8_t* x, const int32_t* ns4, I8& lo, I8& hi) {
  int32x4_t pl[8], ph[8];
  for (int j = 0; j < 8; ++j) {
    if (j < cnt) {
      int32x4_t il = vdupq_n_s32(0), ih = il;
      if constexpr (SHIFT > 0) {  // ns4[8 j + g] * 2^SHIFT: the -2^SHIFT offset of unsigned q, lane-wise like x86
        il = vshlq_n_s32(vld1q_s32(ns4 + 8 * j), SHIFT);
        ih = vshlq_n_s32(vld1q_s32(ns4 + 8 * j + 4), SHIFT);
      }
      // SIGNED or not, the bytes reinterpret as s8: unsigned weights are <= 63
      pl[j] = dot16(il, vreinterpretq_s8_u8(w[j].a), vld1q_s8(x + 32 * j));
      ph[j] = dot16(ih, vreinterpretq_s8_u8(w[j].b), vld1q_s8(x + 32 * j + 16));
    } else {
      pl[j] = ph[j] = vdupq_n_s32(0);
    }
  }
  lo = {total4(pl[0], pl[1], pl[2], pl[3]), total4(pl[4], pl[5], pl[6], pl[7])};
  hi = {total4(ph[0], ph[1], ph[2], ph[3]), total4(ph[4], ph[5], ph[6], ph[7])};
}

inline I8 add(const I8& a, const I8& b) { return {vaddq_s32(a.a, b.a), vaddq_s32(a.b, b.b)}; }
inline F8 zero() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
inline F8 load8(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
inline F8 load8n(const float* p, int cnt) {  // lanes >= cnt are 0 (reads only p[0..cnt))
  if (cnt == 8) return load8(p);  // every full group: no copy (GCC makes the loop below a memcpy call)
  float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < cnt; ++j) t[j] = p[j];
  return load8(t);
}
inline F8 cvt(const I8& a) { return {vcvtq_f32_s32(a.a), vcvtq_f32_s32(a.b)}; }
inline F8 mul(const F8& a, const F8& b) { return {vmulq_f32(a.a, b.a), vmulq_f32(a.b, b.b)}; }
inline F8 fma(const F8& a, const F8& b, const F8& c) {  // a * b + c, one rounding (fmla)
  return {vfmaq_f32(c.a, a.a, b.a), vfmaq_f32(c.b, a.b, b.b)};
}
// the canonical tree ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): s = a + b, then (s0 + s2) + (s1 + s3)
inline float hsum(const F8& v) {
  const float32x4_t s = vaddq_f32(v.a, v.b);
  const float32x2_t t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
  return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
}

}  // namespace autoglm::isa
