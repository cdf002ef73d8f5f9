// Decode attention: one query per head over a cache span.
#include "kernels.h"
#include "vec_exp.h"

#if (defined(__AVX512F__) || defined(__AVX2__)) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace autoglm {

namespace {

// ---- single-query attention over a cache span (decode) ---------------------------------------------------------
// Memory-bound: every step reads each layer's whole K/V span once, so the loops stream rows in order, read a K row
// once for all the query heads that share it, and accept float16/bfloat16 caches converted in registers.

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

#if (defined(__AVX512F__) || defined(__AVX2__)) && defined(__F16C__) && defined(__FMA__)
// a paged cache's rows sit wherever their blocks are, and by the time a decode step reaches a layer's attention the
// weights streaming through have evicted its K/V: fetch the row kRowsAhead keys on while this one is multiplied
// (the loops were bound by the misses: 47 us a layer cold against 26 us warm, 1.5 B at 130 keys)
constexpr int64_t kRowsAhead = 6;
template <typename T>
inline void prefetch_row(const T* r, int64_t n) {
  const char* p = reinterpret_cast<const char*>(r);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}
#endif

#if defined(__AVX512F__) && defined(__F16C__)
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// s[g * sn + j] = q[g] . k[j] for GB heads g and keys j in [j0, j1) (key j at rows[j] + ho); D % 16 == 0
template <int GB, typename T>
void scores_avx(const float* q, const T* const* rows, int64_t ho, int64_t j0, int64_t j1, int64_t D, float* s,
                int64_t sn) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* kr = rows[j] + ho;
    if (j + kRowsAhead < j1) prefetch_row(rows[j + kRowsAhead] + ho, D);
    __m512 a[GB];
    for (int g = 0; g < GB; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 x = load16(kr + d);
      for (int g = 0; g < GB; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), x, a[g]);
    }
    for (int g = 0; g < GB; ++g) s[g * sn + j] = _mm512_reduce_add_ps(a[g]);
  }
}

// out[g, c0:c0+64] = sum_j p[g * pn + j] v[j, c0:c0+64] for GB heads (value j at rows[j] + ho)
template <int GB, typename T>
void values_avx(const float* p, int64_t pn, const T* const* rows, int64_t ho, int64_t n, int64_t c0, int64_t D,
                float* out) {
  __m512 acc[GB][4];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = rows[j] + ho + c0;
    if (j + kRowsAhead < n) prefetch_row(rows[j + kRowsAhead] + ho + c0, 64);
    __m512 x[4];
    for (int c = 0; c < 4; ++c) x[c] = load16(vr + 16 * c);
    for (int g = 0; g < GB; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * pn + j]);
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_fmadd_ps(w, x[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + g * D + c0 + 16 * c, acc[g][c]);
}
#define AUTOGLM_ATTN_AVX 1
constexpr int kValueHeads = 6;  // most heads per values_avx call: 6 x 4 zmm accumulators
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// the same loops at 8 lanes (x86-64-v3): 64 value columns are 8 ymm accumulators, so one head per values_avx call
template <typename T>
inline __m256 load8(const T* p);
template <>
inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

template <int GB, typename T>
void scores_avx(const float* q, const T* const* rows, int64_t ho, int64_t j0, int64_t j1, int64_t D, float* s,
                int64_t sn) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* kr = rows[j] + ho;
    if (j + kRowsAhead < j1) prefetch_row(rows[j + kRowsAhead] + ho, D);
    __m256 a[GB];
    for (int g = 0; g < GB; ++g) a[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 x = load8(kr + d);
      for (int g = 0; g < GB; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), x, a[g]);
    }
    for (int g = 0; g < GB; ++g) s[g * sn + j] = hsum8(a[g]);
  }
}

template <int GB, typename T>
void values_avx(const float* p, int64_t pn, const T* const* rows, int64_t ho, int64_t n, int64_t c0, int64_t D,
                float* out) {
  static_assert(GB == 1, "8 ymm accumulators per head");
  __m256 acc[8];
  for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = rows[j] + ho + c0;
    if (j + kRowsAhead < n) prefetch_row(rows[j + kRowsAhead] + ho + c0, 64);
    const __m256 w = _mm256_set1_ps(p[j]);
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(w, load8(vr + 8 * c), acc[c]);
  }
  for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + c0 + 8 * c, acc[c]);
}
#define AUTOGLM_ATTN_AVX 1
constexpr int kValueHeads = 1;
#else
#define AUTOGLM_ATTN_AVX 0
#endif

