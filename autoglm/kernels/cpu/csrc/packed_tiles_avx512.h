// AVX512-VNNI tiles of the packed layout (packed_tiles.h): the 16 lanes of one vpdpbusd are the 16 rows of a group.
#pragma once

namespace autoglm::packed {

// the R accumulators of a tile: 16 outputs each
struct Acc {
  __m512 v;
};
inline void acc_zero(Acc& a) { a.v = _mm512_setzero_ps(); }
inline void acc_store(const Acc& a, float* y) { _mm512_storeu_ps(y, a.v); }

// acc + w . (the 4 bytes at p broadcast to every lane), the broadcast folded into vpdpbusd's memory operand (GCC
// emits a separate vpbroadcastd for the intrinsic form: 8 more instructions per group and row)
inline __m512i dot_bcast(__m512i acc, __m512i w, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}

inline __m512 load_half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m512 u8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
inline __m512 i8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

// 4 nibble vectors -> the 8 quad vectors of a 32-element sub-block
inline void nibbles(const uint8_t* p, __m512i* w) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int t = 0; t < 4; ++t) {
    const __m512i v = _mm512_loadu_si512(p + 64 * t);
    w[t] = _mm512_and_si512(v, m4);
    w[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
  }
}

// the integer dots of one 32-element sub-block: lo = quads 0..3 (from init_lo), hi = quads 4..7 (from init_hi)
inline void dots(const __m512i* w, const int8_t* xb, __m512i init_lo, __m512i init_hi, __m512i& lo, __m512i& hi) {
  lo = init_lo;
  hi = init_hi;
  for (int k = 0; k < 4; ++k) {
    lo = dot_bcast(lo, w[k], xb + 4 * k);
    hi = dot_bcast(hi, w[k + 4], xb + 16 + 4 * k);
  }
}

// Q4_0 / Q5_0 / Q8_0 group: one 32-element block of 16 rows
template <int64_t Q, int R>
inline void simple_block(const uint8_t* g, int64_t b, const ActP* a, Acc* acc) {
  __m512i w[8];
  const __m512 dw = load_half16(g);
  if constexpr (Q == Q8_0) {
    for (int k = 0; k < 4; ++k) {  // quad vectors in order: w[k] = quad k, w[k + 4] = quad k + 4
      w[k] = _mm512_loadu_si512(g + 32 + 64 * k);
      w[k + 4] = _mm512_loadu_si512(g + 32 + 64 * (k + 4));
    }
  } else {
    nibbles(g + (Q == Q5_0 ? 96 : 32), w);
    if constexpr (Q == Q5_0) {
      const __m512i h16 = _mm512_set1_epi8(16);
      for (int k = 0; k < 8; ++k) {
        uint64_t m;
        std::memcpy(&m, g + 32 + 8 * k, 8);
        w[k] = _mm512_mask_add_epi8(w[k], static_cast<__mmask64>(m), w[k], h16);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512i lo, hi;
    dots(w, a[r].q + 32 * b, _mm512_set1_epi32(a[r].init[b]), _mm512_setzero_si512(), lo, hi);
    const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(a[r].d[b]));
    acc[r].v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), sc, acc[r].v);
  }
}

// Q4_K group: one 256-element super-block of 16 rows; w = d*sc[j]*q - dmin*m[j] per 32-element sub-block j
template <int R>
inline void q4_k_block(const uint8_t* g, int64_t sb, const ActP* a, Acc* acc) {
  const __m512 d = load_half16(g), dmin = load_half16(g + 32);
  __m128i B[12];  // scale byte t of the 16 rows
  for (int t = 0; t < 12; ++t) B[t] = load128(g + 64 + 16 * t);
#pragma GCC unroll 8  // fully unrolled, GCC keeps the accumulators in registers (else it stores them every j)
  for (int j = 0; j < 8; ++j) {
    __m128i sc, mn;
    q4_k_scale_min(B, j, sc, mn);
    const __m512 scv = _mm512_mul_ps(d, u8_to_ps(sc)), mv = _mm512_mul_ps(dmin, u8_to_ps(mn));
    __m512i w[8];
    nibbles(g + 256 + 256 * j, w);
    const int64_t b = 8 * sb + j;
    for (int r = 0; r < R; ++r) {
      __m512i lo, hi;
      dots(w, a[r].q + 32 * b, _mm512_setzero_si512(), _mm512_setzero_si512(), lo, hi);
      const __m512 sc_r = _mm512_mul_ps(scv, _mm512_set1_ps(a[r].d[b]));
      acc[r].v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), sc_r, acc[r].v);
      acc[r].v = _mm512_fnmadd_ps(mv, _mm512_set1_ps(a[r].s[b]), acc[r].v);
    }
  }
}

