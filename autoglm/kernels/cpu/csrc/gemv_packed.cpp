// Decode (and prefill) matmul on packed weights (layout: pack.cpp): y[M, N] = x[M, K] @ W.T with int8 activations,
// equal to F.linear(x_q, W) up to float32 rounding. Block-32 types: per-32 activations (quantize_act_row); per 16
// weight rows x 32 elements and activation row (AVX-512) 8 vpdpbusd, one int add, one convert and two float ops.
// Q4_K / Q6_K: llama.cpp's q8_K activations (per 256, common.h quantize_q8k) and its integer reduction over the
// super-block (one or two vpdpwssd / vpmulld per sub-block, one float step per super-block: kquant_q8k.h's order, so
// the result is bitwise that of gemv_q8k on the file-order blocks). The 16 lanes are 16 outputs, stored with no
// horizontal sum. The kernel was bound by the activation broadcasts, not the
// dot products: for Q4_K and Q6_K the AVX-512 build runs pair tiles (two adjacent 16-row groups share every
// broadcast, 1.2-1.4x prefill). The AVX2 build runs the same layout in two 8-row halves (packed_tiles_avx2.h),
// bitwise equal to the AVX-512 build. Each group of 16 rows is unpacked once and used for every activation row, so
// the kernel also serves prefill (measured faster than dequantize + bf16 GEMM at 512 rows). Every activation row's
// arithmetic is the same whatever M is.
#include "packed_tiles.h"

namespace autoglm {
namespace {

#if AUTOGLM_PACKED
using packed::ActP;
constexpr int64_t kPrefetch = 4096;
constexpr int64_t kMinTaskBytes = 256 * 1024;
constexpr int64_t kMinChunkBytes = 32 * 1024;

// the weights are one sequential stream: fetch kPrefetch bytes ahead so memory overlaps the arithmetic (the hardware
// prefetcher alone left the 8-row lm_head at memory time + compute time). Only on the first pass over a group: later
// activation tiles of a prefill find it in cache, and the prefetches cost them load slots.
inline void prefetch(const uint8_t* g, int64_t gbytes) {
  for (int64_t c = 0; c < gbytes; c += 64) _mm_prefetch(reinterpret_cast<const char*>(g + kPrefetch + c), _MM_HINT_T0);
}

// y[r * ys + i] (i < 16) for the R activation rows of the tile and one row group (nb blocks of gbytes each)
template <int64_t Q, int R>
void tile(const uint8_t* grp0, int64_t nb, int64_t gbytes, const ActP* a, float* y, int64_t ys, bool pf) {
  packed::Acc acc[R];
  for (int r = 0; r < R; ++r) packed::acc_zero(acc[r]);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* g = grp0 + gbytes * b;
    if (pf) prefetch(g, gbytes);
    if constexpr (Q == Q4_K) {
      packed::q4_k_block<R>(g, b, a, acc);
    } else if constexpr (Q == Q6_K) {
      packed::q6_k_block<R>(g, b, a, acc);
    } else {
      packed::simple_block<Q, R>(g, b, a, acc);
    }
  }
  for (int r = 0; r < R; ++r) packed::acc_store(acc[r], y + r * ys);
}

// the same for two adjacent row groups (32 outputs per row) through the pair blocks (packed::kPairQ4K, kPairQ6K),
// which accumulate into y in place
template <int64_t Q, int R>
void tile2(const uint8_t* grp0, int64_t nb, int64_t gbytes, const ActP* a, float* y, int64_t ys, bool pf) {
  for (int r = 0; r < R; ++r) std::fill(y + r * ys, y + r * ys + 2 * kPackRows, 0.f);
  const int64_t gs = nb * gbytes;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* g = grp0 + gbytes * b;
    if (pf) {
      prefetch(g, gbytes);
      prefetch(g + gs, gbytes);
    }
    if constexpr (Q == Q4_K) {
      packed::q4_k_block2<R>(g, gs, b, a, y, ys);
    } else {
      packed::q6_k_block2<R>(g, gs, b, a, y, ys);
    }
  }
}

using PackedTileFn = void (*)(const uint8_t*, int64_t, int64_t, const ActP*, float*, int64_t, bool);

template <int64_t Q, int... R>
constexpr std::array<PackedTileFn, kMaxTile> make_tiles(std::integer_sequence<int, R...>) {
  return {&tile<Q, R + 1>...};
}

template <int64_t Q>
const PackedTileFn* tiles_of() {
  static constexpr auto t = make_tiles<Q>(std::make_integer_sequence<int, kMaxTile>{});
  return t.data();
}

