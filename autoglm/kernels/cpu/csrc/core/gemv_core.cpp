// Decode GEMV on raw GGUF blocks in file order, written once over the ISA primitives of isa.h (compiled once per
// variant). Per weight row and activation row: blocks are taken 8 at a time (a K-quant super-block is one such
// group: 8 sub-blocks of 32), integer dots are exact, then lane j of 8 float accumulators gets one fma per 32-block
// (Q6_K: two, halves lo then hi), and the row's value is the canonical tree sum (README.md). Each weight block is
// unpacked once for a tile of up to kMaxTile activation rows; a row's arithmetic does not depend on the tile.
#include "isa.h"

namespace autoglm {
namespace {

using isa::B32;
using isa::F8;
using isa::I8;

// acc[r] += float(dot_j) * (ws_j * d_r[b0 + j]) per lane j < cnt (lanes >= cnt add 0 * 0)
template <int R, bool SIGNED, int SHIFT>
inline void group(const B32* u, const float* ws, int cnt, int64_t b0, const ActQ* a, F8* acc) {
  const F8 w = isa::load8(ws);
  for (int r = 0; r < R; ++r) {
    I8 lo, hi;
    isa::dots8<SIGNED, SHIFT>(u, cnt, a[r].q + 32 * b0, a[r].ns4 + 8 * b0, lo, hi);
    const F8 ad = isa::load8n(a[r].d + b0, cnt);
    acc[r] = isa::fma(isa::cvt(isa::add(lo, hi)), isa::mul(w, ad), acc[r]);
  }
}

// Q4_0 / Q5_0 / Q8_0: 8 blocks of 32 per group (the last group may be partial)
template <int QT, int R>
void dot_simple(const uint8_t* row, const ActQ* a, int64_t nb, float* y, int64_t ys) {
  constexpr int64_t TS = QT == Q4_0 ? 18 : (QT == Q5_0 ? 22 : 34);
  F8 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = isa::zero();
  for (int64_t g = 0; g < nb; g += 8) {
    const int cnt = static_cast<int>(std::min<int64_t>(8, nb - g));
    B32 u[8];
    alignas(32) float ws[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < cnt; ++j) {
      const uint8_t* k = row + TS * (g + j);
      ws[j] = isa::h2f(k);
      if constexpr (QT == Q4_0) {
        u[j] = isa::nibbles16(k + 2);
      } else if constexpr (QT == Q5_0) {
        uint32_t qh;
        std::memcpy(&qh, k + 2, 4);
        u[j] = isa::add16_bits32(isa::nibbles16(k + 6), qh);
      } else {
        u[j] = isa::load32(k + 2);
      }
    }
    // unsigned q - 8 (Q4_0) / q - 16 (Q5_0): the lane init -2^SHIFT * sum4(x) supplies the offset
    if constexpr (QT == Q4_0) group<R, false, 3>(u, ws, cnt, g, a, acc);
    else if constexpr (QT == Q5_0) group<R, false, 4>(u, ws, cnt, g, a, acc);
    else group<R, true, 0>(u, ws, cnt, g, a, acc);
  }
  for (int r = 0; r < R; ++r) y[r * ys] = isa::hsum(acc[r]);
}

// Q4_K / Q5_K: w = d*sc[s]*q - dmin*m[s] per 32-element sub-block s; the mins in their own 8 lanes
template <bool Q5, int R>
void dot_qk_affine(const uint8_t* row, const ActQ* a, int64_t nsb, float* y, int64_t ys) {
  constexpr int64_t TS = Q5 ? 176 : 144;
  F8 acc[R], macc[R];
  for (int r = 0; r < R; ++r) acc[r] = macc[r] = isa::zero();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* k = row + TS * sb;
    const float d = isa::h2f(k), dmin = isa::h2f(k + 2);
    const uint8_t* qs = k + (Q5 ? 48 : 16);
    B32 qh{};
    if constexpr (Q5) qh = isa::load32(k + 16);
    B32 u[8];
    alignas(32) float ws[8], mf[8];
    for (int j = 0; j < 4; ++j) {
      uint8_t s1, m1, s2, m2;
      scale_min_k4(2 * j, k + 4, s1, m1);
      scale_min_k4(2 * j + 1, k + 4, s2, m2);
      const B32 bytes = isa::load32(qs + 32 * j);
      B32 lo = isa::nibbles_lo(bytes), hi = isa::nibbles_hi(bytes);
      if constexpr (Q5) {
        lo = isa::add16_where(lo, qh, static_cast<uint8_t>(1 << (2 * j)));
        hi = isa::add16_where(hi, qh, static_cast<uint8_t>(2 << (2 * j)));
      }
      u[2 * j] = lo;
      u[2 * j + 1] = hi;
      ws[2 * j] = d * s1;
      ws[2 * j + 1] = d * s2;
      mf[2 * j] = dmin * m1;
      mf[2 * j + 1] = dmin * m2;
    }
    group<R, false, 0>(u, ws, 8, 8 * sb, a, acc);
    const F8 mv = isa::load8(mf);  // sum_s dmin * m[s] * (d_x * sum(q_x))
    for (int r = 0; r < R; ++r) macc[r] = isa::fma(mv, isa::load8(a[r].s + 8 * sb), macc[r]);
  }
  for (int r = 0; r < R; ++r) y[r * ys] = isa::hsum(acc[r]) - isa::hsum(macc[r]);
}

// Q6_K: q in 0..63, value q - 32; scales per 16 elements, so each 32-block's halves get their own fma (lo first)
template <int R>
void dot_q6_k(const uint8_t* row, const ActQ* a, int64_t nsb, float* y, int64_t ys) {
  F8 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = isa::zero();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* k = row + 210 * sb;
    const float d = isa::h2f(k + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(k + 192);
    alignas(32) float wl[8], wh[8];
    for (int c = 0; c < 8; ++c) {
      wl[c] = d * static_cast<float>(sc[2 * c]);
      wh[c] = d * static_cast<float>(sc[2 * c + 1]);
    }
    B32 u[8];
    for (int h = 0; h < 2; ++h) {
      const B32 qh = isa::load32(k + 128 + 32 * h);
      for (int j = 0; j < 4; ++j) u[4 * h + j] = isa::q6k_chunk(isa::load32(k + 64 * h + 32 * (j & 1)), qh, j);
    }
    const F8 fl = isa::load8(wl), fh = isa::load8(wh);
    for (int r = 0; r < R; ++r) {
      I8 lo, hi;
      isa::dots8<false, 5>(u, 8, a[r].q + 256 * sb, a[r].ns4 + 64 * sb, lo, hi);
      const F8 ad = isa::load8(a[r].d + 8 * sb);
      acc[r] = isa::fma(isa::cvt(lo), isa::mul(fl, ad), acc[r]);
      acc[r] = isa::fma(isa::cvt(hi), isa::mul(fh, ad), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ys] = isa::hsum(acc[r]);
}

using TileFn = void (*)(const uint8_t*, const ActQ*, int64_t, float*, int64_t);

template <template <int> class Dot, int... R>
constexpr std::array<TileFn, sizeof...(R)> tiles(std::integer_sequence<int, R...>) {
  return {Dot<R + 1>::f...};
}

#define AUTOGLM_TILE(NAME, ...)              \
  template <int R>                           \
  struct NAME {                              \
    static constexpr TileFn f = __VA_ARGS__; \
  };
AUTOGLM_TILE(TQ4_0, dot_simple<Q4_0, R>)
AUTOGLM_TILE(TQ5_0, dot_simple<Q5_0, R>)
AUTOGLM_TILE(TQ8_0, dot_simple<Q8_0, R>)
AUTOGLM_TILE(TQ4_K, dot_qk_affine<false, R>)
AUTOGLM_TILE(TQ5_K, dot_qk_affine<true, R>)
AUTOGLM_TILE(TQ6_K, dot_q6_k<R>)
#undef AUTOGLM_TILE

template <template <int> class Dot>
const TileFn* tiles_of() {
  static constexpr auto t = tiles<Dot>(std::make_integer_sequence<int, kMaxTile>{});
  return t.data();
}

// tiles[R - 1] computes R activation rows at once
const TileFn* tile_fns(int64_t q) {
  switch (q) {
    case Q4_0: return tiles_of<TQ4_0>();
    case Q5_0: return tiles_of<TQ5_0>();
    case Q8_0: return tiles_of<TQ8_0>();
    case Q4_K: return tiles_of<TQ4_K>();
    case Q5_K: return tiles_of<TQ5_K>();
    case Q6_K: return tiles_of<TQ6_K>();
    default: return nullptr;
  }
}

}  // namespace

bool gemv_supported(int64_t q) { return tile_fns(q) != nullptr; }

const char* isa_name() { return isa::kName; }

void gemv_rows(int64_t q, const uint8_t* wp, int64_t rs, int64_t nb, int64_t n0, int64_t n1, const ActQ* acts,
               int64_t M, float* y, int64_t ys) {
  const TileFn* fns = tile_fns(q);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = wp + n * rs;  // one row stays in L1; each block is unpacked once per tile of rows
    for (int64_t m = 0; m < M; m += kMaxTile) {
      const int64_t r = std::min<int64_t>(kMaxTile, M - m);
      fns[r - 1](row, acts + m, nb, y + m * ys + n, ys);
    }
  }
}

}  // namespace autoglm
