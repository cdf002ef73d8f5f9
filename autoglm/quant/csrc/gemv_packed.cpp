// Q4_0 / Q5_0 / Q8_0 weights repacked at load for the decode matmul: 16 rows interleaved per block, so one vpdpbusd
// multiplies 4 consecutive elements of 16 weight rows by the same 4 activation bytes (broadcast) and its 16 int32
// lanes are 16 outputs: no horizontal sums, one convert and two float ops per 16 rows x 32 elements per activation
// row (the row-major kernel in gemv.cpp pays them per row). llama.cpp's CPU "repack" buffers do the same for
// Q4_0 / Q8_0; the bytes are the file's, rearranged (same total size; `unpack_rows` restores file order exactly).
//
// Packed layout of a [N, K] weight (N % 16 == 0): group (g, b) = rows 16g..16g+15, block b (32 elements), at byte
// (g * nb + b) * 16 * ts, where ts is the type's block size in bytes:
//   [0, 32)   the 16 rows' fp16 scales d
//   Q8_0:     [32, 544)  8 quads k: row i's bytes 4i..4i+3 = elements 4k..4k+3 as u8 (q + 128)
//   Q5_0:     [32, 96)   8 x u64 masks: bit 4i + j of mask k = 5th bit of row i's element 4k + j
//   Q4_0/Q5_0 [.., +256) 4 x 64 bytes k: row i's byte 4i + j = element 4k + j (low nibble) | element 16 + 4k + j (high)
// Element value = u - off (off 128 / 8 / 16): the activation side supplies -off * sum(x_q) per block.
#include "kernels.h"

namespace autoglm {
namespace {

constexpr int64_t kRows = 16;

inline bool packable(int64_t q) { return q == Q4_0 || q == Q5_0 || q == Q8_0; }
inline int zero_point(int64_t q) { return q == Q8_0 ? 128 : (q == Q5_0 ? 16 : 8); }

// element e (0..31) of a file-order block as u8 (value + off)
inline uint8_t element(const uint8_t* blk, int64_t q, int e) {
  if (q == Q8_0) return static_cast<uint8_t>(blk[2 + e] ^ 0x80);
  const uint8_t* qs = blk + (q == Q5_0 ? 6 : 2);
  uint8_t v = e < 16 ? (qs[e] & 0x0F) : (qs[e - 16] >> 4);
  if (q == Q5_0) {
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    v |= ((qh >> e) & 1) << 4;
  }
  return v;
}

// the 16 file-order blocks blk[i] (row i, same block index) -> one packed group
void pack_group(const uint8_t* const* blk, int64_t q, uint8_t* out) {
  for (int i = 0; i < kRows; ++i) std::memcpy(out + 2 * i, blk[i], 2);
  uint8_t* body = out + 32;
  if (q == Q8_0) {
    for (int k = 0; k < 8; ++k)
      for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < 4; ++j) body[64 * k + 4 * i + j] = element(blk[i], q, 4 * k + j);
    return;
  }
  if (q == Q5_0) {
    for (int k = 0; k < 8; ++k) {
      uint64_t m = 0;
      for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < 4; ++j) m |= static_cast<uint64_t>(element(blk[i], q, 4 * k + j) >> 4) << (4 * i + j);
      std::memcpy(body + 8 * k, &m, 8);
    }
    body += 64;
  }
  for (int k = 0; k < 4; ++k)
    for (int i = 0; i < kRows; ++i)
      for (int j = 0; j < 4; ++j)
        body[64 * k + 4 * i + j] = static_cast<uint8_t>((element(blk[i], q, 4 * k + j) & 0x0F) |
                                                        ((element(blk[i], q, 16 + 4 * k + j) & 0x0F) << 4));
}

