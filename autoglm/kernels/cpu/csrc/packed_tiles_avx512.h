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

// --- K-quants on q8_K activations: per output an exact int32 isum over the super-block (and Q4_K's msum), then
// kquant_q8k.h's float step once per super-block: acc = fma(isum, d * dx, acc), acc = fnmadd(msum, dmin * dx, acc)
inline __m512 finish(__m512 acc, __m512i isum, __m512 d, float dx) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc);
}
inline __m512 finish_min(__m512 acc, __m512i msum, __m512 dmin, float dx) {
  return _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(dmin, _mm512_set1_ps(dx)), acc);
}

// the (m_2p, m_2p+1) int16 pairs of the 16 rows, p = 0..3
inline void q4_k_pairs(const __m128i* B, __m512i* P) {
  for (int p = 0; p < 4; ++p) {
    __m128i lo, hi;
    q4_k_min_pairs(B, p, lo, hi);
    P[p] = _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo));
  }
}
// sum_j m_j * bsum32_j of one activation row, exact
inline __m512i q4_k_msum(const __m512i* P, const int16_t* bs) {
  __m512i m = _mm512_setzero_si512();
  for (int p = 0; p < 4; ++p) m = _mm512_dpwssd_epi32(m, P[p], _mm512_set1_epi32(load_i32(bs + 2 * p)));
  return m;
}

// Q4_K group: one 256-element super-block of 16 rows; w = d*sc[j]*q - dmin*m[j] per 32-element sub-block j.
// isum = sum_j sc_j * dot_j: each half of a sub-block's dot is at most 16 * 15 * 127 < 2^15, so vpdpwssd with the
// scale in the low int16 of each lane multiplies it exactly.
template <int R>
inline void q4_k_block(const uint8_t* g, int64_t sb, const ActP* a, Acc* acc) {
  __m128i B[12];  // scale byte t of the 16 rows
  for (int t = 0; t < 12; ++t) B[t] = load128(g + 64 + 16 * t);
  __m512i isum[R];
  for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
#pragma GCC unroll 8  // fully unrolled, GCC keeps the accumulators in registers (else it stores them every j)
  for (int j = 0; j < 8; ++j) {
    __m128i sc, mn;
    q4_k_scale_min(B, j, sc, mn);
    const __m512i s32 = _mm512_cvtepu8_epi32(sc);
    __m512i w[8];
    nibbles(g + 256 + 256 * j, w);
    for (int r = 0; r < R; ++r) {
      __m512i lo, hi;
      dots(w, a[r].q + 256 * sb + 32 * j, _mm512_setzero_si512(), _mm512_setzero_si512(), lo, hi);
      isum[r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(isum[r], lo, s32), hi, s32);
    }
  }
  const __m512 d = load_half16(g), dmin = load_half16(g + 32);
  __m512i P[4];
  q4_k_pairs(B, P);
  for (int r = 0; r < R; ++r) {
    const float dx = a[r].d[sb];
    acc[r].v = finish(acc[r].v, isum[r], d, dx);
    acc[r].v = finish_min(acc[r].v, q4_k_msum(P, a[r].bsum32 + 8 * sb), dmin, dx);
  }
}

// Q4_K, two row groups at once (g and g + gs; outputs y[r * ys + i], i < 32, accumulated in place: in registers
// they would not fit next to the 16 integer accumulators, and they change once per super-block): every activation broadcast
// feeds both groups' vpdpbusd. At prefill sizes the broadcasts, not the dot products, bound q4_k_block (its
// vpdpbusd with register operands alone run ~2.4x as fast). Per output the same integers (exact, in any order: a
// whole sub-block's dot times its scale by vpmulld) and the same float ops as q4_k_block, so bitwise equal.
constexpr int tile_rows(int64_t) { return kMaxTile; }  // activation rows per single-group tile
constexpr bool kPairQ4K = true;
constexpr int kPairRows = 4;  // activation rows per pair tile: 8 dot + 8 isum accumulators in the 32 registers
template <int R>
inline void q4_k_block2(const uint8_t* g, int64_t gs, int64_t sb, const ActP* a, float* y, int64_t ys) {
  const uint8_t* gp[2] = {g, g + gs};
  __m128i B[2][12];
  for (int w = 0; w < 2; ++w)
    for (int t = 0; t < 12; ++t) B[w][t] = load128(gp[w] + 64 + 16 * t);
  __m512i isum[2][R];
  for (int w = 0; w < 2; ++w)
    for (int r = 0; r < R; ++r) isum[w][r] = _mm512_setzero_si512();
  const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    __m512i s32[2];
    for (int w = 0; w < 2; ++w) {
      __m128i sc, mn;
      q4_k_scale_min(B[w], j, sc, mn);
      s32[w] = _mm512_cvtepu8_epi32(sc);
    }
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
        const int8_t* xb = a[r].q + 256 * sb + 32 * j;
        const __m512i xl = _mm512_set1_epi32(load_i32(xb + 4 * t)), xh = _mm512_set1_epi32(load_i32(xb + 16 + 4 * t));
        for (int w = 0; w < 2; ++w) {
          s[w][r] = _mm512_dpbusd_epi32(s[w][r], lo[w], xl);
          s[w][r] = _mm512_dpbusd_epi32(s[w][r], hi[w], xh);
        }
      }
    }
    for (int w = 0; w < 2; ++w)
      for (int r = 0; r < R; ++r) isum[w][r] = _mm512_add_epi32(isum[w][r], _mm512_mullo_epi32(s[w][r], s32[w]));
  }
  for (int w = 0; w < 2; ++w) {
    const __m512 d = load_half16(gp[w]), dmin = load_half16(gp[w] + 32);
    __m512i P[4];
    q4_k_pairs(B[w], P);
    for (int r = 0; r < R; ++r) {
      float* o = y + r * ys + 16 * w;
      const float dx = a[r].d[sb];
      __m512 v = finish(_mm512_loadu_ps(o), isum[w][r], d, dx);
      _mm512_storeu_ps(o, finish_min(v, q4_k_msum(P, a[r].bsum32 + 8 * sb), dmin, dx));
    }
  }
}