// Q4_K, two row groups at once (g and g + gs; acc[R] group 0, acc[R + r] group 1): every activation broadcast
// feeds both groups' vpdpbusd. At prefill sizes the broadcasts, not the dot products, bound q4_k_block (its
// vpdpbusd with register operands alone run ~2.4x as fast). Per output the same integers (exact, in any order) and
// the same float ops in the same order as q4_k_block, so the outputs are bitwise equal.
constexpr bool kPairQ4K = true;
constexpr int kPairRows = 4;  // activation rows per pair tile: 8 int + 8 float accumulators fit the 32 registers
template <int R>
inline void q4_k_block2(const uint8_t* g, int64_t gs, int64_t sb, const ActP* a, Acc* acc) {
  const uint8_t* gp[2] = {g, g + gs};
  __m512 d[2], dmin[2];
  __m128i B[2][12];
  for (int w = 0; w < 2; ++w) {
    d[w] = load_half16(gp[w]);
    dmin[w] = load_half16(gp[w] + 32);
    for (int t = 0; t < 12; ++t) B[w][t] = load128(gp[w] + 64 + 16 * t);
  }
  const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    __m512 scv[2], mv[2];
    for (int w = 0; w < 2; ++w) {
      __m128i sc, mn;
      q4_k_scale_min(B[w], j, sc, mn);
      scv[w] = _mm512_mul_ps(d[w], u8_to_ps(sc));
      mv[w] = _mm512_mul_ps(dmin[w], u8_to_ps(mn));
    }
    const int64_t b = 8 * sb + j;
    __m512i s[2][R];
    for (int w = 0; w < 2; ++w)
      for (int r = 0; r < R; ++r) s[w][r] = _mm512_setzero_si512();
    for (int t = 0; t < 4; ++t) {  // nibble vector t: quad t (low nibbles) and quad t + 4 (high nibbles)
      __m512i lo[2], hi[2];
      for (int w = 0; w < 2; ++w) {
        const __m512i v = _mm512_loadu_si512(gp[w] + 256 + 256 * j + 64 * t);
        lo[w] = _mm512_and_si512(v, m4);
        hi[w] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* xb = a[r].q + 32 * b;
        int32_t ql, qh;
        std::memcpy(&ql, xb + 4 * t, 4);
        std::memcpy(&qh, xb + 16 + 4 * t, 4);
        const __m512i xl = _mm512_set1_epi32(ql), xh = _mm512_set1_epi32(qh);
        for (int w = 0; w < 2; ++w) {
          s[w][r] = _mm512_dpbusd_epi32(s[w][r], lo[w], xl);
          s[w][r] = _mm512_dpbusd_epi32(s[w][r], hi[w], xh);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 dx = _mm512_set1_ps(a[r].d[b]), sx = _mm512_set1_ps(a[r].s[b]);
      for (int w = 0; w < 2; ++w) {
        Acc& o = acc[w * R + r];
        o.v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[w][r]), _mm512_mul_ps(scv[w], dx), o.v);
        o.v = _mm512_fnmadd_ps(mv[w], sx, o.v);
      }
    }
  }
}

