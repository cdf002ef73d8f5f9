// AVX2 tiles of the packed layout (packed_tiles.h): the same bytes as the AVX-512 tiles read, as two 256-bit halves
// per 64-byte quad vector (rows 0-7, then rows 8-15). vpmaddubsw (u8 weights x the s8 activation quad broadcast)
// gives int16 pairs per row; int16 partial sums of G quads are widened by vpmaddwd with ones. G per type keeps
// every int16 exact (no saturation), with |x| <= 127 (quantize_act_row): 2 * G * umax * 127 <= 32767, i.e.
//   4-bit (Q4_0, Q4_K: u <= 15): G = 8 (30480); Q5_0 (u <= 31): G = 4 (31496); Q6_K (u <= 63): G = 2 (32004);
//   Q8_0 (stored w + 128): signed w, |w| x sign(x, w) per quad (G = 1: 2 * 128 * 127 = 32512), no zero point.
// The integer dots are exact, and the float ops per output are those of the AVX-512 tiles in the same order, so the
// outputs are bitwise equal. A tile row's accumulators are two __m256 (16 outputs).
// The avxvnni variant compiles this file with -mavxvnni (__AVXVNNI__): the block-32 types and Q4_K take vpdpbusd ymm
// (avx512's integers: init + the u8 dot, Q4_K's half sub-block dots scaled by vpdpwssd), every vpmaddwd + add
// becomes one vpdpwssd (Q6_K keeps its vpmaddubsw int16 pairs: its dots need vpmulld after vpdpbusd, no faster).
#pragma once

namespace autoglm::packed {

struct Acc {
  __m256 v[2];
};
inline void acc_zero(Acc& a) { a.v[0] = a.v[1] = _mm256_setzero_ps(); }
inline void acc_store(const Acc& a, float* y) {
  _mm256_storeu_ps(y, a.v[0]);
  _mm256_storeu_ps(y + 8, a.v[1]);
}

inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
// the stack scale tables (aligned rows of 32 bytes: int16 or int32 lanes)
template <typename T>
constexpr bool kTable = std::is_same_v<T, int16_t> || std::is_same_v<T, int32_t>;
template <typename T, std::enable_if_t<kTable<T>, int> = 0>
inline void store256(T* p, __m256i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
template <typename T, std::enable_if_t<kTable<T>, int> = 0>
inline __m256i load256(const T* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i load64(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m256 load_half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// each byte of the 8 low bytes of v twice, widened: the int16 pair of row lane i holds row i's value
inline __m256i dup_u8_epi16(__m128i v) { return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v)); }
inline __m256i dup_i8_epi16(__m128i v) { return _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(v, v)); }
#if defined(__AVXVNNI__)
// the avxvnni build: u8 x s8 dots by the VEX vpdpbusd
inline __m256i vnni_dot(__m256i acc, __m256i u, __m256i x) { return _mm256_dpbusd_avx_epi32(acc, u, x); }
#endif
// acc + vpmaddwd(a, b) (int16 pairs -> int32): one vpdpwssd on AVX-VNNI
inline __m256i madd_acc(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
inline __m256i bcast4(const int8_t* p) {  // vpbroadcastd from memory: a load, no shuffle
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// v + 16 in byte i where bit i of bits is set (Q5_0's 5th bits of 8 rows x 4 elements)
inline __m256i add16_bits(__m256i v, uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(  // byte i <- byte i / 8 of bits
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bm = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bm), bm);
  return _mm256_add_epi8(v, _mm256_and_si256(set, _mm256_set1_epi8(16)));
}

// sum over quads k < G of w[k] . (x quad k) as int16 pairs per row (exact for the G of each type, above)
template <int G>
inline __m256i quad_sum16(const __m256i* w, const int8_t* xb) {
  __m256i s = _mm256_maddubs_epi16(w[0], bcast4(xb));
  for (int k = 1; k < G; ++k) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[k], bcast4(xb + 4 * k)));
  return s;
}

// acc + sum over quads k < N of w[k] . (x quad k) x the int16 pair weights sc (ones: the plain dot), int32 per row
template <int N, int G>
inline __m256i dot_quads(const __m256i* w, const int8_t* xb, __m256i acc, __m256i sc) {
  for (int k0 = 0; k0 < N; k0 += G) acc = madd_acc(acc, quad_sum16<G>(w + k0, xb + 4 * k0), sc);
  return acc;
}