// Q6_K's 8 quad vectors of sub-block j (u = q, 0..63)
inline void q6_k_quads(const uint8_t* sbp, __m512i* w) {
  const __m512i m30 = _mm512_set1_epi8(0x30);
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
}

// Q6_K group: one 256-element super-block of 16 rows; w = d*sc[e/16]*(q - 32). isum = sum_k sc_k * (dot_k - 32 *
// bsum16_k) over the 16-element blocks k, the offset as the dot's initial value (init16), the scale by vpmulld.
template <int R>
inline void q6_k_block(const uint8_t* g, int64_t sb, const ActP* a, Acc* acc) {
  __m512i isum[R];
  for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const __m512i s_lo = _mm512_cvtepi8_epi32(load128(g + 32 + 16 * (2 * j)));
    const __m512i s_hi = _mm512_cvtepi8_epi32(load128(g + 32 + 16 * (2 * j + 1)));
    __m512i w[8];
    q6_k_quads(g + 288 + 384 * j, w);
    for (int r = 0; r < R; ++r) {
      __m512i lo, hi;
      const int32_t* i16 = a[r].init16 + 16 * sb + 2 * j;
      dots(w, a[r].q + 256 * sb + 32 * j, _mm512_set1_epi32(i16[0]), _mm512_set1_epi32(i16[1]), lo, hi);
      isum[r] = _mm512_add_epi32(isum[r], _mm512_add_epi32(_mm512_mullo_epi32(lo, s_lo), _mm512_mullo_epi32(hi, s_hi)));
    }
  }
  const __m512 d = load_half16(g);
  for (int r = 0; r < R; ++r) acc[r].v = finish(acc[r].v, isum[r], d, a[r].d[sb]);
}

// Q6_K, two row groups at once (as q4_k_block2): the low 16 elements of sub-block j for every row, then the high 16
constexpr bool kPairQ6K = true;
template <int R>
inline void q6_k_block2(const uint8_t* g, int64_t gs, int64_t sb, const ActP* a, float* y, int64_t ys) {
  const uint8_t* gp[2] = {g, g + gs};
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  __m512i isum[2][R];
  for (int w = 0; w < 2; ++w)
    for (int r = 0; r < R; ++r) isum[w][r] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    __m512i H[2][2];
    for (int w = 0; w < 2; ++w) {
      H[w][0] = _mm512_loadu_si512(gp[w] + 288 + 384 * j + 256);
      H[w][1] = _mm512_loadu_si512(gp[w] + 288 + 384 * j + 320);
    }
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {  // quads 4 half .. 4 half + 3: elements 16 half .. 16 half + 15
      __m512i s[2][R];
      for (int r = 0; r < R; ++r) {
        const __m512i init = _mm512_set1_epi32(a[r].init16[16 * sb + 2 * j + half]);
        s[0][r] = init;
        s[1][r] = init;
      }
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {  // quad k = 4 half + t: nibble vector t; high bits as in q6_k_quads
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
          const __m512i xv = _mm512_set1_epi32(load_i32(a[r].q + 256 * sb + 32 * j + 16 * half + 4 * t));
          s[0][r] = _mm512_dpbusd_epi32(s[0][r], wq[0], xv);
          s[1][r] = _mm512_dpbusd_epi32(s[1][r], wq[1], xv);
        }
      }
      for (int w = 0; w < 2; ++w) {
        const __m512i sc = _mm512_cvtepi8_epi32(load128(gp[w] + 32 + 16 * (2 * j + half)));
        for (int r = 0; r < R; ++r) isum[w][r] = _mm512_add_epi32(isum[w][r], _mm512_mullo_epi32(s[w][r], sc));
      }
    }
  }
  for (int w = 0; w < 2; ++w) {
    const __m512 d = load_half16(gp[w]);
    for (int r = 0; r < R; ++r) {
      float* o = y + r * ys + 16 * w;
      _mm512_storeu_ps(o, finish(_mm512_loadu_ps(o), isum[w][r], d, a[r].d[sb]));
    }
  }
}

}  // namespace autoglm::packed
