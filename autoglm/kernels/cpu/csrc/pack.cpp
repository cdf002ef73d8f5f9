// The packed weight layout of the decode kernels (gemv_packed.cpp): 16 rows interleaved per block, so one vpdpbusd
// multiplies 4 consecutive elements of 16 weight rows by the same 4 activation bytes (broadcast) and its 16 int32
// lanes are 16 outputs. llama.cpp's CPU "repack" buffers do the same for Q4_0 / Q8_0 / Q4_K. The bytes are the
// file's, rearranged: same total size, and `unpack_rows` restores file order exactly.
//
// A [N, K] weight (N % 16 == 0) of block geometry (bs elements, ts bytes) is stored as groups (g, b) = rows
// 16g..16g+15 x block b, group (g, b) at byte (g * nb + b) * 16 * ts. A "quad" is 4 consecutive elements; a quad
// vector is 64 bytes: row i's 4 values at bytes 4i..4i+3, each u8 = value + off (the type's zero point; the
// activation side adds -off * sum(x_q)). "Nibble vectors" hold two quad vectors: quad t in the low nibbles and quad
// t + 4 in the high nibbles, so a 32-element sub-block is 4 x 64 bytes.
//   Q8_0  [0,32) d x16 fp16 | [32,544) 8 quad vectors (u = q + 128)
//   Q4_0  [0,32) d | [32,288) nibble vectors (u = q, off 8)
//   Q5_0  [0,32) d | [32,96) 8 x u64: bit 4i + j of word k = 5th bit of row i's element 4k + j | [96,352) nibbles
//   Q4_K  [0,32) d | [32,64) dmin | [64,256) scale byte t (0..11) of the 16 rows at 64 + 16 t |
//         [256,2304) sub-block j (32 elements) at 256 + 256 j: nibble vectors (u = q, mins applied separately)
//   Q6_K  [0,32) d | [32,288) int8 scale s (0..15) of the 16 rows at 32 + 16 s | sub-block j at 288 + 384 j:
//         nibble vectors of the low 4 bits, then 2 x 64 bytes H0, H1: byte 4i + b of Ht holds the high 2 bits of
//         quads (2t, 2t + 1, 2t + 4, 2t + 5) at bits (0-1, 2-3, 4-5, 6-7); u = q (0..63), off 32
#include "kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace autoglm {
namespace {

// element e of a file-order block as its unsigned stored integer u (Q8_0: q + 128; K-quants: the raw q)
uint8_t element(const uint8_t* blk, int64_t q, int e) {
  switch (q) {
    case Q8_0: return static_cast<uint8_t>(blk[2 + e] ^ 0x80);
    case Q4_0: return e < 16 ? (blk[2 + e] & 0x0F) : (blk[2 + e - 16] >> 4);
    case Q5_0: {
      uint32_t qh;
      std::memcpy(&qh, blk + 2, 4);
      const uint8_t lo = e < 16 ? (blk[6 + e] & 0x0F) : (blk[6 + e - 16] >> 4);
      return static_cast<uint8_t>(lo | (((qh >> e) & 1) << 4));
    }
    case Q4_K: {
      const uint8_t b = blk[16 + 32 * (e / 64) + e % 32];
      return (e / 32) % 2 == 0 ? (b & 0x0F) : (b >> 4);
    }
    default: {  // Q6_K: ql [0,128), qh [128,192)
      const int n = e / 128, part = (e % 128) / 32, l = e % 32;
      const uint8_t ql = blk[64 * n + l + 32 * (part % 2)];
      const uint8_t lo = part < 2 ? (ql & 0x0F) : (ql >> 4);
      return static_cast<uint8_t>(lo | (((blk[128 + 32 * n + l] >> (2 * part)) & 3) << 4));
    }
  }
}

// the u values of one file-order block, all bs of them
void elements(const uint8_t* blk, int64_t q, int bs, uint8_t* u) {
  for (int e = 0; e < bs; ++e) u[e] = element(blk, q, e);
}

// u [bs] back into a file-order block's integer fields (scales are copied separately)
void store_elements(const uint8_t* u, int64_t q, uint8_t* blk) {
  switch (q) {
    case Q8_0:
      for (int e = 0; e < 32; ++e) blk[2 + e] = u[e] ^ 0x80;
      return;
    case Q4_0:
    case Q5_0: {
      uint8_t* qs = blk + (q == Q5_0 ? 6 : 2);
      uint32_t qh = 0;
      for (int e = 0; e < 16; ++e) qs[e] = static_cast<uint8_t>((u[e] & 0x0F) | ((u[e + 16] & 0x0F) << 4));
      for (int e = 0; e < 32; ++e) qh |= static_cast<uint32_t>((u[e] >> 4) & 1) << e;
      if (q == Q5_0) std::memcpy(blk + 2, &qh, 4);
      return;
    }
    case Q4_K:
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l)
          blk[16 + 32 * j + l] = static_cast<uint8_t>(u[64 * j + l] | (u[64 * j + 32 + l] << 4));
      return;
    default:  // Q6_K
      for (int n = 0; n < 2; ++n)
        for (int l = 0; l < 32; ++l) {
          const uint8_t* v = u + 128 * n + l;
          blk[64 * n + l] = static_cast<uint8_t>((v[0] & 0x0F) | ((v[64] & 0x0F) << 4));
          blk[64 * n + l + 32] = static_cast<uint8_t>((v[32] & 0x0F) | ((v[96] & 0x0F) << 4));
          blk[128 + 32 * n + l] =
              static_cast<uint8_t>((v[0] >> 4) | ((v[32] >> 4) << 2) | ((v[64] >> 4) << 4) | ((v[96] >> 4) << 6));
        }
  }
}

