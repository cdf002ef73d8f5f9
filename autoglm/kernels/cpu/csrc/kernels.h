// Shared declarations of the torch side of the CPU kernels (autoglm/kernels/cpu/variants.py builds every .cpp here
// and in core/ into one extension per ISA variant; core/ is torch-free): GGML block geometry, per-32 int8 activations, and the functions module.cpp exposes to Python.
#pragma once

// torch/types.h, not torch/extension.h: the kernel sources need tensors, not pybind11 (3x cheaper to compile per
// source); module.cpp alone includes the bindings.
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "core/common.h"  // block geometry, fp16, activations, dequant, the core GEMV

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__)
#define AUTOGLM_VNNI 1
#include <immintrin.h>
#else
#define AUTOGLM_VNNI 0
#endif
// the packed layout's kernel (gemv_packed.cpp): AVX512-VNNI tiles, else AVX2 ones (packed_tiles_avx2.h)
#if AUTOGLM_VNNI || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define AUTOGLM_PACKED 1
#include <immintrin.h>
#else
#define AUTOGLM_PACKED 0
#endif

namespace autoglm {

// f(i0, i1) over [0, n) in chunks of `grain`, taken by each thread from a shared counter: a slower core (a hybrid
// CPU's E-core, a VM sibling that is busy) runs fewer chunks instead of holding the others at the region's end, as
// at::parallel_for's equal static shares do (llama.cpp's mul_mat hands out chunks the same way). Callers' work per
// index must not depend on which thread runs it (every kernel here: the split never changes a result).
template <class F>
void parallel_chunks(int64_t n, int64_t grain, const F& f) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t nth = std::min<int64_t>(at::get_num_threads(), chunks);
  if (nth <= 1 || at::in_parallel_region()) {
    if (n > 0) f(int64_t{0}, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      f(c * grain, std::min(n, (c + 1) * grain));
  });
}

// f(i0, i1) over [0, n) in guided chunks: each thread takes max(grain, remaining / (4 threads)) indices from a shared
// counter, so chunks start long (each a long sequential weight stream) and end short (the region's last chunk, where
// the other threads wait, is ~1/(4 threads) of what a fixed 1/(8 threads) grain left). Same contract as
// parallel_chunks: the work per index must not depend on which thread runs it.
template <class F>
void parallel_guided(int64_t n, int64_t grain, const F& f) {
  grain = std::max<int64_t>(1, grain);
  const int64_t nth = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (nth <= 1 || at::in_parallel_region()) {
    if (n > 0) f(int64_t{0}, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    int64_t c = next.load(std::memory_order_relaxed);
    while (c < n) {
      const int64_t e = std::min(n, c + std::max(grain, (n - c) / (4 * nth)));
      if (next.compare_exchange_weak(c, e, std::memory_order_relaxed)) {
        f(c, e);
        c = next.load(std::memory_order_relaxed);
      }
    }
  });
}

inline void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), name,
              " must be a contiguous CPU float32 tensor");
}

// raw [N, row bytes] uint8 of type q with K columns; sets the block geometry
void check_raw(const torch::Tensor& raw, int64_t q, int64_t K, int64_t& bs, int64_t& ts);

// packed weights (pack.cpp): 16 rows interleaved per block for gemv_packed.cpp
constexpr int64_t kPackRows = 16;
bool packable(int64_t q);
void check_packed(const torch::Tensor& t, int64_t q, int64_t K, int64_t& bs, int64_t& ts);

// ---- the extension's functions (module.cpp) ----
bool has_vnni();
bool has_packed();
std::string isa();
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& raw, int64_t q, bool exact_activations);
// Q4_K/Q5_K/Q6_K decode on q8_K activations (core/kquant_q8k.h)
torch::Tensor gemv_q8k(const torch::Tensor& x, const torch::Tensor& raw, int64_t q);
void dequantize_out(const torch::Tensor& raw, int64_t q, int64_t K, torch::Tensor& out);
torch::Tensor dequantize(const torch::Tensor& raw, int64_t q, int64_t K, bool bf16);
torch::Tensor pack(const torch::Tensor& raw, int64_t q, int64_t K);
void pack_out(const torch::Tensor& raw, int64_t q, int64_t K, torch::Tensor& out);
// an uninitialized uint8 [rows, cols] for a packed weight, on 2 MiB pages where Linux gives them (pack.cpp)
torch::Tensor packed_buffer(int64_t rows, int64_t cols);
torch::Tensor unpack_rows(const torch::Tensor& packed, int64_t q, int64_t K, const torch::Tensor& ids);
void dequantize_packed_out(const torch::Tensor& packed, int64_t q, int64_t K, int64_t row0, torch::Tensor& out);
torch::Tensor gemv_packed(const torch::Tensor& x, const torch::Tensor& packed, int64_t q);
// several packed weights on one x in one parallel region (same activations: Q4_K/Q6_K, or one block-32 type)
std::vector<torch::Tensor> gemv_packed_many(const torch::Tensor& x, const std::vector<torch::Tensor>& packed,
                                            const std::vector<int64_t>& qs);
torch::Tensor quantize_activations(const torch::Tensor& x, bool q8k);
torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, double offset);
torch::Tensor silu_mul_(torch::Tensor& g, const torch::Tensor& u);
std::tuple<torch::Tensor, c10::optional<torch::Tensor>> add_rms_norm(
    const torch::Tensor& h, const torch::Tensor& y, const torch::Tensor& w1, const c10::optional<torch::Tensor>& w2,
    double eps, double offset);
torch::Tensor norm_rope(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, double offset,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t R, bool interleaved);
torch::Tensor attend_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale);
torch::Tensor attend_decode_paged(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                  const torch::Tensor& tables, const torch::Tensor& lo, const torch::Tensor& hi,
                                  double scale);
// a stack of LLaMA-family decoder layers for a decode step (decode_layer.cpp)
torch::Tensor decode_layers(const torch::Tensor& h, const std::vector<torch::Tensor>& weights,
                            const std::vector<int64_t>& kinds, const std::vector<int64_t>& qtypes,
                            const std::vector<c10::optional<torch::Tensor>>& biases,
                            const std::vector<torch::Tensor>& in_norms, const std::vector<torch::Tensor>& post_norms,
                            double eps, const std::vector<c10::optional<torch::Tensor>>& q_norms,
                            const std::vector<c10::optional<torch::Tensor>>& k_norms, double qk_eps,
                            const torch::Tensor& cos, const torch::Tensor& sin, int64_t rotary_dim, bool interleaved,
                            const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                            const torch::Tensor& slots, const torch::Tensor& tables, const torch::Tensor& lo,
                            const torch::Tensor& hi, double scale, int64_t heads, int64_t kv_heads, int64_t head_dim);

}  // namespace autoglm