// signed w[k] (Q8_0): sum over the 8 quads of w . x as |w| x sign(x, w)
inline __m256i dot_quads_signed(const __m256i* w, const int8_t* xb) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  for (int k = 0; k < 8; ++k) {
    const __m256i s = _mm256_maddubs_epi16(_mm256_abs_epi8(w[k]), _mm256_sign_epi8(bcast4(xb + 4 * k), w[k]));
    acc = madd_acc(acc, s, ones);
  }
  return acc;
}

// half h of 4 nibble vectors -> its 8 quad vectors
inline void nibbles(const uint8_t* p, int h, __m256i* w) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int t = 0; t < 4; ++t) {
    const __m256i v = load256(p + 64 * t + 32 * h);
    w[t] = _mm256_and_si256(v, m4);
    w[t + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  }
}

// Q4_0 / Q5_0 / Q8_0 group: one 32-element block of 16 rows. The 8 quad vectors stay built for all R rows (what
// does not fit the 16 ymm is spilled and read back as vpmaddubsw / vpdpbusd memory operands, nearly free: using
// each pair of quads for every row at once, R dots live, measured 0.6-0.8x as fast)
template <int64_t Q, int R>
inline void simple_block(const uint8_t* g, int64_t b, const ActP* a, Acc* acc) {
  for (int h = 0; h < 2; ++h) {
    __m256i w[8];
    const __m256 dw = load_half8(g + 16 * h);
    if constexpr (Q == Q8_0) {
      for (int k = 0; k < 8; ++k) w[k] = load256(g + 32 + 64 * k + 32 * h);  // w + 128
#if !defined(__AVXVNNI__)
      for (int k = 0; k < 8; ++k) w[k] = _mm256_xor_si256(w[k], _mm256_set1_epi8(-128));  // the signed w
#endif
    } else {
      nibbles(g + (Q == Q5_0 ? 96 : 32), h, w);
      if constexpr (Q == Q5_0) {
        for (int k = 0; k < 8; ++k) {
          uint32_t m;
          std::memcpy(&m, g + 32 + 8 * k + 4 * h, 4);  // bits 32h..32h+31 of word k: rows 8h..8h+7
          w[k] = add16_bits(w[k], m);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = a[r].q + 32 * b;
      __m256i dot;
#if defined(__AVXVNNI__)
      {  // init + the u8 dot (Q8_0: of w + 128), avx512's integers
        __m256i lo = _mm256_set1_epi32(a[r].init[b]), hi = _mm256_setzero_si256();  // two chains, as avx512
        for (int k = 0; k < 4; ++k) {
          lo = vnni_dot(lo, w[k], bcast4(xb + 4 * k));
          hi = vnni_dot(hi, w[k + 4], bcast4(xb + 16 + 4 * k));
        }
        dot = _mm256_add_epi32(lo, hi);
      }
#else
      if constexpr (Q == Q8_0) {
        dot = dot_quads_signed(w, xb);  // = the u8 dot + init (-128 * sum(x)), exactly
      } else {
        dot = dot_quads<8, Q == Q5_0 ? 4 : 8>(w, xb, _mm256_set1_epi32(a[r].init[b]), _mm256_set1_epi16(1));
      }
#endif
      const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(a[r].d[b]));
      acc[r].v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[r].v[h]);
    }
  }
}

// --- K-quants on q8_K activations: the integers of packed_tiles_avx512.h (exact, so in any order) and its float step
// once per super-block, per 8-row half: acc = fma(isum, d * dx, acc), acc = fnmadd(msum, dmin * dx, acc)
inline __m256 finish(__m256 acc, __m256i isum, __m256 d, float dx) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc);
}