// byte offset of the integer body in a packed group
int64_t body_offset(int64_t q) {
  switch (q) {
    case Q8_0: case Q4_0: return 32;
    case Q5_0: return 96;
    case Q4_K: return 256;
    default: return 288;
  }
}

// The header bytes of a block (scales) that the packed group stores row-transposed: block bytes [first, last)
// of row i; `header_pos` gives where block byte c of row i lives in the group
void header_range(int64_t q, int& first, int& last) {
  switch (q) {
    case Q4_K: first = 0; last = 16; return;    // d, dmin, 12 scale bytes
    case Q6_K: first = 192; last = 210; return;  // 16 int8 scales, then d
    default: first = 0; last = 2; return;       // d
  }
}

int64_t header_pos(int64_t q, int c, int i) {
  if (q == Q6_K) return c >= 208 ? 2 * i + (c - 208) : 32 + 16 * (c - 192) + i;  // d x16 first, then the scales
  if (q == Q4_K && c >= 4) return 64 + 16 * (c - 4) + i;                        // after d x16 and dmin x16
  return 32 * (c / 2) + 2 * i + c % 2;  // fp16 d (and Q4_K's dmin): 16 little-endian halves each
}

void pack_group(const uint8_t* const* blk, int64_t q, int bs, uint8_t* out) {
  if (q == Q8_0) {  // the common lm_head type: 4-byte moves instead of per-element decoding
    for (int i = 0; i < kPackRows; ++i) std::memcpy(out + 2 * i, blk[i], 2);
    for (int k = 0; k < 8; ++k)
      for (int i = 0; i < kPackRows; ++i) {
        uint32_t v;
        std::memcpy(&v, blk[i] + 2 + 4 * k, 4);
        v ^= 0x80808080u;
        std::memcpy(out + 32 + 64 * k + 4 * i, &v, 4);
      }
    return;
  }
  int first, last;
  header_range(q, first, last);
  for (int i = 0; i < kPackRows; ++i)
    for (int c = first; c < last; ++c) out[header_pos(q, c, i)] = blk[i][c];
  uint8_t u[kPackRows][256];
  for (int i = 0; i < kPackRows; ++i) elements(blk[i], q, bs, u[i]);
  uint8_t* body = out + body_offset(q);
  if (q == Q5_0) {
    for (int k = 0; k < 8; ++k) {
      uint64_t m = 0;
      for (int i = 0; i < kPackRows; ++i)
        for (int j = 0; j < 4; ++j) m |= static_cast<uint64_t>(u[i][4 * k + j] >> 4) << (4 * i + j);
      std::memcpy(out + 32 + 8 * k, &m, 8);
    }
  }
  const int64_t sub_bytes = q == Q6_K ? 384 : 256;
  for (int s = 0; s < bs / 32; ++s) {
    uint8_t* sb = body + sub_bytes * s;
    for (int t = 0; t < 4; ++t)
      for (int i = 0; i < kPackRows; ++i)
        for (int j = 0; j < 4; ++j)
          sb[64 * t + 4 * i + j] =
              static_cast<uint8_t>((u[i][32 * s + 4 * t + j] & 0x0F) | ((u[i][32 * s + 16 + 4 * t + j] & 0x0F) << 4));
    if (q != Q6_K) continue;
    for (int t = 0; t < 2; ++t)
      for (int i = 0; i < kPackRows; ++i)
        for (int j = 0; j < 4; ++j) {
          const int quads[4] = {2 * t, 2 * t + 1, 2 * t + 4, 2 * t + 5};
          uint8_t h = 0;
          for (int p = 0; p < 4; ++p) h |= static_cast<uint8_t>((u[i][32 * s + 4 * quads[p] + j] >> 4) << (2 * p));
          sb[256 + 64 * t + 4 * i + j] = h;
        }
  }
}