// sh[0:n] = softmax(scale * sh), float32
inline void softmax_row(float* sh, int64_t n, float scale) {
  float m = sh[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, sh[j]);
  float z = 0.f;
  int64_t j = 0;
#if AUTOGLM_ATTN_AVX && defined(__AVX512F__)
  __m512 zv = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m), sv = _mm512_set1_ps(scale);
  for (; j < n; j += 16) {  // the tail masked, so every score takes the same exp
    const __mmask16 k = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __m512 e = exp_neg(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sh + j), mv), sv));
    _mm512_mask_storeu_ps(sh + j, k, e);
    zv = _mm512_mask_add_ps(zv, k, zv, e);
  }
  z = _mm512_reduce_add_ps(zv);
#elif AUTOGLM_ATTN_AVX
  const __m256 mv = _mm256_set1_ps(m), sv = _mm256_set1_ps(scale);
  alignas(32) float buf[8];
  for (; j < n; j += 8) {  // the tail through a padded buffer, so every score takes the same exp
    const int64_t c = std::min<int64_t>(8, n - j);
    std::fill(buf, buf + 8, m);
    std::copy(sh + j, sh + j + c, buf);
    const __m256 e = exp_neg(_mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(buf), mv), sv));
    _mm256_store_ps(buf, e);
    std::copy(buf, buf + c, sh + j);
    for (int64_t i = 0; i < c; ++i) z += buf[i];
  }
#else
  for (; j < n; ++j) {
    sh[j] = std::exp((sh[j] - m) * scale);
    z += sh[j];
  }
#endif
  const float inv = 1.f / z;
  for (j = 0; j < n; ++j) sh[j] *= inv;
}

#if AUTOGLM_ATTN_AVX
// heads per call of the score / value loops for the r heads of a KV head still to do: the most that keep their
// accumulators in registers (scores: one per head; values: four per head, 64 columns). A lone single-head call was
// a dependent chain of FMAs: Qwen2.5's 6 heads per KV head ran as 4 + 1 + 1.
inline int score_heads(int64_t r) { return r >= 8 ? 8 : r >= 6 ? 6 : r >= 4 ? 4 : r >= 2 ? 2 : 1; }
inline int value_heads(int64_t r) {
  return r >= 6 && kValueHeads >= 6 ? 6 : r >= 4 && kValueHeads >= 4 ? 4 : r >= 2 && kValueHeads >= 2 ? 2 : 1;
}
#endif