// row i of a packed group -> its file-order block (exact inverse of pack_group)
void unpack_block(const uint8_t* grp, int64_t q, int i, uint8_t* out) {
  std::memcpy(out, grp + 2 * i, 2);
  const uint8_t* body = grp + 32;
  if (q == Q8_0) {
    for (int e = 0; e < 32; ++e) out[2 + e] = body[64 * (e / 4) + 4 * i + e % 4] ^ 0x80;
    return;
  }
  uint8_t* qs = out + 2;
  if (q == Q5_0) {
    uint32_t qh = 0;
    for (int e = 0; e < 32; ++e) {
      uint64_t m;
      std::memcpy(&m, body + 8 * (e / 4), 8);
      qh |= static_cast<uint32_t>((m >> (4 * i + e % 4)) & 1) << e;
    }
    std::memcpy(out + 2, &qh, 4);
    qs = out + 6;
    body += 64;
  }
  for (int e = 0; e < 16; ++e) qs[e] = body[64 * (e / 4) + 4 * i + e % 4];  // both nibbles sit together already
}

void check_packed(const torch::Tensor& t, int64_t q, int64_t K, int64_t& ts) {
  int64_t bs;
  TORCH_CHECK(packable(q), "gguf_kernels: GGML type ", q, " has no packed layout");
  check_raw(t, q, K, bs, ts);
  TORCH_CHECK(t.is_contiguous() && t.size(0) % kRows == 0, "packed weights need contiguous rows, a multiple of 16");
}

#if AUTOGLM_VNNI
constexpr int kMaxTile = 8;

// one activation row: int8 values, per-block scale d and -off * sum(q) of the block
struct ActP {
  const int8_t* q;
  const float* d;
  const int32_t* init;
};

// acc += w . (the 4 bytes at p, broadcast to every lane), with the broadcast folded into vpdpbusd's memory operand
// (GCC emits a separate vpbroadcastd for the intrinsic form: 8 extra instructions per row and group)
inline __m512i dot_bcast(__m512i acc, __m512i w, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}

// acc[r] (16 rows) += float(W_b . x_r[b]) * (d_w * d_x) for one group; W given as its 8 quads
template <int R>
inline void group_columns(const __m512i* w, __m512 dw, int64_t b, const ActP* a, __m512* acc) {
  for (int r = 0; r < R; ++r) {
    const int8_t* xb = a[r].q + 32 * b;
    // two independent chains (integer sums are exact: the split does not change the result)
    __m512i p0 = _mm512_set1_epi32(a[r].init[b]), p1 = _mm512_setzero_si512();
    for (int k = 0; k < 8; k += 2) {
      p0 = dot_bcast(p0, w[k], xb + 4 * k);
      p1 = dot_bcast(p1, w[k + 1], xb + 4 * k + 4);
    }
    const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(a[r].d[b]));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)), sc, acc[r]);
  }
}

template <int64_t Q>
inline void load_group(const uint8_t* g, __m512i* w, __m512& dw) {
  dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)));
  const uint8_t* body = g + 32;
  if constexpr (Q == Q8_0) {
    for (int k = 0; k < 8; ++k) w[k] = _mm512_loadu_si512(body + 64 * k);
  } else {
    const uint8_t* nib = body + (Q == Q5_0 ? 64 : 0);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int k = 0; k < 4; ++k) {
      const __m512i v = _mm512_loadu_si512(nib + 64 * k);
      w[k] = _mm512_and_si512(v, m4);
      w[k + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    }
    if constexpr (Q == Q5_0) {
      const __m512i h16 = _mm512_set1_epi8(16);
      for (int k = 0; k < 8; ++k) {
        uint64_t m;
        std::memcpy(&m, body + 8 * k, 8);
        w[k] = _mm512_mask_add_epi8(w[k], static_cast<__mmask64>(m), w[k], h16);
      }
    }
  }
}

// y[r * ys + 16 g + i] for the R activation rows of the tile, row group g
template <int64_t Q, int R>
void tile(const uint8_t* grp0, int64_t nb, int64_t gbytes, const ActP* a, float* y, int64_t ys) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i w[8];
    __m512 dw;
    load_group<Q>(grp0 + gbytes * b, w, dw);
    group_columns<R>(w, dw, b, a, acc);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ys, acc[r]);
}

using PackedTileFn = void (*)(const uint8_t*, int64_t, int64_t, const ActP*, float*, int64_t);

template <int64_t Q, int... R>
constexpr std::array<PackedTileFn, kMaxTile> make_tiles(std::integer_sequence<int, R...>) {
  return {&tile<Q, R + 1>...};
}

