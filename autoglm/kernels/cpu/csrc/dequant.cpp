// Dequantization of raw GGUF blocks into tensors (the per-block code is core/quant.cpp), and the activation
// quantizer exposed for tests.
#include "kernels.h"

namespace autoglm {

void check_raw(const torch::Tensor& raw, int64_t q, int64_t K, int64_t& bs, int64_t& ts) {
  TORCH_CHECK(layout(q, bs, ts), "gguf_kernels: unsupported GGML type id ", q);
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == torch::kUInt8 && raw.dim() == 2, "raw must be CPU uint8 2-D");
  TORCH_CHECK(K % bs == 0 && raw.size(1) == K / bs * ts, "raw row bytes ", raw.size(1), " do not match ", K, " columns");
  TORCH_CHECK(raw.stride(1) == 1, "raw rows must be contiguous");
}

void dequantize_out(const torch::Tensor& raw, int64_t q, int64_t K, torch::Tensor& out) {
  const int64_t N = raw.size(0);
  int64_t bs, ts;
  check_raw(raw, q, K, bs, ts);
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == torch::kFloat32) && out.is_contiguous() && out.size(0) == N &&
                  out.size(1) == K, "out must be a contiguous float32/bfloat16 [", N, ", ", K, "] tensor");
  const int64_t nb = K / bs, rs = raw.stride(0);
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  const DeqFn f = deq_fn(q);
  parallel_chunks(N, 4, [&](int64_t n0, int64_t n1) {
    std::vector<float> tmp(bf16 ? K : 0);
    for (int64_t n = n0; n < n1; ++n) {
      if (!bf16) {
        deq_row(f, wp + n * rs, nb, bs, ts, out.data_ptr<float>() + n * K);
        continue;
      }
      deq_row(f, wp + n * rs, nb, bs, ts, tmp.data());
      c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + n * K;
      for (int64_t i = 0; i < K; ++i) o[i] = c10::BFloat16(tmp[i]);
    }
  });
}

torch::Tensor dequantize(const torch::Tensor& raw, int64_t q, int64_t K, bool bf16) {
  auto out = torch::empty({raw.size(0), K}, raw.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  dequantize_out(raw, q, K, out);
  return out;
}

// x [M, K] float32 -> x_q as float32 (d * q): the activations the int8 path multiplies by (tests, error bounds);
// q8k: llama.cpp's q8_K per 256 (the K-quant packed tiles), else per 32
torch::Tensor quantize_activations(const torch::Tensor& x, bool q8k) {
  const int64_t blk = q8k ? 256 : 32;
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) % blk == 0,
              "x must be float32 [M, K], K % ", blk, " == 0");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int8_t> q(K);
  std::vector<float> d(K / 32), s(K / 32);
  std::vector<int32_t> n4(K / 4);
  std::vector<int16_t> b16(K / 16);
  auto out = torch::empty_like(x);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.data_ptr<float>() + m * K;
    if (q8k) {
      for (int64_t b = 0; b < K / 256; ++b) quantize_q8k(xm + 256 * b, q.data() + 256 * b, d[b], b16.data() + 16 * b);
    } else {
      quantize_act_row(xm, K, q.data(), d.data(), s.data(), n4.data());
    }
    float* o = out.data_ptr<float>() + m * K;
    for (int64_t i = 0; i < K; ++i) o[i] = d[i / blk] * q[i];
  }
  return out;
}

}  // namespace autoglm
