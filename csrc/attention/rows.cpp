// Per-row attention (rows.hpp). A decode or verify step has a handful of query rows, so the set-up of a fused
// attention kernel costs more than the arithmetic; each (row, head) here is one task of the pool: scores by dot
// products, a max-subtracted softmax with std::exp, and the weighted sum of values, all in key order.
#include "attention/rows.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/threadpool.hpp"

namespace specdec {
namespace {

#define SPECDEC_AVX512 __attribute__((target("avx512f")))
#define SPECDEC_AVX2 __attribute__((target("avx2,fma")))

float dot_portable(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_portable(float p, const float* v, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] += p * v[i];
}

SPECDEC_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
  float t = _mm512_reduce_add_ps(s);
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

SPECDEC_AVX512 void axpy_avx512(float p, const float* v, float* o, int64_t n) {
  const __m512 vp = _mm512_set1_ps(p);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_fmadd_ps(vp, _mm512_loadu_ps(v + i), _mm512_loadu_ps(o + i)));
  for (; i < n; ++i) o[i] += p * v[i];
}

SPECDEC_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float t = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

SPECDEC_AVX2 void axpy_avx2(float p, const float* v, float* o, int64_t n) {
  const __m256 vp = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
  for (; i < n; ++i) o[i] += p * v[i];
}

struct Ops {
  float (*dot)(const float*, const float*, int64_t);
  void (*axpy)(float, const float*, float*, int64_t);
};

Ops ops_for(Isa isa) {
  if (isa == Isa::kAvx512) return {dot_avx512, axpy_avx512};
  if (isa == Isa::kAvx2) return {dot_avx2, axpy_avx2};
  return {dot_portable, axpy_portable};
}

}  // namespace

void attend_rows(HeadRows q, HeadRows keys, HeadRows values, int64_t rows, int64_t heads, int64_t kv_heads,
                 int64_t dim, const int64_t* begin, const int64_t* end, float scale, float* out,
                 int64_t out_head_stride, int64_t out_row_stride, Isa isa) {
  const Ops ops = ops_for(isa);
  const int64_t group = heads / kv_heads;
  parallel_run(rows * heads, [&](int64_t task, int) {
    const int64_t r = task / heads, h = task % heads, kv = h / group;
    const float* qv = q.base + h * q.head_stride + r * q.row_stride;
    const float* k = keys.base + kv * keys.head_stride;
    const float* v = values.base + kv * values.head_stride;
    float* o = out + h * out_head_stride + r * out_row_stride;
    std::fill(o, o + dim, 0.0f);
    const int64_t b = begin[r], e = end[r];
    if (e <= b) return;
    thread_local std::vector<float> scores;
    scores.resize(e - b);
    float top = -INFINITY;
    for (int64_t j = b; j < e; ++j) {
      scores[j - b] = scale * ops.dot(qv, k + j * keys.row_stride, dim);
      top = std::max(top, scores[j - b]);
    }
    float total = 0.0f;
    for (int64_t j = b; j < e; ++j) {
      const float p = std::exp(scores[j - b] - top);
      scores[j - b] = p;
      total += p;
    }
    for (int64_t j = b; j < e; ++j) ops.axpy(scores[j - b], v + j * values.row_stride, o, dim);
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
  });
}

}  // namespace specdec
