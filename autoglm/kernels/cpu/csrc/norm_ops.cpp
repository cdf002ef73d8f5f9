#include "kernels.h"
#include "vec_exp.h"

namespace autoglm {

// ---- decode-path helpers (float32, CPU): fused small ops that cost more in dispatch than in arithmetic ------------
// Used by autoglm/layers (norm, rotary, attention) when the extension is installed; each equals its torch
// composition up to float32 summation order (tests/unit/test_decode_ops.py).

namespace {

// sum of squares with 16 independent lanes (fp-contract is off and there is no -ffast-math: the lanes are what
// lets the compiler vectorize the reduction)
inline float sumsq(const float* x, int64_t D) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= D; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < D; ++i) s += x[i] * x[i];
  return s;
}

// out = x * rsqrt(mean(x^2) + eps) * (offset + w); w == nullptr: no scale
inline void norm_row(const float* x, const float* w, float offset, float eps, int64_t D, float* out) {
  const float r = 1.f / std::sqrt(sumsq(x, D) / static_cast<float>(D) + eps);
  if (w == nullptr) {
    for (int64_t i = 0; i < D; ++i) out[i] = x[i] * r;
  } else {
    for (int64_t i = 0; i < D; ++i) out[i] = x[i] * r * (offset + w[i]);
  }
}

const float* weight_ptr(const c10::optional<torch::Tensor>& w, int64_t D) {
  if (!w.has_value()) return nullptr;
  check_rows(*w, "norm weight");
  TORCH_CHECK(w->numel() == D, "norm weight has ", w->numel(), " elements for rows of ", D);
  return w->data_ptr<float>();
}

// silu(x) = x / (1 + exp(-x)), written with e = exp(-|x|) <= 1 so that the exponent never overflows: x / (1 + e) for
// x >= 0, x e / (1 + e) below. NaN stays NaN (x is the numerator).
inline float silu1(float x) {
  const float e = std::exp(-std::fabs(x));
  return (x < 0.f ? x * e : x) / (1.f + e);
}
#if defined(__AVX512F__)
constexpr int64_t kSiluLanes = 16;
inline void silu_mul_lanes(float* g, const float* u) {
  const __m512 x = _mm512_loadu_ps(g), one = _mm512_set1_ps(1.f);
  const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 num = _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x, e);
  _mm512_storeu_ps(g, _mm512_mul_ps(_mm512_div_ps(num, _mm512_add_ps(one, e)), _mm512_loadu_ps(u)));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kSiluLanes = 8;
inline void silu_mul_lanes(float* g, const float* u) {
  const __m256 x = _mm256_loadu_ps(g), one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 e = exp_neg(_mm256_sub_ps(zero, a));
  const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
  _mm256_storeu_ps(g, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), _mm256_loadu_ps(u)));
}
#else
constexpr int64_t kSiluLanes = 1;
inline void silu_mul_lanes(float* g, const float* u) { g[0] = silu1(g[0]) * u[0]; }
#endif

}  // namespace

// x [..., D] -> rms_norm(x) * (offset + w) (w None: no scale); rows in parallel
torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, double offset) {
  check_rows(x, "x");
  const int64_t D = x.size(-1), T = x.numel() / D;
  const float* wp = weight_ptr(w, D);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_chunks(T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) norm_row(xp + t * D, wp, offset, eps, D, op + t * D);
  });
  return out;
}