// Q6_K group: one 256-element super-block of 16 rows; w = d*sc[e/16]*(q - 32)
template <int R>
inline void q6_k_block(const uint8_t* g, int64_t sb, const ActP* a, Acc* acc) {
  const __m512 d = load_half16(g);
  const __m512i m30 = _mm512_set1_epi8(0x30);
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const __m512 s_lo = _mm512_mul_ps(d, i8_to_ps(load128(g + 32 + 16 * (2 * j))));
    const __m512 s_hi = _mm512_mul_ps(d, i8_to_ps(load128(g + 32 + 16 * (2 * j + 1))));
    const uint8_t* sbp = g + 288 + 384 * j;
    __m512i w[8];
    nibbles(sbp, w);
    const __m512i H0 = _mm512_loadu_si512(sbp + 256), H1 = _mm512_loadu_si512(sbp + 320);
    // quad k's high bits sit at bits 2p of H[(k % 4) / 2], p = k % 2 + 2 (k / 4): move them to bits 4-5
    w[0] = _mm512_or_si512(w[0], _mm512_and_si512(_mm512_slli_epi16(H0, 4), m30));
    w[1] = _mm512_or_si512(w[1], _mm512_and_si512(_mm512_slli_epi16(H0, 2), m30));
    w[4] = _mm512_or_si512(w[4], _mm512_and_si512(H0, m30));
    w[5] = _mm512_or_si512(w[5], _mm512_and_si512(_mm512_srli_epi16(H0, 2), m30));
    w[2] = _mm512_or_si512(w[2], _mm512_and_si512(_mm512_slli_epi16(H1, 4), m30));
    w[3] = _mm512_or_si512(w[3], _mm512_and_si512(_mm512_slli_epi16(H1, 2), m30));
    w[6] = _mm512_or_si512(w[6], _mm512_and_si512(H1, m30));
    w[7] = _mm512_or_si512(w[7], _mm512_and_si512(_mm512_srli_epi16(H1, 2), m30));
    const int64_t b = 8 * sb + j;
    for (int r = 0; r < R; ++r) {
      __m512i lo, hi;
      dots(w, a[r].q + 32 * b, _mm512_set1_epi32(a[r].init16[2 * b]), _mm512_set1_epi32(a[r].init16[2 * b + 1]), lo,
           hi);
      const __m512 dx = _mm512_set1_ps(a[r].d[b]);
      acc[r].v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(s_lo, dx), acc[r].v);
      acc[r].v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(s_hi, dx), acc[r].v);
    }
  }
}

// Q6_K, two row groups at once (as q4_k_block2): the low 16 elements of sub-block j for every row, then the high 16,
// each finished by its float op in q6_k_block's order
constexpr bool kPairQ6K = true;
template <int R>
inline void q6_k_block2(const uint8_t* g, int64_t gs, int64_t sb, const ActP* a, Acc* acc) {
  const uint8_t* gp[2] = {g, g + gs};
  const __m512 d[2] = {load_half16(gp[0]), load_half16(gp[1])};
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const int64_t b = 8 * sb + j;
    __m512i H[2][2];
    for (int w = 0; w < 2; ++w) {
      H[w][0] = _mm512_loadu_si512(gp[w] + 288 + 384 * j + 256);
      H[w][1] = _mm512_loadu_si512(gp[w] + 288 + 384 * j + 320);
    }
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {  // quads 4 half .. 4 half + 3: elements 16 half .. 16 half + 15
      __m512 sc[2];
      for (int w = 0; w < 2; ++w) sc[w] = _mm512_mul_ps(d[w], i8_to_ps(load128(gp[w] + 32 + 16 * (2 * j + half))));
      __m512i s[2][R];
      for (int r = 0; r < R; ++r) {
        const __m512i init = _mm512_set1_epi32(a[r].init16[2 * b + half]);
        s[0][r] = init;
        s[1][r] = init;
      }
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {  // quad k = 4 half + t: nibble vector t; high bits as in q6_k_block
        __m512i wq[2];
        for (int w = 0; w < 2; ++w) {
          const __m512i v = _mm512_loadu_si512(gp[w] + 288 + 384 * j + 64 * t);
          const __m512i nib = half ? _mm512_and_si512(_mm512_srli_epi16(v, 4), m4) : _mm512_and_si512(v, m4);
          const __m512i h = H[w][t / 2];
          const int sh = 4 - 2 * (t % 2) - 4 * half;  // 4, 2 (low half); 0, -2 (high half)
          const __m512i hb = sh > 0 ? _mm512_slli_epi16(h, sh) : (sh < 0 ? _mm512_srli_epi16(h, -sh) : h);
          wq[w] = _mm512_or_si512(nib, _mm512_and_si512(hb, m30));
        }
        for (int r = 0; r < R; ++r) {
          int32_t qv;
          std::memcpy(&qv, a[r].q + 32 * b + 16 * half + 4 * t, 4);
          const __m512i xv = _mm512_set1_epi32(qv);
          s[0][r] = _mm512_dpbusd_epi32(s[0][r], wq[0], xv);
          s[1][r] = _mm512_dpbusd_epi32(s[1][r], wq[1], xv);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 dx = _mm512_set1_ps(a[r].d[b]);
        for (int w = 0; w < 2; ++w) {
          Acc& o = acc[w * R + r];
          o.v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[w][r]), _mm512_mul_ps(sc[w], dx), o.v);
        }
      }
    }
  }
}

}  // namespace autoglm::packed
