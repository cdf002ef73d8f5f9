// Decode matmul on raw GGUF blocks in file order: y[M, N] = x[M, K] @ W[N, K].T for small M (one activation row per
// sequence). Activations are quantized to int8 per block of 32 (float32 scale; quantize_act_row) and dotted with the
// weight blocks by AVX512-VNNI vpdpbusd; the result equals F.linear(x_q, W) up to float32 summation order, where
// x_q = scale * round(x / scale). Without VNNI (or with exact_activations) a float path dequantizes one weight row
// into L1 and keeps float32 activations. Weights repacked at load (Q4_0/Q5_0/Q8_0) use gemv_packed.cpp instead.
#include "kernels.h"

namespace autoglm {
namespace {

// ---- activations quantized per 32: x ~= d[b] * q[32 b + i] --------------------------------------------------------
struct ActQ {
  const int8_t* q;     // [K]
  const float* d;      // [K/32] scale
  const float* s;      // [K/32] d * sum(q) of the block (the quantized block's sum, for Q4_K/Q5_K mins)
  const int32_t* ns4;  // [K/4] -sum of each 4 consecutive q (one vpdpbusd lane): pre-loads the zero-point term
};

#if AUTOGLM_VNNI
inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

inline float fh2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// s8 x s8 dot of 32 bytes via u8 x s8 vpdpbusd: |w| . (sign(w) * x)
inline __m256i dot_s8(__m256i init, __m256i w, __m256i x) {
  const __mmask32 neg = _mm256_movepi8_mask(w);
  const __m256i sx = _mm256_mask_sub_epi8(x, neg, _mm256_setzero_si256(), x);
  return _mm256_dpbusd_epi32(init, _mm256_abs_epi8(w), sx);
}

// 16 packed bytes -> 32 nibbles: low nibbles are elements 0..15, high nibbles 16..31
inline __m256i nibbles16(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

// ---- multi-row dots: each weight block is loaded and unpacked once, then dotted with R <= 8 activation rows ----
// y[r * ys] = W_row . x_r for r < R. The weight side (unpacking, |w| and sign, scales) is done once per block for all
// R rows. K-quants take a super-block's 8 blocks as a group: per row the 8 blocks' int32 vpdpbusd lanes are reduced to
// one int32 per block (exact), so one convert and one FMA per row apply all 8 scales (accumulator lane j holds
// sub-block j). Each row's arithmetic is the same for every R, so a row's result does not depend on the batch.
constexpr int kMaxTile = 8;

// p[0..7] (8 int32 lanes each) -> lo = sums of lanes 0..3 of p0..p7, hi = sums of lanes 4..7 (exact)
inline void hsum8_halves(const __m256i* p, __m256i& lo, __m256i& hi) {
  const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  lo = _mm256_permute2x128_si256(g0, g1, 0x20);
  hi = _mm256_permute2x128_si256(g0, g1, 0x31);
}

// per row r: p_j = u_j . x_r[block b0 + j] (+ init -2^SHIFT * sum4(x): the weight's zero point) for j < cnt;
// acc[r] += float(sum p_j) * ws_j * d_r[b0 + j]
template <int R, int SHIFT>
inline void group32(const __m256i* u, __m256 ws, int cnt, int64_t b0, const ActQ* a, __m256* acc) {
  const __m256i z = _mm256_setzero_si256();
  const __mmask8 valid = static_cast<__mmask8>((1u << cnt) - 1);
  for (int r = 0; r < R; ++r) {
    __m256i p[8];
    for (int j = 0; j < 8; ++j) {
      if (j < cnt) {
        const int64_t b = b0 + j;
        const __m256i init = SHIFT > 0 ? _mm256_slli_epi32(load256(a[r].ns4 + 8 * b), SHIFT) : z;
        p[j] = _mm256_dpbusd_epi32(init, u[j], load256(a[r].q + 32 * b));
      } else {
        p[j] = z;
      }
    }
    __m256i lo, hi;
    hsum8_halves(p, lo, hi);
    const __m256 ad = _mm256_maskz_loadu_ps(valid, a[r].d + b0);  // [8] activation scales of the group
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_mul_ps(ws, ad), acc[r]);
  }
}

// Q4_0 / Q5_0 / Q8_0: per block (rows of 640 columns are 20 blocks: groups of 8 measured slower here); one
// float accumulator vector per row (two for Q8_0: independent chains)
template <int R>
void dot_q8_0(const uint8_t* row, const ActQ* a, int64_t nb, float* y, int64_t ys) {
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  const __m256i z = _mm256_setzero_si256();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {  // two blocks per step: independent accumulators for ILP
    const uint8_t* k0 = row + 34 * b;
    const uint8_t* k1 = k0 + 34;
    const __m256i w0 = load256(k0 + 2), w1 = load256(k1 + 2);
    // s8 x s8 via u8 x s8 vpdpbusd: |w| . (sign(w) * x)
    const __mmask32 n0 = _mm256_movepi8_mask(w0), n1 = _mm256_movepi8_mask(w1);
    const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
    const float d0 = fh2f(k0), d1 = fh2f(k1);
    for (int r = 0; r < R; ++r) {
      const __m256i x0 = load256(a[r].q + 32 * b), x1 = load256(a[r].q + 32 * b + 32);
      const __m256i p0 = _mm256_dpbusd_epi32(z, a0, _mm256_mask_sub_epi8(x0, n0, z, x0));
      const __m256i p1 = _mm256_dpbusd_epi32(z, a1, _mm256_mask_sub_epi8(x1, n1, z, x1));
      acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * a[r].d[b]), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * a[r].d[b + 1]), acc1[r]);
    }
  }
  for (; b < nb; ++b) {
    const uint8_t* k0 = row + 34 * b;
    const __m256i w0 = load256(k0 + 2);
    const float d0 = fh2f(k0);
    for (int r = 0; r < R; ++r)
      acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8(z, w0, load256(a[r].q + 32 * b))),
                                _mm256_set1_ps(d0 * a[r].d[b]), acc0[r]);
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

