// Dequantization of raw GGUF blocks (bit-exact with ggml's dequantize_row_*, built with fp-contract off) and the
// per-32 int8 activation quantizer the decode GEMV multiplies by. Scalar C++ for every ISA variant.
#include "common.h"

namespace autoglm {
namespace {

// __restrict: uint8 may alias anything, and without it the compiler will not vectorize the float stores
void deq_q8_0(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) y[i] = q[i] * d;
}

void deq_q4_0(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = ((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = ((qs[j] >> 4) - 8) * d;
  }
}

void deq_q5_0(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const uint8_t h0 = ((qh >> j) << 4) & 0x10;
    const uint8_t h1 = (qh >> (j + 12)) & 0x10;
    y[j] = (((qs[j] & 0x0F) | h0) - 16) * d;
    y[j + 16] = (((qs[j] >> 4) | h1) - 16) * d;
  }
}

void deq_q4_k(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* sc = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0; j < 4; ++j) {
    uint8_t s1, m1, s2, m2;
    scale_min_k4(2 * j, sc, s1, m1);
    scale_min_k4(2 * j + 1, sc, s2, m2);
    const float d1 = d * s1, mm1 = dmin * m1, d2 = d * s2, mm2 = dmin * m2;
    for (int l = 0; l < 32; ++l) y[64 * j + l] = d1 * (q[l] & 0xF) - mm1;
    for (int l = 0; l < 32; ++l) y[64 * j + 32 + l] = d2 * (q[l] >> 4) - mm2;
    q += 32;
  }
}

void deq_q5_k(const uint8_t* __restrict b, float* __restrict y) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* sc = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  for (int j = 0; j < 4; ++j) {
    uint8_t s1, m1, s2, m2;
    scale_min_k4(2 * j, sc, s1, m1);
    scale_min_k4(2 * j + 1, sc, s2, m2);
    const float d1 = d * s1, mm1 = dmin * m1, d2 = d * s2, mm2 = dmin * m2;
    const uint8_t u1 = 1 << (2 * j), u2 = 2 << (2 * j);
    for (int l = 0; l < 32; ++l) y[64 * j + l] = d1 * ((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - mm1;
    for (int l = 0; l < 32; ++l) y[64 * j + 32 + l] = d2 * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - mm2;
    ql += 32;
  }
}

void deq_q6_k(const uint8_t* __restrict b, float* __restrict y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = h2f(b + 208);
  for (int n = 0; n < 2; ++n) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int8_t>((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

}  // namespace

DeqFn deq_fn(int64_t q) {
  switch (q) {
    case Q4_0: return deq_q4_0;
    case Q5_0: return deq_q5_0;
    case Q8_0: return deq_q8_0;
    case Q4_K: return deq_q4_k;
    case Q5_K: return deq_q5_k;
    case Q6_K: return deq_q6_k;
    default: return nullptr;
  }
}

void deq_row(DeqFn f, const uint8_t* row, int64_t nb, int64_t bs, int64_t ts, float* y) {
  for (int64_t b = 0; b < nb; ++b) f(row + b * ts, y + b * bs);
}

void quantize_act_row(const float* x, int64_t K, int8_t* q, float* d, float* s, int32_t* ns4) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.f;
    const float id = db > 0.f ? 1.f / db : 0.f;
    int32_t sum = 0;
    for (int g = 0; g < 8; ++g) {
      int32_t s4 = 0;
      for (int i = 4 * g; i < 4 * g + 4; ++i) {
        int v = static_cast<int>(std::nearbyint(xb[i] * id));
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        q[32 * b + i] = static_cast<int8_t>(v);
        s4 += v;
      }
      ns4[8 * b + g] = -s4;
      sum += s4;
    }
    d[b] = db;
    s[b] = db * static_cast<float>(sum);
  }
}

}  // namespace autoglm