// Q4_K group: one 256-element super-block of 16 rows; w = d*sc[j]*q - dmin*m[j] per 32-element sub-block j.
// isum = sum_j sc_j * dot_j by vpmaddwd of the sub-block's int16 pair sums with the scale in both halves of a lane;
// msum = sum_j m_j * bsum32_j by vpmaddwd of (m_2p, m_2p+1) with (bsum32_2p, bsum32_2p+1).
// Register budget (16 ymm): the scales go to a stack table first and each nibble vector is used for every row as
// soon as it is loaded (2 weight registers live, not 8). Holding the 12 scale vectors and 8 quad vectors across
// the sub-block loop spilled ~500 moves per call and halved the rate; the integers (exact) are the same.
template <int R>
inline void q4_k_block(const uint8_t* g, int64_t sb, const ActP* a, Acc* acc) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {
    alignas(32) int16_t S[8][16];  // sub-block j's scale of the 8 rows, twice per row lane
    alignas(32) int16_t P[4][16];  // (m_2p, m_2p+1) per row lane
    {
      __m128i B[12];  // scale byte t of the 8 rows of this half
      for (int t = 0; t < 12; ++t) B[t] = load64(g + 64 + 16 * t + 8 * h);
      for (int j = 0; j < 8; ++j) {
        __m128i sc, mn;
        q4_k_scale_min(B, j, sc, mn);
#if defined(__AVXVNNI__)
        store256(S[j], _mm256_cvtepu8_epi32(sc));  // the scale in the low int16 of each row lane, for vpdpwssd
#else
        store256(S[j], dup_u8_epi16(sc));
#endif
      }
      for (int p = 0; p < 4; ++p) {
        __m128i lo, hi;
        q4_k_min_pairs(B, p, lo, hi);
        store256(P[p], _mm256_cvtepu8_epi16(lo));
      }
    }
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      const uint8_t* wj = g + 256 + 256 * j + 32 * h;
#if defined(__AVXVNNI__)
      // quads 0-3 and 4-7 by vpdpbusd: each |dot| <= 16 * 15 * 127 < 2^15, so vpdpwssd multiplies it exactly
      __m256i lo[R], hi[R];
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const __m256i v = load256(wj + 64 * t);
        const __m256i wl = _mm256_and_si256(v, m4), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int r = 0; r < R; ++r) {
          const int8_t* xb = a[r].q + 256 * sb + 32 * j;
          lo[r] = vnni_dot(t == 0 ? _mm256_setzero_si256() : lo[r], wl, bcast4(xb + 4 * t));
          hi[r] = vnni_dot(t == 0 ? _mm256_setzero_si256() : hi[r], wh, bcast4(xb + 16 + 4 * t));
        }
      }
      const __m256i s32 = load256(S[j]);
      for (int r = 0; r < R; ++r) isum[r] = madd_acc(madd_acc(isum[r], lo[r], s32), hi[r], s32);
#else
      __m256i s[R];  // int16 pair sums of the sub-block's 8 quads (exact: 8 * 2 * 15 * 128 < 2^15)
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {  // nibble vector t: quad t (low nibbles) and quad t + 4 (high nibbles)
        const __m256i v = load256(wj + 64 * t);
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int r = 0; r < R; ++r) {
          const int8_t* xb = a[r].q + 256 * sb + 32 * j;
          const __m256i d2 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xb + 4 * t)),
                                              _mm256_maddubs_epi16(hi, bcast4(xb + 16 + 4 * t)));
          s[r] = t == 0 ? d2 : _mm256_add_epi16(s[r], d2);
        }
      }
      const __m256i s16 = load256(S[j]);
      for (int r = 0; r < R; ++r) isum[r] = madd_acc(isum[r], s[r], s16);
#endif
    }
    const __m256 d = load_half8(g + 16 * h), dmin = load_half8(g + 32 + 16 * h);
    for (int r = 0; r < R; ++r) {
      const int16_t* bs = a[r].bsum32 + 8 * sb;
      __m256i msum = _mm256_setzero_si256();
      for (int p = 0; p < 4; ++p)
        msum = madd_acc(msum, load256(P[p]), _mm256_set1_epi32(load_i32(bs + 2 * p)));
      const float dx = a[r].d[sb];
      acc[r].v[h] = finish(acc[r].v[h], isum[r], d, dx);
      acc[r].v[h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(dmin, _mm256_set1_ps(dx)), acc[r].v[h]);
    }
  }
}