template <int R>
void dot_q4_0(const uint8_t* row, const ActQ* a, int64_t nb, float* y, int64_t ys) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* k = row + 18 * b;
    const __m256i w = nibbles16(k + 2);
    const float d = fh2f(k);
    for (int r = 0; r < R; ++r) {
      // q in 0..15, value q - 8: the lane init -8 * sum4(x) supplies the offset
      const __m256i init = _mm256_slli_epi32(load256(a[r].ns4 + 8 * b), 3);
      const __m256i p = _mm256_dpbusd_epi32(init, w, load256(a[r].q + 32 * b));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a[r].d[b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(acc[r]);
}

template <int R>
void dot_q5_0(const uint8_t* row, const ActQ* a, int64_t nb, float* y, int64_t ys) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i h16 = _mm256_set1_epi8(16);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* k = row + 22 * b;
    uint32_t qh;
    std::memcpy(&qh, k + 2, 4);
    __m256i w = nibbles16(k + 6);
    w = _mm256_mask_add_epi8(w, static_cast<__mmask32>(qh), w, h16);  // bit j of qh is element j's 5th bit
    const float d = fh2f(k);
    for (int r = 0; r < R; ++r) {
      const __m256i init = _mm256_slli_epi32(load256(a[r].ns4 + 8 * b), 4);
      const __m256i p = _mm256_dpbusd_epi32(init, w, load256(a[r].q + 32 * b));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a[r].d[b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(acc[r]);
}

// Q4_K / Q5_K: w = d*sc[s]*q - dmin*m[s] per 32-element sub-block s; a super-block is one group of 8
template <bool Q5, int R>
void dot_qk_affine(const uint8_t* row, const ActQ* a, int64_t nsb, float* y, int64_t ys) {
  constexpr int64_t TS = Q5 ? 176 : 144;
  __m256 acc[R], macc[R];
  for (int r = 0; r < R; ++r) acc[r] = macc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), h16 = _mm256_set1_epi8(16);
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* k = row + TS * sb;
    const float d = fh2f(k), dmin = fh2f(k + 2);
    const uint8_t* scp = k + 4;
    const uint8_t* qs = k + (Q5 ? 48 : 16);
    __m256i qhv = _mm256_setzero_si256();
    if constexpr (Q5) qhv = load256(k + 16);
    __m256i u[8];
    alignas(32) float wsf[8], mf[8];
    for (int j = 0; j < 4; ++j) {
      uint8_t s1, mn1, s2, mn2;
      scale_min_k4(2 * j, scp, s1, mn1);
      scale_min_k4(2 * j + 1, scp, s2, mn2);
      const __m256i bytes = load256(qs + 32 * j);
      __m256i lo = _mm256_and_si256(bytes, m4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
      if constexpr (Q5) {
        lo = _mm256_mask_add_epi8(lo, _mm256_test_epi8_mask(qhv, _mm256_set1_epi8(1 << (2 * j))), lo, h16);
        hi = _mm256_mask_add_epi8(hi, _mm256_test_epi8_mask(qhv, _mm256_set1_epi8(2 << (2 * j))), hi, h16);
      }
      u[2 * j] = lo;
      u[2 * j + 1] = hi;
      wsf[2 * j] = d * s1;
      wsf[2 * j + 1] = d * s2;
      mf[2 * j] = dmin * mn1;
      mf[2 * j + 1] = dmin * mn2;
    }
    group32<R, 0>(u, _mm256_load_ps(wsf), 8, 8 * sb, a, acc);
    // the mins: sum_s dmin * m[s] * (d_x * sum(q_x)) over the 8 sub-blocks
    const __m256 mv = _mm256_load_ps(mf);
    for (int r = 0; r < R; ++r) macc[r] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(a[r].s + 8 * sb), macc[r]);
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(acc[r]) - hsum(macc[r]);
}

template <int R>
void dot_q6_k(const uint8_t* row, const ActQ* a, int64_t nsb, float* y, int64_t ys) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* k = row + 210 * sb;
    const __m256 d = _mm256_set1_ps(fh2f(k + 208));
    // 16 int8 scales: chunk c's elements 0..15 use sc[2c] (even), 16..31 sc[2c+1] (odd)
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + 192));
    const __m128i ev = _mm_shuffle_epi8(sc, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m128i od = _mm_shuffle_epi8(sc, _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m256 wl = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ev)));
    const __m256 wh = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(od)));
    __m256i u[8];
    for (int h = 0; h < 2; ++h) {
      const __m256i qhv = load256(k + 128 + 32 * h);
      for (int j = 0; j < 4; ++j) {
        const __m256i qlv = load256(k + 64 * h + 32 * (j & 1));
        const __m256i low = _mm256_and_si256(j >= 2 ? _mm256_srli_epi16(qlv, 4) : qlv, m4);
        const __m256i high = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qhv, 2 * j), 4), m30);
        u[4 * h + j] = _mm256_or_si256(low, high);  // chunk 4 h + j of the super-block, q in 0..63
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256i p[8];
      for (int c = 0; c < 8; ++c) {
        const int64_t b = 8 * sb + c;
        // value q - 32: the lane init -32 * sum4(x) supplies the offset
        const __m256i init = _mm256_slli_epi32(load256(a[r].ns4 + 8 * b), 5);
        p[c] = _mm256_dpbusd_epi32(init, u[c], load256(a[r].q + 32 * b));
      }
      __m256i lo, hi;
      hsum8_halves(p, lo, hi);
      const __m256 ad = _mm256_loadu_ps(a[r].d + 8 * sb);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(wl, ad), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(wh, ad), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * ys] = hsum(acc[r]);
}