void row_values(const uint8_t* grp, int64_t q, int bs, int i, uint8_t* u);

// row i of a packed group -> its file-order block (exact inverse of pack_group)
void unpack_block(const uint8_t* grp, int64_t q, int bs, int i, uint8_t* out) {
  if (q == Q8_0) {  // 4-byte moves (the prefill path unpacks whole weights)
    std::memcpy(out, grp + 2 * i, 2);
    for (int k = 0; k < 8; ++k) {
      uint32_t v;
      std::memcpy(&v, grp + 32 + 64 * k + 4 * i, 4);
      v ^= 0x80808080u;
      std::memcpy(out + 2 + 4 * k, &v, 4);
    }
    return;
  }
  int first, last;
  header_range(q, first, last);
  for (int c = first; c < last; ++c) out[c] = grp[header_pos(q, c, i)];
  uint8_t u[256];
  row_values(grp, q, bs, i, u);
  store_elements(u, q, out);
}

}  // namespace

// The packed copy's buffer: on Linux its own anonymous mapping with 2 MiB pages asked for before the first write
// (THP "madvise" mode, the default of many distributions, gives anonymous memory 4 KiB pages otherwise, and malloc
// reuses already-faulted heap pages for tensors under its mmap threshold). A decode step streams every packed
// weight once; with 4 KiB pages that is ~250 000 TLB misses per GB, each a two-level page walk in a VM. Measured on
// the 1.5 B's gate projections at 2 threads: 22.4 -> 24.3 GB/s (BENCHMARKS.md). The mapping is 2 MiB larger than the
// data so that the data can start on a 2 MiB boundary; the slack is never written, so it takes no memory.
torch::Tensor packed_buffer(int64_t rows, int64_t cols) {
  const size_t n = static_cast<size_t>(rows * cols);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t{2} << 20;
  if (n >= kHuge) {
    const size_t len = n + kHuge;
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(base);
      auto* data = reinterpret_cast<uint8_t*>((a + kHuge - 1) & ~(kHuge - 1));
      madvise(data, n & ~(kHuge - 1), MADV_HUGEPAGE);  // best effort: an error leaves 4 KiB pages
      return torch::from_blob(data, {rows, cols}, [base, len](void*) { munmap(base, len); },
                              torch::TensorOptions().dtype(torch::kUInt8));
    }
  }
