// Decode matmul on raw GGUF blocks in file order: y[M, N] = x[M, K] @ W[N, K].T for small M (one activation row per
// sequence). Activations are quantized to int8 per block of 32 (float32 scale; quantize_act_row) and dotted with the
// weight blocks by the torch-free core (core/gemv_core.cpp, this variant's ISA, bitwise equal across ISAs); the
// result equals F.linear(x_q, W) up to float32 summation order, where x_q = scale * round(x / scale). With
// exact_activations a float path dequantizes one weight row into L1 and keeps float32 activations. Weights
// repacked at load (pack.cpp) use gemv_packed.cpp instead.
#include "kernels.h"

namespace autoglm {
namespace {

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
bool has_packed() { return AUTOGLM_PACKED != 0; }

std::string isa() { return isa_name(); }

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
  if (!exact_activations && gemv_supported(q)) {
    std::vector<int8_t> aq(M * K);
    std::vector<float> ad(M * K / 32), as(M * K / 32);
    std::vector<int32_t> an(M * K / 4);
    std::vector<ActQ> acts(M);
    for (int64_t m = 0; m < M; ++m) {
      quantize_act_row(xp + m * K, K, aq.data() + m * K, ad.data() + m * K / 32, as.data() + m * K / 32,
                       an.data() + m * K / 4);
      acts[m] = {aq.data() + m * K, ad.data() + m * K / 32, as.data() + m * K / 32, an.data() + m * K / 4};
    }
    parallel_chunks(N, grain, [&](int64_t n0, int64_t n1) {
      gemv_rows(q, wp, rs, nb, n0, n1, acts.data(), M, yp, N);
    });
    return y;
  }
  const DeqFn f = deq_fn(q);
  parallel_chunks(N, grain, [&](int64_t n0, int64_t n1) {
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

// Hook of the q8_K kernel (issue 15): activations quantized once per call, weight rows split over threads, groups
// of up to KQ_MAX_M activation rows (each output row is independent of the grouping).
#include "core/kquant_q8k.h"

namespace autoglm {

torch::Tensor gemv_q8k(const torch::Tensor& x, const torch::Tensor& raw, int64_t q) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be float32 [M, K]");
  TORCH_CHECK(q == Q4_K || q == Q5_K || q == Q6_K, "gemv_q8k: Q4_K/Q5_K/Q6_K only, got type ", q);
  const int64_t M = x.size(0), K = x.size(1), N = raw.size(0);
  int64_t bs, ts;
  check_raw(raw, q, K, bs, ts);
  const int64_t nsb = K / 256, rs = raw.stride(0);
  std::vector<kq::BlockQ8K> xq(M * nsb);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) kq::quantize_row_q8k(xp + m * K, xq.data() + m * nsb, K);
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(8, N / (8 * at::get_num_threads()) + 1);
  parallel_chunks(N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kq::KQ_MAX_M) {
      const int mm = static_cast<int>(std::min<int64_t>(kq::KQ_MAX_M, M - m0));
      kq::gemv_q8k(q, wp, rs, nsb, xq.data() + m0 * nsb, mm, yp + m0 * N, N, n0, n1);
    }
  });
  return y;
}

}  // namespace autoglm