// a tile of R activation rows against one weight row
using TileFn = void (*)(const uint8_t*, const ActQ*, int64_t, float*, int64_t);

template <template <int> class Dot>
struct Tiles {
  static constexpr TileFn fns[kMaxTile] = {Dot<1>::f, Dot<2>::f, Dot<3>::f, Dot<4>::f,
                                           Dot<5>::f, Dot<6>::f, Dot<7>::f, Dot<8>::f};
};

#define AUTOGLM_TILE(NAME, ...)              \
  template <int R>                           \
  struct NAME {                              \
    static constexpr TileFn f = __VA_ARGS__; \
  };
AUTOGLM_TILE(TQ4_0, dot_q4_0<R>)
AUTOGLM_TILE(TQ5_0, dot_q5_0<R>)
AUTOGLM_TILE(TQ8_0, dot_q8_0<R>)
AUTOGLM_TILE(TQ4_K, dot_qk_affine<false, R>)
AUTOGLM_TILE(TQ5_K, dot_qk_affine<true, R>)
AUTOGLM_TILE(TQ6_K, dot_q6_k<R>)
#undef AUTOGLM_TILE

// tiles[R - 1] computes R rows at once
const TileFn* tile_fns(int64_t q) {
  switch (q) {
    case Q4_0: return Tiles<TQ4_0>::fns;
    case Q5_0: return Tiles<TQ5_0>::fns;
    case Q8_0: return Tiles<TQ8_0>::fns;
    case Q4_K: return Tiles<TQ4_K>::fns;
    case Q5_K: return Tiles<TQ5_K>::fns;
    case Q6_K: return Tiles<TQ6_K>::fns;
    default: return nullptr;
  }
}
#endif