// no pair tile: two groups' weights and accumulators would not fit the 16 ymm registers
// activation rows per single-group tile (gemv_packed.cpp): as many as keep a block's live vectors in the 16 ymm
// (K-quants: R int16 sums + R isums + 5, AVX-VNNI's Q4_K 3R + 4; the block-32 types: see simple_block)
constexpr int tile_rows(int64_t q) {
#if defined(__AVXVNNI__)
  return q == Q4_K ? 4 : q == Q6_K ? 5 : kMaxTile;
#else
  return q == Q4_K || q == Q6_K ? 5 : kMaxTile;
#endif
}
constexpr bool kPairQ4K = false;
constexpr int kPairRows = 1;
template <int R>
inline void q4_k_block2(const uint8_t*, int64_t, int64_t, const ActP*, float*, int64_t) {}
constexpr bool kPairQ6K = false;
template <int R>
inline void q6_k_block2(const uint8_t*, int64_t, int64_t, const ActP*, float*, int64_t) {}

// Q6_K group: one 256-element super-block of 16 rows; w = d*sc[e/16]*(q - 32). isum = sum_k sc_k * dot_k - 32 *
// sum_k sc_k * bsum16_k over the 16-element blocks k (the AVX-512 tiles' value: exact integers). As q4_k_block: the
// scales from a stack table, and the quads built four at a time (those sharing one high-bit vector) and used at once.
template <int R>
inline void q6_k_block(const uint8_t* g, int64_t sb, const ActP* a, Acc* acc) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  for (int h = 0; h < 2; ++h) {
    alignas(32) int16_t S[16][16];  // 16-element block k's scale of the 8 rows, twice per row lane
    for (int k = 0; k < 16; ++k) store256(S[k], dup_i8_epi16(load64(g + 32 + 16 * k + 8 * h)));
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      const uint8_t* sbp = g + 288 + 384 * j + 32 * h;
      const __m256i s_lo = load256(S[2 * j]);
      const __m256i s_hi = load256(S[2 * j + 1]);
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) {
        // quads 2c, 2c + 1 (low nibbles of vectors 2c, 2c + 1) and 2c + 4, 2c + 5 (their high nibbles) take their
        // high bits from H = vector c of the high-bit area: bits 2p of H, p = k % 2 + 2 (k / 4), moved to bits 4-5
        const __m256i H = load256(sbp + 256 + 64 * c);
        const __m256i v0 = load256(sbp + 64 * (2 * c)), v1 = load256(sbp + 64 * (2 * c + 1));
        const __m256i wa = _mm256_or_si256(_mm256_and_si256(v0, m4), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30));
        const __m256i wb = _mm256_or_si256(_mm256_and_si256(v1, m4), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30));
        const __m256i wc = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), _mm256_and_si256(H, m30));
        const __m256i wd =
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(H, 2), m30));
        for (int r = 0; r < R; ++r) {
          const int8_t* xb = a[r].q + 256 * sb + 32 * j + 8 * c;
          const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(wa, bcast4(xb)), _mm256_maddubs_epi16(wb, bcast4(xb + 4)));
          const __m256i hi =
              _mm256_add_epi16(_mm256_maddubs_epi16(wc, bcast4(xb + 16)), _mm256_maddubs_epi16(wd, bcast4(xb + 20)));
          isum[r] = madd_acc(madd_acc(isum[r], lo, s_lo), hi, s_hi);
        }
      }
    }
    __m256i P[8];  // (sc_2p, sc_2p+1) int16 pairs of the 8 rows
    for (int p = 0; p < 8; ++p)
      P[p] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(load64(g + 32 + 16 * (2 * p) + 8 * h), load64(g + 32 + 16 * (2 * p + 1) + 8 * h)));
    const __m256 d = load_half8(g + 16 * h);
    for (int r = 0; r < R; ++r) {
      const int16_t* bs = a[r].bsum16 + 16 * sb;
      __m256i off = _mm256_setzero_si256();
      for (int p = 0; p < 8; ++p)
        off = madd_acc(off, P[p], _mm256_set1_epi32(load_i32(bs + 2 * p)));
      acc[r].v[h] = finish(acc[r].v[h], _mm256_sub_epi32(isum[r], _mm256_slli_epi32(off, 5)), d, a[r].d[sb]);
    }
  }
}

}  // namespace autoglm::packed