// The sandwich-norm residual step: h' = h + rms_norm(y) * (offset + w1); returns (h', rms_norm(h') * (offset + w2))
// or (h', None) without w2. h and y [T, D].
std::tuple<torch::Tensor, c10::optional<torch::Tensor>> add_rms_norm(
    const torch::Tensor& h, const torch::Tensor& y, const torch::Tensor& w1, const c10::optional<torch::Tensor>& w2,
    double eps, double offset) {
  check_rows(h, "h");
  check_rows(y, "y");
  TORCH_CHECK(h.sizes() == y.sizes(), "h and y must have the same shape");
  const int64_t D = h.size(-1), T = h.numel() / D;
  const float* w1p = weight_ptr(w1, D);
  const float* w2p = weight_ptr(w2, D);
  auto hn = torch::empty_like(h);
  c10::optional<torch::Tensor> xn;
  if (w2p != nullptr) xn = torch::empty_like(h);
  const float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>();
  float* hnp = hn.data_ptr<float>();
  float* xnp = w2p != nullptr ? xn->data_ptr<float>() : nullptr;
  parallel_chunks(T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> tmp(D);
    for (int64_t t = t0; t < t1; ++t) {
      norm_row(yp + t * D, w1p, offset, eps, D, tmp.data());
      float* o = hnp + t * D;
      for (int64_t i = 0; i < D; ++i) o[i] = hp[t * D + i] + tmp[i];
      if (xnp != nullptr) norm_row(o, w2p, offset, eps, D, xnp + t * D);
    }
  });
  return {hn, xn};
}

// x [T, H, D]: optional per-head rms_norm (w [D]), then rotary over the first R dims: out = n * cos + partner * sin
// with cos/sin [T, D] whole-head tables (sign folded into sin); partner of d is d^1 (interleaved) or d +- R/2.
torch::Tensor norm_rope(const torch::Tensor& x, const c10::optional<torch::Tensor>& w, double eps, double offset,
                        const torch::Tensor& cos, const torch::Tensor& sin, int64_t R, bool interleaved) {
  check_rows(x, "x");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(x.dim() == 3, "x must be [T, H, D]");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = R / 2;
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D, "cos/sin must hold [T, D] values");
  TORCH_CHECK(R % 2 == 0 && R <= D, "rotary dims must be even and <= head dims");
  const float* wp = weight_ptr(w, D);
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  parallel_chunks(T * H, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> nrm(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / H;
      const float* src = xp + r * D;
      if (wp != nullptr) {
        norm_row(src, wp, offset, eps, D, nrm.data());
        src = nrm.data();
      }
      const float *c = cp + t * D, *sn = sp + t * D;
      float* o = op + r * D;
      if (interleaved) {
        for (int64_t i = 0; i < half; ++i) {
          o[2 * i] = src[2 * i] * c[2 * i] + src[2 * i + 1] * sn[2 * i];
          o[2 * i + 1] = src[2 * i + 1] * c[2 * i + 1] + src[2 * i] * sn[2 * i + 1];
        }
      } else {
        for (int64_t d = 0; d < half; ++d) o[d] = src[d] * c[d] + src[d + half] * sn[d];
        for (int64_t d = half; d < R; ++d) o[d] = src[d] * c[d] + src[d - half] * sn[d];
      }
      for (int64_t d = R; d < D; ++d) o[d] = src[d];
    }
  });
  return out;
}

// g = silu(g) * u in place (the gated MLP's activation; g and u the same shape): every element takes the vector
// path, the last partial group through a buffer, so the result does not depend on where a row or a chunk ends
// (the decode stack and the MLP module call this same function: bitwise equal)
torch::Tensor silu_mul_(torch::Tensor& g, const torch::Tensor& u) {
  check_rows(g, "g");
  check_rows(u, "u");
  TORCH_CHECK(g.sizes() == u.sizes(), "silu_mul_: g and u must have the same shape");
  float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const int64_t n = g.numel(), full = n / kSiluLanes;
  parallel_chunks(full, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) silu_mul_lanes(gp + b * kSiluLanes, up + b * kSiluLanes);
  });
  if (const int64_t tail = n - full * kSiluLanes; tail > 0) {
    float gb[kSiluLanes] = {0}, ub[kSiluLanes] = {0};
    std::copy(gp + full * kSiluLanes, gp + n, gb);
    std::copy(up + full * kSiluLanes, up + n, ub);
    silu_mul_lanes(gb, ub);
    std::copy(gb, gb + tail, gp + full * kSiluLanes);
  }
  return g;
}

}  // namespace autoglm