template <int64_t Q, int... R>
constexpr std::array<PackedTileFn, packed::kPairRows> make_pair_tiles(std::integer_sequence<int, R...>) {
  return {&tile2<Q, R + 1>...};
}
template <int64_t Q>
const PackedTileFn* pair_tiles_of() {
  static constexpr auto t = make_pair_tiles<Q>(std::make_integer_sequence<int, packed::kPairRows>{});
  return t.data();
}
// the pair tiles of type q, or null where this ISA has none for it
const PackedTileFn* pair_tiles(int64_t q) {
  if (q == Q4_K && packed::kPairQ4K) return pair_tiles_of<Q4_K>();
  if (q == Q6_K && packed::kPairQ6K) return pair_tiles_of<Q6_K>();
  return nullptr;
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

// one activation matrix quantized for the packed tiles: q8_K (Q4_K / Q6_K) or per 32 with type q's zero point
struct PackedActs {
  std::vector<int8_t> aq;
  std::vector<float> ad;
  std::vector<int32_t> ainit, ainit16;
  std::vector<int16_t> bs16, bs32;
  std::vector<ActP> acts;
};

void quantize_packed_acts(const torch::Tensor& x, int64_t q, int64_t bs, PackedActs& A) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / bs, n32 = K / 32;
  const bool q8k = q == Q4_K || q == Q6_K;  // q8_K activations (per 256); the block-32 types: per 32
  A.aq.resize(M * K);
  A.ad.resize(M * n32);
  A.ainit.resize(M * n32);
  A.ainit16.resize(M * 2 * n32);
  A.bs16.resize(M * 2 * n32);
  A.bs32.resize(M * n32);
  A.acts.resize(M);
  const int off = zero_point(q);
  // prefill quantizes hundreds of rows: in parallel (each row's values do not depend on the split)
  parallel_chunks(M, std::max<int64_t>(1, 4096 / K), [&](int64_t m0, int64_t m1) {
    std::vector<float> as(q8k ? 0 : n32);  // the per-32 path's scratch
    std::vector<int32_t> ns4(q8k ? 0 : K / 4);
    for (int64_t m = m0; m < m1; ++m) {
      const float* xm = x.data_ptr<float>() + m * K;
      int8_t* qm = A.aq.data() + m * K;
      float* dm = A.ad.data() + m * n32;
      int32_t *i32 = A.ainit.data() + m * n32, *i16 = A.ainit16.data() + m * 2 * n32;
      int16_t *b16 = A.bs16.data() + m * 2 * n32, *b32 = A.bs32.data() + m * n32;
      if (q8k) {
        for (int64_t b = 0; b < nb; ++b) quantize_q8k(xm + 256 * b, qm + 256 * b, dm[b], b16 + 16 * b);
        for (int64_t h = 0; h < 2 * n32; ++h) i16[h] = -32 * b16[h];
        for (int64_t b = 0; b < n32; ++b) b32[b] = static_cast<int16_t>(b16[2 * b] + b16[2 * b + 1]);
      } else {
        quantize_act_row(xm, K, qm, dm, as.data(), ns4.data());
        for (int64_t b = 0; b < n32; ++b) {  // ns4 holds -sum4(q)
          int32_t s = 0;
          for (int i = 0; i < 8; ++i) s += ns4[8 * b + i];
          i32[b] = off * s;
        }
      }
      A.acts[m] = {qm, dm, i32, i16, b16, b32};
    }
  });
}

// one packed weight's outputs for the activation rows: yp [M, N] row-major (N = its rows)
struct PackedJob {
  const uint8_t* w;
  float* y;
  int64_t q, N, nb, gbytes;
  const PackedTileFn* tiles;
  const PackedTileFn* pairs;  // non-null: units of two row groups
  int64_t per, U;             // groups per unit, units
};

PackedJob packed_job(const torch::Tensor& packed, int64_t q, int64_t K, int64_t M, torch::Tensor& y) {
  int64_t bs, ts;
  check_packed(packed, q, K, bs, ts);
  PackedJob j{packed.data_ptr<uint8_t>(), y.data_ptr<float>(), q, packed.size(0), K / bs, kPackRows * ts,
              packed_tiles(q), M > 1 ? pair_tiles(q) : nullptr, 1, 0};
  j.per = j.pairs ? 2 : 1;
  j.U = (j.N / kPackRows + j.per - 1) / j.per;
  return j;
}

// units [u0, u1) of job j
void run_units(const PackedJob& j, const ActP* acts, int64_t M, int64_t u0, int64_t u1) {
  const int64_t G = j.N / kPackRows, step = packed::tile_rows(j.q);  // activation rows per single-group tile
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t g = j.per * u;
    const uint8_t* w = j.w + g * j.nb * j.gbytes;
    float* yg = j.y + kPackRows * g;
    if (j.per == 2 && g + 1 < G) {
      for (int64_t m = 0; m < M; m += packed::kPairRows) {
        const int64_t r = std::min<int64_t>(packed::kPairRows, M - m);
        j.pairs[r - 1](w, j.nb, j.gbytes, acts + m, yg + m * j.N, j.N, m == 0);
      }
      continue;
    }
    // ceil(M / step) tiles of balanced sizes (M = 8 at step 5: 4 + 4, not 5 + 3)
    const int64_t nt = (M + step - 1) / step;
    for (int64_t t = 0, m = 0; t < nt; ++t) {
      const int64_t r = M / nt + (t < M % nt ? 1 : 0);
      j.tiles[r - 1](w, j.nb, j.gbytes, acts + m, yg + m * j.N, j.N, m == 0);
      m += r;
    }
  }
}
#endif

}  // namespace