#endif
  return torch::empty({rows, cols}, torch::TensorOptions().dtype(torch::kUInt8));
}

bool packable(int64_t q) { return q == Q4_0 || q == Q5_0 || q == Q8_0 || q == Q4_K || q == Q6_K; }

void check_packed(const torch::Tensor& t, int64_t q, int64_t K, int64_t& bs, int64_t& ts) {
  TORCH_CHECK(packable(q), "gguf_kernels: GGML type ", q, " has no packed layout");
  check_raw(t, q, K, bs, ts);
  TORCH_CHECK(t.is_contiguous() && t.size(0) % kPackRows == 0, "packed weights need contiguous rows, a multiple of 16");
}

torch::Tensor pack(const torch::Tensor& raw, int64_t q, int64_t K) {
  auto out = torch::empty_like(raw, torch::MemoryFormat::Contiguous);
  pack_out(raw, q, K, out);
  return out;
}

// pack into `out` (contiguous, raw's shape): a chunk of rows straight into its place in the whole packed weight
void pack_out(const torch::Tensor& raw, int64_t q, int64_t K, torch::Tensor& out) {
  int64_t bs, ts;
  check_packed(raw, q, K, bs, ts);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == raw.sizes() && out.scalar_type() == torch::kUInt8,
              "pack_out: out must be a contiguous uint8 tensor of raw's shape");
  const int64_t N = raw.size(0), nb = K / bs, rs = raw.stride(0);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  parallel_chunks(N / kPackRows, 16, [&](int64_t g0, int64_t g1) {
    const uint8_t* blk[kPackRows];
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < nb; ++b) {
        for (int i = 0; i < kPackRows; ++i) blk[i] = src + (kPackRows * g + i) * rs + ts * b;
        pack_group(blk, q, static_cast<int>(bs), dst + (g * nb + b) * kPackRows * ts);
      }
  });
}

// rows `ids` (int64, any order) of a packed weight in file order: [len(ids), row bytes] uint8
torch::Tensor unpack_rows(const torch::Tensor& packed, int64_t q, int64_t K, const torch::Tensor& ids) {
  int64_t bs, ts;
  check_packed(packed, q, K, bs, ts);
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1, "ids must be a 1-D int64 tensor");
  const auto idc = ids.contiguous();
  const int64_t n = idc.size(0), N = packed.size(0), nb = K / bs;
  auto out = torch::empty({n, packed.size(1)}, packed.options());
  const int64_t* ip = idc.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < N, "row id ", ip[j], " out of range [0, ", N, ")");
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  parallel_chunks(n, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t g = ip[j] / kPackRows;
      for (int64_t b = 0; b < nb; ++b)
        unpack_block(src + (g * nb + b) * kPackRows * ts, q, static_cast<int>(bs), static_cast<int>(ip[j] % kPackRows),
                     dst + j * nb * ts + b * ts);
    }
  });
  return out;
}

}  // namespace autoglm

