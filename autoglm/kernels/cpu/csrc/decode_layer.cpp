// LLaMA-family decoder layers of a decode step (one float32 row per sequence), the whole stack in a single call.
//
// Each layer runs the same kernels and ATen ops, in the same order, as LlamaDecoderLayer.forward does through the
// Python layers with the CPU kernels and the fused attention backend, so the result is bitwise the same
// (tests/unit/test_decode_layers.py). What it removes is the Python between them: ~25 dispatched calls per layer,
// which cost ~100 us a layer in a real decode step (the weights streaming through evict the interpreter from cache).
#include "kernels.h"

namespace autoglm {

namespace {

// how a linear's weight is multiplied (CpuKernels.gemv_kind): the packed tiles, the file-order kernel with per-32
// activations, or the file-order q8_K kernel
enum GemvKind : int64_t { kPacked = 0, kFileOrder = 1, kFileOrderQ8K = 2 };

// whether two types take the same packed-kernel activations (gemv_packed_many)
bool same_activations(int64_t a, int64_t b) {
  const auto q8k = [](int64_t q) { return q == Q4_K || q == Q6_K; };
  return q8k(a) ? q8k(b) : a == b;
}

// The small ops between the GEMVs as plain loops over float32 rows: each ATen op there cost ~5 us of cache misses
// (the weights streaming through evict its dispatch code and data), against well under 1 us of arithmetic. One
// rounding per element, as ATen's add_, so the result is bitwise theirs.

// y [rows, n] += b [n] (a bias, or a whole same-shape tensor when b has y's size)
void add_into(torch::Tensor& y, const torch::Tensor& b) {
  TORCH_CHECK(y.is_contiguous() && b.is_contiguous() && b.scalar_type() == torch::kFloat32 &&
                  (b.numel() == y.size(-1) || b.numel() == y.numel()),
              "decode_layer: add of mismatched operands");
  float* yp = y.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const int64_t n = b.numel();
  for (int64_t r = 0; r < y.numel(); r += n)
    for (int64_t i = 0; i < n; ++i) yp[r + i] += bp[i];
}

// this step's K or V rows x [B, KV, D] float32 into the cache [blocks, block_size, KV, D] at slots [B], converted
// to the cache dtype (c10's round-to-nearest-even, as x.to(dtype)); the modules' index_copy_ of the same values
template <typename T>
void write_rows_as(const torch::Tensor& cache, const int64_t* slots, int64_t B, const float* x, int64_t row) {
  T* c = cache.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < row; ++i) c[slots[b] * row + i] = static_cast<T>(x[b * row + i]);
}

void write_rows(const torch::Tensor& cache, const torch::Tensor& slots, const torch::Tensor& x) {
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4 && x.is_contiguous() && slots.scalar_type() == torch::kLong &&
                  slots.is_contiguous() && slots.numel() == x.size(0),
              "decode_layer: cache rows and slots do not match");
  const int64_t B = x.size(0), row = cache.size(2) * cache.size(3), n = cache.size(0) * cache.size(1);
  TORCH_CHECK(x.numel() == B * row, "decode_layer: K/V rows of ", x.numel() / std::max<int64_t>(B, 1),
              " values for a cache row of ", row);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(0 <= sp[b] && sp[b] < n, "decode_layer: cache slot ", sp[b], " out of range");
  const float* xp = x.data_ptr<float>();
  switch (cache.scalar_type()) {
    case torch::kFloat32:
      for (int64_t b = 0; b < B; ++b) std::memcpy(cache.data_ptr<float>() + sp[b] * row, xp + b * row, row * 4);
      break;
    case torch::kFloat16:
      write_rows_as<c10::Half>(cache, sp, B, xp, row);
      break;
    case torch::kBFloat16:
      write_rows_as<c10::BFloat16>(cache, sp, B, xp, row);
      break;
    default:
      TORCH_CHECK(false, "decode_layer: unsupported cache dtype ", cache.scalar_type());
  }
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t kind, int64_t q,
                     const c10::optional<torch::Tensor>& bias) {
  torch::Tensor y;
  switch (kind) {
    case kPacked:
      y = gemv_packed(x, w, q);
      break;
    case kFileOrder:
      y = gemv(x, w, q, false);
      break;
    case kFileOrderQ8K:
      y = gemv_q8k(x, w, q);
      break;
    default:
      TORCH_CHECK(false, "decode_layer: unknown gemv kind ", kind);
  }
  if (bias.has_value()) add_into(y, *bias);  // as GGUFLinear.forward: in place on the kernel's output
  return y;
}

