// Decode (and prefill) matmul on packed weights (layout: pack.cpp): y[M, N] = x[M, K] @ W.T with int8 activations
// per 32 (quantize_act_row), equal to F.linear(x_q, W) up to float32 summation order. Per 16 weight rows x 32
// elements and activation row: 8 vpdpbusd (the 4 activation bytes broadcast from memory), one int add, one convert
// and two or three float ops; the 16 lanes are 16 outputs, stored with no horizontal sum. Each group of 16 rows is
// unpacked once and used for every activation row, so the kernel also serves prefill (measured faster than
// dequantize + bf16 GEMM at 512 rows). Every activation row's arithmetic is the same whatever M is.
#include "kernels.h"

namespace autoglm {
namespace {

#if AUTOGLM_VNNI
constexpr int64_t kPrefetch = 4096;

// one activation row: int8 values; per 32-block scale d, d * sum(q) (K-quant mins) and -off * sum(q); per
// 16-block -off * sum(q) (Q6_K's scales are per 16)
struct ActP {
  const int8_t* q;
  const float* d;
  const float* s;
  const int32_t* init;
  const int32_t* init16;
};

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
inline void simple_block(const uint8_t* g, int64_t b, const ActP* a, __m512* acc) {
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
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), sc, acc[r]);
  }
}

// Q4_K group: one 256-element super-block of 16 rows; w = d*sc[j]*q - dmin*m[j] per 32-element sub-block j
template <int R>
inline void q4_k_block(const uint8_t* g, int64_t sb, const ActP* a, __m512* acc) {
  const __m512 d = load_half16(g), dmin = load_half16(g + 32);
  __m128i B[12];  // scale byte t of the 16 rows
  for (int t = 0; t < 12; ++t) B[t] = load128(g + 64 + 16 * t);
  const __m128i m63 = _mm_set1_epi8(63), m15 = _mm_set1_epi8(15), m48 = _mm_set1_epi8(0x30);
  for (int j = 0; j < 8; ++j) {
    __m128i sc, mn;  // ggml get_scale_min_k4, 16 rows at once
    if (j < 4) {
      sc = _mm_and_si128(B[j], m63);
      mn = _mm_and_si128(B[j + 4], m63);
    } else {
      const __m128i top_s = _mm_and_si128(_mm_srli_epi16(B[j - 4], 2), m48);  // bits 6-7 -> 4-5
      const __m128i top_m = _mm_and_si128(_mm_srli_epi16(B[j], 2), m48);
      sc = _mm_or_si128(_mm_and_si128(B[j + 4], m15), top_s);
      mn = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(B[j + 4], 4), m15), top_m);
    }
    const __m512 scv = _mm512_mul_ps(d, u8_to_ps(sc)), mv = _mm512_mul_ps(dmin, u8_to_ps(mn));
    __m512i w[8];
    nibbles(g + 256 + 256 * j, w);
    const int64_t b = 8 * sb + j;
    for (int r = 0; r < R; ++r) {
      __m512i lo, hi;
      dots(w, a[r].q + 32 * b, _mm512_setzero_si512(), _mm512_setzero_si512(), lo, hi);
      const __m512 sc_r = _mm512_mul_ps(scv, _mm512_set1_ps(a[r].d[b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), sc_r, acc[r]);
      acc[r] = _mm512_fnmadd_ps(mv, _mm512_set1_ps(a[r].s[b]), acc[r]);
    }
  }
}

// Q6_K group: one 256-element super-block of 16 rows; w = d*sc[e/16]*(q - 32)
template <int R>
inline void q6_k_block(const uint8_t* g, int64_t sb, const ActP* a, __m512* acc) {
  const __m512 d = load_half16(g);
  const __m512i m30 = _mm512_set1_epi8(0x30);
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
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(s_lo, dx), acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(s_hi, dx), acc[r]);
    }
  }
}