namespace autoglm {
namespace {

inline uint32_t dword(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// row i of a packed group: its bs stored integers u (4 at a time), file-order element order
void row_values(const uint8_t* grp, int64_t q, int bs, int i, uint8_t* u) {
  if (q == Q8_0) {
    for (int k = 0; k < 8; ++k) std::memcpy(u + 4 * k, grp + 32 + 64 * k + 4 * i, 4);  // stored as q + 128
    return;
  }
  const uint8_t* body = grp + body_offset(q);
  const int64_t sub_bytes = q == Q6_K ? 384 : 256;
  for (int s = 0; s < bs / 32; ++s) {
    const uint8_t* sb = body + sub_bytes * s;
    uint32_t w[8];
    for (int t = 0; t < 4; ++t) {
      const uint32_t n = dword(sb + 64 * t + 4 * i);
      w[t] = n & 0x0F0F0F0Fu;
      w[t + 4] = (n >> 4) & 0x0F0F0F0Fu;
    }
    if (q == Q5_0) {
      for (int k = 0; k < 8; ++k) {
        uint64_t m;
        std::memcpy(&m, grp + 32 + 8 * k, 8);
        const uint32_t bits = static_cast<uint32_t>((m >> (4 * i)) & 0xF);
        w[k] |= ((bits * 0x00204081u) & 0x01010101u) << 4;  // bit j -> bit 4 of byte j
      }
    } else if (q == Q6_K) {
      for (int k = 0; k < 8; ++k) {
        const int t = (k % 4) / 2, p = k % 2 + 2 * (k / 4);
        w[k] |= ((dword(sb + 256 + 64 * t + 4 * i) >> (2 * p)) & 0x03030303u) << 4;
      }
    }
    std::memcpy(u + 32 * s, w, 32);
  }
}

// row i of a packed group -> bs floats, the same arithmetic as ggml's dequantize_row_* (so bit-exact)
void deq_packed_row(const uint8_t* grp, int64_t q, int bs, int i, float* __restrict y) {
  if (q == Q4_K || q == Q8_0) {  // back to the file's block, then ggml's code (measured faster for these two)
    uint8_t blk[144];
    unpack_block(grp, q, bs, i, blk);
    deq_fn(q)(blk, y);
    return;
  }
  uint8_t u[256];
  row_values(grp, q, bs, i, u);
  const float d = h2f(grp + 2 * i);
  switch (q) {
    case Q4_0:
      for (int e = 0; e < 32; ++e) y[e] = static_cast<float>(static_cast<int>(u[e]) - 8) * d;
      return;
    case Q5_0:
      for (int e = 0; e < 32; ++e) y[e] = static_cast<float>(static_cast<int>(u[e]) - 16) * d;
      return;
    default:  // Q6_K
      for (int s = 0; s < 16; ++s) {
        const float ds = d * static_cast<int8_t>(grp[32 + 16 * s + i]);
        for (int l = 0; l < 16; ++l) y[16 * s + l] = ds * static_cast<float>(static_cast<int>(u[16 * s + l]) - 32);
      }
  }
}

}  // namespace

// rows row0.. of a packed weight (row0 % 16 == 0) -> out [rows, K] float32 or bfloat16 (contiguous), bit-exact with
// dequantizing the file's blocks (bfloat16: rounded to nearest even); the prefill path's slabs
void dequantize_packed_out(const torch::Tensor& packed, int64_t q, int64_t K, int64_t row0, torch::Tensor& out) {
  int64_t bs, ts;
  check_packed(packed, q, K, bs, ts);
  const int64_t rows = out.size(0), nb = K / bs;
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == torch::kFloat32) && out.is_contiguous() && out.dim() == 2 &&
                  out.size(1) == K, "out must be a contiguous float32/bfloat16 [rows, ", K, "] tensor");
  TORCH_CHECK(row0 % kPackRows == 0 && row0 >= 0 && row0 + rows <= packed.size(0), "bad row range");
  const uint8_t* src = packed.data_ptr<uint8_t>();
  parallel_chunks((rows + kPackRows - 1) / kPackRows, 4, [&](int64_t g0, int64_t g1) {
    std::vector<float> tmp(bf16 ? K : 0);
    for (int64_t gl = g0; gl < g1; ++gl) {
      const int64_t g = row0 / kPackRows + gl;
      for (int i = 0; i < kPackRows && gl * kPackRows + i < rows; ++i) {
        const int64_t r = gl * kPackRows + i;
        float* y = bf16 ? tmp.data() : out.data_ptr<float>() + r * K;
        for (int64_t b = 0; b < nb; ++b)
          deq_packed_row(src + (g * nb + b) * kPackRows * ts, q, static_cast<int>(bs), i, y + b * bs);
        if (bf16) {
          c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + r * K;
          for (int64_t e = 0; e < K; ++e) o[e] = c10::BFloat16(tmp[e]);
        }
      }
    }
  });
}

}  // namespace autoglm