// one query per head over n keys: key/value j of KV head kh at krow[j] + kh * ks1 / vrow[j] + kh * vs1 (a paged
// cache's rows are wherever their blocks are); parallel inside unless called from a parallel region
template <typename T>
void attend_impl(const float* q, const T* const* krow, const T* const* vrow, int64_t ks1, int64_t vs1, int64_t n,
                 int64_t H, int64_t KV, int64_t D, float scale, float* out) {
  const int64_t G = H / KV;
  std::vector<float> s(H * n);  // scores / probabilities [H, n]
  const bool fast = AUTOGLM_ATTN_AVX && D % 64 == 0;
  const int64_t chunks = (D + 63) / 64;
  // s[h, j0:j1] = q[h] . k[j] for the G query heads of KV head kh
  auto scores = [&](int64_t kh, int64_t j0, int64_t j1) {
    const int64_t ho = kh * ks1;
    int64_t g = 0;
#if AUTOGLM_ATTN_AVX
    if (fast) {
      for (int gb; g < G; g += gb) {
        gb = score_heads(G - g);
        const float* qg = q + (kh * G + g) * D;
        float* sg = s.data() + (kh * G + g) * n;
        switch (gb) {
          case 8: scores_avx<8>(qg, krow, ho, j0, j1, D, sg, n); break;
          case 6: scores_avx<6>(qg, krow, ho, j0, j1, D, sg, n); break;
          case 4: scores_avx<4>(qg, krow, ho, j0, j1, D, sg, n); break;
          case 2: scores_avx<2>(qg, krow, ho, j0, j1, D, sg, n); break;
          default: scores_avx<1>(qg, krow, ho, j0, j1, D, sg, n);
        }
      }
    }
#endif
    for (; g < G; ++g) {
      const float* qh = q + (kh * G + g) * D;
      for (int64_t j = j0; j < j1; ++j) {
        const T* kr = krow[j] + ho;
        float a = 0.f;
        for (int64_t d = 0; d < D; ++d) a += qh[d] * to_f(kr[d]);
        s[(kh * G + g) * n + j] = a;
      }
    }
  };
  // out[h, c0:c0+64] = sum_j p[h, j] v[j, c0:c0+64] for the G query heads of KV head kh
  auto values = [&](int64_t kh, int64_t c0) {
    const int64_t c = std::min<int64_t>(64, D - c0), ho = kh * vs1;
    int64_t g = 0;
#if AUTOGLM_ATTN_AVX
    if (fast) {
      for (int gb; g < G; g += gb) {
        gb = value_heads(G - g);
        const float* pg = s.data() + (kh * G + g) * n;
        float* og = out + (kh * G + g) * D;
        switch (gb) {
#if defined(__AVX512F__)
          case 6: values_avx<6>(pg, n, vrow, ho, n, c0, D, og); break;
          case 4: values_avx<4>(pg, n, vrow, ho, n, c0, D, og); break;
          case 2: values_avx<2>(pg, n, vrow, ho, n, c0, D, og); break;
#endif
          default: values_avx<1>(pg, n, vrow, ho, n, c0, D, og);
        }
      }
    }
#endif
    for (; g < G; ++g) {
      const float* p = s.data() + (kh * G + g) * n;
      float* o = out + (kh * G + g) * D + c0;
      std::fill(o, o + c, 0.f);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < c; ++d) o[d] += p[j] * to_f(vrow[j][ho + c0 + d]);
    }
  };
  const int64_t nth = at::get_num_threads();
  if (n >= 64 && nth > 1 && KV % nth == 0 && !at::in_parallel_region()) {
    // a KV head per thread, whole: its scores, softmax and values in one parallel region. The same arithmetic per
    // head as the split below (the split's key chunks only choose who computes a score), without its second thread
    // hand-off and the softmax on one thread in between (Qwen2.5's 2 KV heads at 2 threads: -1 region a layer)
    at::parallel_for(0, KV, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t kh = k0; kh < k1; ++kh) {
        scores(kh, 0, n);
        for (int64_t h = kh * G; h < (kh + 1) * G; ++h) softmax_row(s.data() + h * n, n, scale);
        for (int64_t c = 0; c < chunks; ++c) values(kh, c * 64);
      }
    });
    return;
  }
  parallel_chunks(n, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t kh = 0; kh < KV; ++kh) scores(kh, j0, j1);
  });
  for (int64_t h = 0; h < H; ++h) softmax_row(s.data() + h * n, n, scale);
  // out[h] = sum_j p[h, j] v[j]: threads take (kv head, 64-column chunk) units, so V is read once, no reduction.
  // A task gets at least ~64K multiply-adds: a short context's few units run inline (a thread hand-off cost more
  // than the work, measured 2x slower at 2 threads on a 40-token context)
  const int64_t vgrain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n * 64 * G));
  parallel_chunks(KV * chunks, vgrain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) values(u / chunks, (u % chunks) * 64);
  });
}

template <typename T>
void attend_strided(const float* q, const T* k, const T* v, int64_t ks0, int64_t ks1, int64_t vs0, int64_t vs1,
                    int64_t n, int64_t H, int64_t KV, int64_t D, float scale, float* out) {
  std::vector<const T*> kr(n), vr(n);
  for (int64_t j = 0; j < n; ++j) {
    kr[j] = k + j * ks0;
    vr[j] = v + j * vs0;
  }
  attend_impl(q, kr.data(), vr.data(), ks1, vs1, n, H, KV, D, scale, out);
}

// every sequence b: keys lo[b]..hi[b]-1 of its block table (cache [blocks, BS, KV, D], contiguous)
template <typename T>
void attend_paged_impl(const float* q, const T* k, const T* v, const int64_t* tables, int64_t tstride,
                       const int64_t* lo, const int64_t* hi, int64_t B, int64_t BS, int64_t H, int64_t KV, int64_t D,
                       float scale, float* out) {
  const int64_t row = KV * D;
  auto one = [&](int64_t b) {
    const int64_t n = hi[b] - lo[b];
    std::vector<const T*> kr(n), vr(n);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = lo[b] + j, slot = tables[b * tstride + pos / BS] * BS + pos % BS;
      kr[j] = k + slot * row;
      vr[j] = v + slot * row;
    }
    attend_impl(q + b * H * D, kr.data(), vr.data(), D, D, n, H, KV, D, scale, out + b * H * D);
  };
  if (B == 1) {
    one(0);  // parallel inside the sequence
  } else {
    parallel_chunks(B, 1, [&](int64_t b0, int64_t b1) {  // a sequence per thread (inner loops run inline)
      for (int64_t b = b0; b < b1; ++b) one(b);
    });
  }
}

}  // namespace