// y [M, N] float32 = x [M, K] float32 @ W.T for a packed W; int8 activations (AVX512-VNNI and AVX2 builds)
torch::Tensor gemv_packed(const torch::Tensor& x, const torch::Tensor& packed, int64_t q) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  int64_t bs, ts;
  check_packed(packed, q, K, bs, ts);
  auto y = torch::empty({M, N}, x.options());
#if AUTOGLM_PACKED
  PackedActs A;
  quantize_packed_acts(x, q, bs, A);
  const PackedJob j = packed_job(packed, q, K, M, y);
  // units of work: one row group, or two for the pair tiles (K-quants on AVX-512, prefill: the last group may be
  // alone). Decode (M = 1) keeps one group per tile: it reads the weights from DRAM once, where a second stream
  // did not measurably help and single groups were the measured-at-the-bound path.
  // Under kMinTaskBytes of weights x activation rows runs inline: a decode k/v projection (0.2 MB), where a thread
  // hand-off took longer than its weights' DRAM time. Else guided chunks of at least kMinChunkBytes.
  const int64_t unit_bytes = j.per * j.nb * j.gbytes * M;
  const int64_t grain = unit_bytes * j.U < kMinTaskBytes ? j.U : kMinChunkBytes / unit_bytes;
  parallel_guided(j.U, grain, [&](int64_t u0, int64_t u1) { run_units(j, A.acts.data(), M, u0, u1); });
#else
  TORCH_CHECK(false, "gemv_packed needs an AVX512-VNNI or AVX2 build");
#endif
  return y;
}

// gemv_packed of several weights on one x, in one parallel region over all their row groups, the activations
// quantized once: every qs[i] must take the same activations (Q4_K / Q6_K: q8_K; a block-32 type: only itself).
// Per output the same arithmetic as gemv_packed (bitwise). Used for a layer's q/k/v and gate/up, where a 0.2 MB k or
// v projection alone ran on one thread and the 1.3 MB q split into too few chunks to keep both threads busy.
std::vector<torch::Tensor> gemv_packed_many(const torch::Tensor& x, const std::vector<torch::Tensor>& packed,
                                            const std::vector<int64_t>& qs) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be float32 [M, K]");
  TORCH_CHECK(!packed.empty() && packed.size() == qs.size(), "gemv_packed_many: one type per weight");
  const int64_t M = x.size(0), K = x.size(1);
  const bool q8k = qs[0] == Q4_K || qs[0] == Q6_K;
  for (int64_t q : qs)
    TORCH_CHECK(q8k ? (q == Q4_K || q == Q6_K) : q == qs[0], "gemv_packed_many: the weights need other activations");
  std::vector<torch::Tensor> ys;
  for (const auto& w : packed) ys.push_back(torch::empty({M, w.size(0)}, x.options()));
#if AUTOGLM_PACKED
  int64_t bs, ts;
  check_packed(packed[0], qs[0], K, bs, ts);
  PackedActs A;
  quantize_packed_acts(x, qs[0], bs, A);
  std::vector<PackedJob> jobs;
  int64_t total = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    jobs.push_back(packed_job(packed[i], qs[i], K, M, ys[i]));
    total += jobs.back().per * jobs.back().nb * jobs.back().gbytes * M * jobs.back().U;
  }
  // tasks of ~kMinChunkBytes of weights x rows, taken in guided chunks of tasks (several weights, one region):
  // weight i's tasks are numbered first[i] .. first[i + 1] - 1, each `units[i]` of its units (computed, not
  // listed: a 15 MB gate/up has ~470, and filling a list of them cost ~4 us a call while the other threads waited)
  std::vector<int64_t> units(jobs.size()), first(jobs.size() + 1, 0);
  for (size_t i = 0; i < jobs.size(); ++i) {
    units[i] = std::max<int64_t>(1, kMinChunkBytes / (jobs[i].per * jobs[i].nb * jobs[i].gbytes * M));
    first[i + 1] = first[i] + (jobs[i].U + units[i] - 1) / units[i];
  }
  const int64_t ntasks = first.back();
  const int64_t grain = total < kMinTaskBytes ? ntasks : 1;  // tiny: inline
  parallel_guided(ntasks, grain, [&](int64_t t0, int64_t t1) {
    size_t i = 0;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[i + 1]) ++i;  // tasks ascend within a chunk: the weight index only moves forward
      const int64_t u0 = (t - first[i]) * units[i];
      run_units(jobs[i], A.acts.data(), M, u0, std::min(jobs[i].U, u0 + units[i]));
    }
  });
#else
  TORCH_CHECK(false, "gemv_packed_many needs an AVX512-VNNI or AVX2 build");
#endif
  return ys;
}

}  // namespace autoglm