float dot_float(const float* w, const float* x, int64_t K) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= K; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += w[i + j] * x[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < K; ++i) s += w[i] * x[i];
  return s;
}

}  // namespace

bool has_vnni() { return AUTOGLM_VNNI != 0; }

// y [M, N] float32 = x [M, K] float32 @ W.T; int8 activations (VNNI) unless exact_activations or no VNNI
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& raw, int64_t q, bool exact_activations) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = raw.size(0);
  int64_t bs, ts;
  check_raw(raw, q, K, bs, ts);
  const int64_t nb = K / bs, rs = raw.stride(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(8, N / (8 * at::get_num_threads()) + 1);
#if AUTOGLM_VNNI
  if (!exact_activations) {
    std::vector<int8_t> aq(M * K);
    std::vector<float> ad(M * K / 32), as(M * K / 32);
    std::vector<int32_t> an(M * K / 4);
    for (int64_t m = 0; m < M; ++m)
      quantize_act_row(xp + m * K, K, aq.data() + m * K, ad.data() + m * K / 32, as.data() + m * K / 32,
                       an.data() + m * K / 4);
    std::vector<ActQ> acts(M);
    for (int64_t m = 0; m < M; ++m)
      acts[m] = {aq.data() + m * K, ad.data() + m * K / 32, as.data() + m * K / 32, an.data() + m * K / 4};
    const TileFn* tiles = tile_fns(q);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = wp + n * rs;  // one row stays in L1; each block is unpacked once per tile of rows
        for (int64_t m = 0; m < M; m += kMaxTile) {
          const int64_t r = std::min<int64_t>(kMaxTile, M - m);
          tiles[r - 1](row, acts.data() + m, nb, yp + m * N + n, N);
        }
      }
    });
    return y;
  }
#endif
  const DeqFn f = deq_fn(q);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(K);
    for (int64_t n = n0; n < n1; ++n) {
      deq_row(f, wp + n * rs, nb, bs, ts, w.data());
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot_float(w.data(), xp + m * K, K);
    }
  });
  return y;
}

// out [N, K] (float32 or bfloat16, contiguous) = W; bit-exact float32 values (bfloat16: rounded to nearest even).

}  // namespace autoglm