const PackedTileFn* packed_tiles(int64_t q) {
  static constexpr auto t4 = make_tiles<Q4_0>(std::make_integer_sequence<int, kMaxTile>{});
  static constexpr auto t5 = make_tiles<Q5_0>(std::make_integer_sequence<int, kMaxTile>{});
  static constexpr auto t8 = make_tiles<Q8_0>(std::make_integer_sequence<int, kMaxTile>{});
  return q == Q8_0 ? t8.data() : (q == Q5_0 ? t5.data() : t4.data());
}
#endif

}  // namespace

torch::Tensor pack(const torch::Tensor& raw, int64_t q, int64_t K) {
  int64_t ts;
  check_packed(raw, q, K, ts);
  const int64_t N = raw.size(0), nb = K / 32, rs = raw.stride(0);
  auto out = torch::empty_like(raw, torch::MemoryFormat::Contiguous);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / kRows, 16, [&](int64_t g0, int64_t g1) {
    const uint8_t* blk[kRows];
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < nb; ++b) {
        for (int i = 0; i < kRows; ++i) blk[i] = src + (kRows * g + i) * rs + ts * b;
        pack_group(blk, q, dst + (g * nb + b) * kRows * ts);
      }
  });
  return out;
}

// rows `ids` (int64, any order) of a packed weight in file order: [len(ids), row bytes] uint8
torch::Tensor unpack_rows(const torch::Tensor& packed, int64_t q, int64_t K, const torch::Tensor& ids) {
  int64_t ts;
  check_packed(packed, q, K, ts);
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1, "ids must be a 1-D int64 tensor");
  const auto idc = ids.contiguous();
  const int64_t n = idc.size(0), N = packed.size(0), nb = K / 32;
  auto out = torch::empty({n, packed.size(1)}, packed.options());
  const int64_t* ip = idc.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < N, "row id ", ip[j], " out of range [0, ", N, ")");
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t g = ip[j] / kRows;
      for (int64_t b = 0; b < nb; ++b)
        unpack_block(src + (g * nb + b) * kRows * ts, q, static_cast<int>(ip[j] % kRows), dst + j * nb * ts + b * ts);
    }
  });
  return out;
}

// y [M, N] float32 = x [M, K] float32 @ W.T for a packed W; int8 activations per 32 (VNNI only)
torch::Tensor gemv_packed(const torch::Tensor& x, const torch::Tensor& packed, int64_t q) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  int64_t ts;
  check_packed(packed, q, K, ts);
  auto y = torch::empty({M, N}, x.options());
#if AUTOGLM_VNNI
  const int64_t nb = K / 32, gbytes = kRows * ts;
  std::vector<int8_t> aq(M * K);
  std::vector<float> ad(M * nb), as(M * nb);
  std::vector<int32_t> ainit(M * nb), ns4(K / 4);
  std::vector<ActP> acts(M);
  const int off = zero_point(q);
  for (int64_t m = 0; m < M; ++m) {
    quantize_act_row(x.data_ptr<float>() + m * K, K, aq.data() + m * K, ad.data() + m * nb, as.data() + m * nb,
                     ns4.data());
    for (int64_t b = 0; b < nb; ++b) {
      int32_t s = 0;
      for (int l = 0; l < 8; ++l) s += ns4[8 * b + l];  // ns4 holds -sum4(q)
      ainit[m * nb + b] = off * s;
    }
    acts[m] = {aq.data() + m * K, ad.data() + m * nb, ainit.data() + m * nb};
  }
  const PackedTileFn* tiles = packed_tiles(q);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t G = N / kRows;
  const int64_t grain = std::max<int64_t>(1, G / (8 * at::get_num_threads()) + 1);
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m = 0; m < M; m += kMaxTile) {
        const int64_t r = std::min<int64_t>(kMaxTile, M - m);
        tiles[r - 1](wp + g * nb * gbytes, nb, gbytes, acts.data() + m, yp + m * N + kRows * g, N);
      }
  });
#else
  TORCH_CHECK(false, "gemv_packed needs an AVX512-VNNI build");
#endif
  return y;
}

}  // namespace autoglm
