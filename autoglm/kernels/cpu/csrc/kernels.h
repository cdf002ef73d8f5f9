// Shared declarations of the JIT-built CPU kernels (autoglm/kernels/cpu/build.py builds every .cpp here into one
// extension): GGML block geometry, per-32 int8 activations, and the functions module.cpp exposes to Python.
#pragma once

// torch/types.h, not torch/extension.h: the kernel sources need tensors, not pybind11 (3x cheaper to compile per
// source); module.cpp alone includes the bindings.
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__)
#define AUTOGLM_VNNI 1
#include <immintrin.h>
#else
#define AUTOGLM_VNNI 0
#endif

namespace autoglm {

// GGML type ids (gguf.GGMLQuantizationType)
enum QType : int64_t { Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// block geometry: (elements, bytes)
inline bool layout(int64_t q, int64_t& bs, int64_t& ts) {
  switch (q) {
    case Q4_0: bs = 32; ts = 18; return true;
    case Q5_0: bs = 32; ts = 22; return true;
    case Q8_0: bs = 32; ts = 34; return true;
    case Q4_K: bs = 256; ts = 144; return true;
    case Q5_K: bs = 256; ts = 176; return true;
    case Q6_K: bs = 256; ts = 210; return true;
    default: return false;
  }
}

// 6-bit (scale, min) pair j of a Q4_K / Q5_K super-block (ggml get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

inline void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), name,
              " must be a contiguous CPU float32 tensor");
}

// one weight row (nb blocks of bs elements, ts bytes each) -> float32, bit-exact with ggml
using DeqFn = void (*)(const uint8_t*, float*);
DeqFn deq_fn(int64_t q);
void deq_row(DeqFn f, const uint8_t* row, int64_t nb, int64_t bs, int64_t ts, float* y);
// raw [N, row bytes] uint8 of type q with K columns; sets the block geometry
void check_raw(const torch::Tensor& raw, int64_t q, int64_t K, int64_t& bs, int64_t& ts);

// packed weights (pack.cpp): 16 rows interleaved per block for gemv_packed.cpp
constexpr int64_t kPackRows = 16;
bool packable(int64_t q);
void check_packed(const torch::Tensor& t, int64_t q, int64_t K, int64_t& bs, int64_t& ts);

// activations quantized per 32: x ~= d[b] * q[32 b + i], d = max|x_block| / 127; s[b] = d * sum(q of block b);
// ns4[j] = -(sum of q[4 j .. 4 j + 3]) (one vpdpbusd lane)
void quantize_act_row(const float* x, int64_t K, int8_t* q, float* d, float* s, int32_t* ns4);

// ---- the extension's functions (module.cpp) ----
bool has_vnni();
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& raw, int64_t q, bool exact_activations);
void dequantize_out(const torch::Tensor& raw, int64_t q, int64_t K, torch::Tensor& out);
torch::Tensor dequantize(const torch::Tensor& raw, int64_t q, int64_t K, bool bf16);
torch::Tensor pack(const torch::Tensor& raw, int64_t q, int64_t K);
torch::Tensor unpack_rows(const torch::Tensor& packed, int64_t q, int64_t K, const torch::Tensor& ids);
void dequantize_packed_out(const torch::Tensor& packed, int64_t q, int64_t K, int64_t row0, torch::Tensor& out);
torch::Tensor gemv_packed(const torch::Tensor& x, const torch::Tensor& packed, int64_t q);
torch::Tensor quantize_activations(const torch::Tensor& x);
torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, double offset);
std::tuple<torch::Tensor, c10::optional<torch::Tensor>> add_rms_norm(
    const torch::Tensor& h, const torch::Tensor& y, const torch::Tensor& w1, const c10::optional<torch::Tensor>& w2,
    double eps, double offset);
torch::Tensor norm_rope(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, double offset,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t R, bool interleaved);
torch::Tensor attend_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale);
torch::Tensor attend_decode_paged(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                  const torch::Tensor& tables, const torch::Tensor& lo, const torch::Tensor& hi,
                                  double scale);

}  // namespace autoglm