// One query per sequence and head over its paged cache span: q [B, H, D] float32; k_cache, v_cache [blocks, BS, KV, D]
// (float32 / float16 / bfloat16, contiguous); tables [B, max_blocks] int64 (block ids in order); lo, hi [B] int64
// (sequence b sees positions lo[b]..hi[b]-1) -> [B, H, D]. The same arithmetic as attend_decode on the gathered span.
torch::Tensor attend_decode_paged(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                  const torch::Tensor& tables, const torch::Tensor& lo, const torch::Tensor& hi,
                                  double scale) {
  check_rows(q, "q");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.device().is_cpu(),
              "k/v caches must be contiguous CPU [blocks, block_size, KV, D] tensors of one dtype");
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KV = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == D && q.size(1) % KV == 0, "q must be [B, H, D] with H a multiple of KV");
  const int64_t B = q.size(0), H = q.size(1);
  TORCH_CHECK(tables.scalar_type() == torch::kLong && tables.dim() == 2 && tables.size(0) == B &&
                  tables.stride(1) == 1 && lo.scalar_type() == torch::kLong && hi.scalar_type() == torch::kLong &&
                  lo.numel() == B && hi.numel() == B && lo.is_contiguous() && hi.is_contiguous(),
              "tables [B, max_blocks], lo and hi [B] must be int64");
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t *lp = lo.data_ptr<int64_t>(), *hp = hi.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(0 <= lp[b] && lp[b] < hp[b] && (hp[b] - 1) / BS < tables.size(1), "sequence ", b, ": bad span");
    for (int64_t j = lp[b] / BS; j <= (hp[b] - 1) / BS; ++j)
      TORCH_CHECK(tp[b * tables.stride(0) + j] >= 0 && tp[b * tables.stride(0) + j] < NB, "block id out of range");
  }
  auto out = torch::empty({B, H, D}, q.options());
  const float sc = static_cast<float>(scale);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ts = tables.stride(0);
  switch (k_cache.scalar_type()) {
    case torch::kFloat32:
      attend_paged_impl(qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tp, ts, lp, hp, B, BS, H, KV, D, sc,
                        op);
      break;
    case torch::kFloat16:
      attend_paged_impl(qp, k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>(), tp, ts, lp, hp, B, BS, H, KV,
                        D, sc, op);
      break;
    case torch::kBFloat16:
      attend_paged_impl(qp, k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), tp, ts, lp, hp, B, BS,
                        H, KV, D, sc, op);
      break;
    default:
      TORCH_CHECK(false, "attend_decode_paged: unsupported cache dtype ", k_cache.scalar_type());
  }
  return out;
}

// One query per head over n cached keys, all visible: q [H, D] float32; k, v [n, KV, D] float32 / float16 / bfloat16
// (rows may be strided; each head's D values contiguous) -> [H, D] float32. Head h uses KV head h / (H / KV), as
// transformers' repeat_kv; softmax in float32.
torch::Tensor attend_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  check_rows(q, "q");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.scalar_type() == v.scalar_type(), "k/v must be [n, KV, D]");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && k.stride(2) == 1 && v.stride(2) == 1,
              "k/v must be CPU tensors with contiguous heads");
  const int64_t n = k.size(0), KV = k.size(1), D = k.size(2), H = q.numel() / D;
  TORCH_CHECK(n > 0 && q.numel() == H * D && H % KV == 0, "q must be [H, D] with H a multiple of KV");
  auto out = torch::empty({H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t a = k.stride(0), b = k.stride(1), c = v.stride(0), d = v.stride(1);
  switch (k.scalar_type()) {
    case torch::kFloat32:
      attend_strided(qp, k.data_ptr<float>(), v.data_ptr<float>(), a, b, c, d, n, H, KV, D, sc, op);
      break;
    case torch::kFloat16:
      attend_strided(qp, k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(), a, b, c, d, n, H, KV, D, sc, op);
      break;
    case torch::kBFloat16:
      attend_strided(qp, k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), a, b, c, d, n, H, KV, D, sc, op);
      break;
    default:
      TORCH_CHECK(false, "attend_decode: unsupported cache dtype ", k.scalar_type());
  }
  return out;
}

}  // namespace autoglm