// One layer: h [B, D] -> its output [B, D]. `w`, `kinds`, `qtypes`, `biases`: the layer's 7 linears in the order
// q, k, v, o, gate, up, down. Writes this step's K/V at `slots` of the layer's cache.
torch::Tensor layer_step(const torch::Tensor& h, const torch::Tensor* w, const int64_t* kinds, const int64_t* qtypes,
                         const c10::optional<torch::Tensor>* biases, const torch::Tensor& in_norm,
                         const torch::Tensor& post_norm, double eps, const c10::optional<torch::Tensor>& q_norm,
                         const c10::optional<torch::Tensor>& k_norm, double qk_eps, const torch::Tensor& cos,
                         const torch::Tensor& sin, int64_t rotary_dim, bool interleaved, const torch::Tensor& k_cache,
                         const torch::Tensor& v_cache, const torch::Tensor& slots, const torch::Tensor& tables,
                         const torch::Tensor& lo, const torch::Tensor& hi, double scale, int64_t heads,
                         int64_t kv_heads, int64_t head_dim) {
  const int64_t B = h.size(0);
  auto lin = [&](const torch::Tensor& x, int i) { return linear(x, w[i], kinds[i], qtypes[i], biases[i]); };
  // linears i0..i0+n-1 of one input: one parallel region where they are packed and share activations
  auto lins = [&](const torch::Tensor& x, int i0, int n) {
    bool together = true;
    for (int i = i0; i < i0 + n; ++i)
      together = together && kinds[i] == kPacked && same_activations(qtypes[i0], qtypes[i]);
    std::vector<torch::Tensor> ys;
    if (!together) {
      for (int i = i0; i < i0 + n; ++i) ys.push_back(lin(x, i));
      return ys;
    }
    ys = gemv_packed_many(x, std::vector<torch::Tensor>(w + i0, w + i0 + n),
                          std::vector<int64_t>(qtypes + i0, qtypes + i0 + n));
    for (int i = 0; i < n; ++i)
      if (biases[i0 + i].has_value()) add_into(ys[i], *biases[i0 + i]);
    return ys;
  };

  const torch::Tensor x = rms_norm(h, in_norm, eps, 0.0);
  const auto qkv = lins(x, 0, 3);
  auto q = qkv[0].view({B, heads, head_dim});
  q = norm_rope(q, q_norm, qk_eps, 0.0, cos, sin, rotary_dim, interleaved);
  auto k = qkv[1].view({B, kv_heads, head_dim});
  k = norm_rope(k, k_norm, qk_eps, 0.0, cos, sin, rotary_dim, interleaved);
  const auto v = qkv[2].view({B, kv_heads, head_dim});
  write_rows(k_cache, slots, k);
  write_rows(v_cache, slots, v);
  const auto o = attend_decode_paged(q, k_cache, v_cache, tables, lo, hi, scale);
  // the residual adds and silu * up in place on the kernels' fresh outputs: bitwise the modules' h + y (a float add
  // commutes) and LlamaMLP's kernels.silu_mul (the same silu_mul_), without a tensor allocated per op
  auto h1 = lin(o.reshape({B, heads * head_dim}), 3);
  add_into(h1, h);

  const torch::Tensor x2 = rms_norm(h1, post_norm, eps, 0.0);
  auto gate_up = lins(x2, 4, 2);
  silu_mul_(gate_up[0], gate_up[1]);
  auto out = lin(gate_up[0], 6);
  add_into(out, h1);
  return out;
}

}  // namespace

// The whole stack of L layers: h [B, D] -> the last layer's output. weights/kinds/qtypes/biases: 7 per layer, flat
// (layer l's linear i at 7 l + i); norms and caches one per layer (q_norms/k_norms: Qwen3's per-head norms, or None).
// cos/sin: the step's whole-head rope tables [B, 1, hd]; slots [B]: where this step's K/V go; tables/lo/hi: the
// spans each sequence's query sees (CpuFusedBackend._spans), the same for every layer.
torch::Tensor decode_layers(const torch::Tensor& h, const std::vector<torch::Tensor>& weights,
                            const std::vector<int64_t>& kinds, const std::vector<int64_t>& qtypes,
                            const std::vector<c10::optional<torch::Tensor>>& biases,
                            const std::vector<torch::Tensor>& in_norms, const std::vector<torch::Tensor>& post_norms,
                            double eps, const std::vector<c10::optional<torch::Tensor>>& q_norms,
                            const std::vector<c10::optional<torch::Tensor>>& k_norms, double qk_eps,
                            const torch::Tensor& cos, const torch::Tensor& sin, int64_t rotary_dim, bool interleaved,
                            const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                            const torch::Tensor& slots, const torch::Tensor& tables, const torch::Tensor& lo,
                            const torch::Tensor& hi, double scale, int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const size_t L = in_norms.size();
  TORCH_CHECK(weights.size() == 7 * L && kinds.size() == 7 * L && qtypes.size() == 7 * L && biases.size() == 7 * L,
              "decode_layers: 7 linears per layer (q, k, v, o, gate, up, down)");
  TORCH_CHECK(post_norms.size() == L && q_norms.size() == L && k_norms.size() == L && k_caches.size() == L &&
                  v_caches.size() == L,
              "decode_layers: one norm pair and one cache pair per layer");
  check_rows(h, "h");
  TORCH_CHECK(h.dim() == 2, "h must be [B, D]");
  torch::Tensor x = h;
  for (size_t l = 0; l < L; ++l) {
    const size_t i = 7 * l;
    x = layer_step(x, &weights[i], &kinds[i], &qtypes[i], &biases[i], in_norms[l], post_norms[l], eps, q_norms[l],
                   k_norms[l], qk_eps, cos, sin, rotary_dim, interleaved, k_caches[l], v_caches[l], slots, tables,
                   lo, hi, scale, heads, kv_heads, head_dim);
  }
  return x;
}

}  // namespace autoglm