// y[r * ys + i] (i < 16) for the R activation rows of the tile and one row group (nb blocks of gbytes each)
template <int64_t Q, int R>
void tile(const uint8_t* grp0, int64_t nb, int64_t gbytes, const ActP* a, float* y, int64_t ys) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* g = grp0 + gbytes * b;
    // the weights are one sequential stream: fetch kPrefetch bytes ahead so memory overlaps the arithmetic (the
    // hardware prefetcher alone left the 8-row lm_head at memory time + compute time)
    for (int64_t c = 0; c < gbytes; c += 64) _mm_prefetch(reinterpret_cast<const char*>(g + kPrefetch + c), _MM_HINT_T0);
    if constexpr (Q == Q4_K) {
      q4_k_block<R>(g, b, a, acc);
    } else if constexpr (Q == Q6_K) {
      q6_k_block<R>(g, b, a, acc);
    } else {
      simple_block<Q, R>(g, b, a, acc);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ys, acc[r]);
}

using PackedTileFn = void (*)(const uint8_t*, int64_t, int64_t, const ActP*, float*, int64_t);

template <int64_t Q, int... R>
constexpr std::array<PackedTileFn, kMaxTile> make_tiles(std::integer_sequence<int, R...>) {
  return {&tile<Q, R + 1>...};
}

template <int64_t Q>
const PackedTileFn* tiles_of() {
  static constexpr auto t = make_tiles<Q>(std::make_integer_sequence<int, kMaxTile>{});
  return t.data();
}

const PackedTileFn* packed_tiles(int64_t q) {
  switch (q) {
    case Q4_0: return tiles_of<Q4_0>();
    case Q5_0: return tiles_of<Q5_0>();
    case Q8_0: return tiles_of<Q8_0>();
    case Q4_K: return tiles_of<Q4_K>();
    default: return tiles_of<Q6_K>();
  }
}

int zero_point(int64_t q) {
  switch (q) {
    case Q8_0: return 128;
    case Q5_0: return 16;
    case Q4_0: return 8;
    case Q6_K: return 32;
    default: return 0;
  }
}
#endif

}  // namespace

// y [M, N] float32 = x [M, K] float32 @ W.T for a packed W; int8 activations per 32 (VNNI builds only)
torch::Tensor gemv_packed(const torch::Tensor& x, const torch::Tensor& packed, int64_t q) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  int64_t bs, ts;
  check_packed(packed, q, K, bs, ts);
  auto y = torch::empty({M, N}, x.options());
#if AUTOGLM_VNNI
  const int64_t nb = K / bs, n32 = K / 32, gbytes = kPackRows * ts;
  std::vector<int8_t> aq(M * K);
  std::vector<float> ad(M * n32), as(M * n32);
  std::vector<int32_t> ainit(M * n32), ainit16(M * 2 * n32), ns4(M * (K / 4));
  std::vector<ActP> acts(M);
  const int off = zero_point(q);
  // prefill quantizes hundreds of rows: in parallel (each row's values do not depend on the split)
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int32_t* n4 = ns4.data() + m * (K / 4);
      quantize_act_row(x.data_ptr<float>() + m * K, K, aq.data() + m * K, ad.data() + m * n32, as.data() + m * n32,
                       n4);
      int32_t* i16 = ainit16.data() + m * 2 * n32;
      for (int64_t h = 0; h < 2 * n32; ++h)  // n4 holds -sum4(q)
        i16[h] = off * (n4[4 * h] + n4[4 * h + 1] + n4[4 * h + 2] + n4[4 * h + 3]);
      for (int64_t b = 0; b < n32; ++b) ainit[m * n32 + b] = i16[2 * b] + i16[2 * b + 1];
      acts[m] = {aq.data() + m * K, ad.data() + m * n32, as.data() + m * n32, ainit.data() + m * n32, i16};
    }
  });
  const PackedTileFn* tiles = packed_tiles(q);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t G = N / kPackRows;
  const int64_t grain = std::max<int64_t>(1, G / (8 * at::get_num_threads()) + 1);
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m = 0; m < M; m += kMaxTile) {
        const int64_t r = std::min<int64_t>(kMaxTile, M - m);
        tiles[r - 1](wp + g * nb * gbytes, nb, gbytes, acts.data() + m, yp + m * N + kPackRows * g, N);
      }
  });
#else
  TORCH_CHECK(false, "gemv_packed needs an AVX512-VNNI build");
#endif
  return y;
}

}  // namespace autoglm
