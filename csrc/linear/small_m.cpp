// Small-M linear: y[M,N] = x[M,K] · W[N,K]^T (+ bias[N]) for the few rows of a decode or verify step.
//
// A BLAS GEMM at M = 2..8 either runs one GEMV per row (reading the weights M times) or a blocked GEMM
// tuned for large M. Decode is memory-bound, so here each weight row is streamed once and multiplied
// into up to ROWS rows of x held in cache. Every output element is reduced in the same order whatever M
// is (16 lanes over K, then a fixed tree), so a verify forward over k tokens and a one-token decode give
// bit-identical results per row: batch-invariant by construction.
#include "small_m.hpp"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace specdec {
namespace {

constexpr int64_t ROWS = kRowsPerPass;  // accumulators for this many rows stay in registers
constexpr int MAX_WIDTH = 4;            // weight rows per group call at most: sweep_columns' buffer holds this many

float to_float(float v) { return v; }
float to_float(uint16_t v) {  // bfloat16 bits
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Portable path: the same lane structure (16 partial sums, fixed tree) as the AVX-512 path.
template <typename W>
void block_generic(const float* x, int64_t m, const W* w, int64_t k, float* out) {
  for (int64_t r = 0; r < m; ++r) {
    float lanes[16] = {};
    for (int64_t i = 0; i < k; ++i) {
      lanes[i % 16] += x[r * k + i] * to_float(w[i]);
    }
    for (int width = 8; width >= 1; width /= 2)
      for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    out[r] = lanes[0];
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_w(const float* w, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, w);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_w(const uint16_t* w, __mmask16 mask) {
  __m256i half = _mm256_maskz_loadu_epi16(mask, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float tree_sum(__m512 v) {
  // The same fixed tree as block_generic: halve the width until one lane is left.
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  __m128 d = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));
  return _mm_cvtss_f32(d);
}

// One 16-column step of group_avx512: WR weight vectors (prefetching ahead) against MB x vectors.
template <int MB, int WR, typename W>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void group_step(
    const float* x, const W* w, int64_t k, int64_t i, __mmask16 mask, __m512 (&acc)[WR][MB]) {
  constexpr int64_t ahead = kPrefetchBytes / sizeof(W);  // past a row's end it fetches the next rows: harmless
  __m512 v[WR];
#pragma GCC unroll 4
  for (int q = 0; q < WR; ++q) {
    _mm_prefetch(reinterpret_cast<const char*>(w + q * k + i + ahead), _MM_HINT_T1);
    v[q] = load_w(w + q * k + i, mask);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) {
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * k + i);
#pragma GCC unroll 4
    for (int q = 0; q < WR; ++q) acc[q][r] = _mm512_fmadd_ps(xv, v[q], acc[q][r]);
  }
}

// WR weight rows at a time against MB rows of x: WR·MB independent accumulator chains in registers, and each x
// load feeds WR FMAs. out[q * ROWS + r] is x row r against weight row q; each one's reduction is the same
// whatever WR and MB are.
template <int MB, int WR, typename W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void group_avx512(const float* x, const W* w, int64_t k,
                                                                         float* out) {
  static_assert(WR <= MAX_WIDTH);
  // Every loop over MB and WR is unrolled: otherwise GCC keeps the accumulators in memory and stores them all on
  // each iteration, which made the kernel store-bound (M=8 took 8x the M=1 time instead of memory-bound).
  __m512 acc[WR][MB];
#pragma GCC unroll 4
  for (int q = 0; q < WR; ++q)
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) acc[q][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) group_step<MB, WR>(x, w, k, i, 0xFFFF, acc);
  if (i < k) group_step<MB, WR>(x, w, k, i, static_cast<__mmask16>((1u << (k - i)) - 1), acc);
#pragma GCC unroll 4
  for (int q = 0; q < WR; ++q)
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) out[q * ROWS + r] = tree_sum(acc[q][r]);
}

// The vector kernel for a block of `rows` x rows: `wide` takes `width` weight rows per call, `one` the leftovers.
template <typename Fn>
struct Group {
  Fn wide, one;
  int64_t width;
};

template <typename W>
using GroupFn = void (*)(const float*, const W*, int64_t, float*);

// 4 weight rows per call at 7-8 x rows (fewer x loads per FMA), 2 below that, where 4 is slower: the widths that
// `python bench/linear_rows.py` finds fastest on Qwen2.5-1.5B's MLP shapes. At 8 x rows the 32 accumulators plus
// the weight and x vectors exceed the 32 registers, so GCC spills a few: known, and still the faster choice.
template <typename W>
Group<GroupFn<W>> group_for(int64_t rows) {
  static const Group<GroupFn<W>> table[ROWS] = {
      {group_avx512<1, 2, W>, group_avx512<1, 1, W>, 2}, {group_avx512<2, 2, W>, group_avx512<2, 1, W>, 2},
      {group_avx512<3, 2, W>, group_avx512<3, 1, W>, 2}, {group_avx512<4, 2, W>, group_avx512<4, 1, W>, 2},
      {group_avx512<5, 2, W>, group_avx512<5, 1, W>, 2}, {group_avx512<6, 2, W>, group_avx512<6, 1, W>, 2},
      {group_avx512<7, 4, W>, group_avx512<7, 1, W>, 4}, {group_avx512<8, 4, W>, group_avx512<8, 1, W>, 4}};
  return table[rows - 1];
}

// ---- AVX2 + FMA: the same blocking in 8-lane vectors (k a multiple of 8) -----------------------------------------

__attribute__((target("avx2,fma"))) inline __m256 load_w8(const float* w) { return _mm256_loadu_ps(w); }
__attribute__((target("avx2,fma"))) inline __m256 load_w8(const uint16_t* w) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

__attribute__((target("avx2,fma"))) inline float tree_sum8(__m256 v) {
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

template <int MB, int WR, typename W>
__attribute__((target("avx2,fma"))) void group_avx2(const float* x, const W* w, int64_t k, float* out) {
  static_assert(WR <= MAX_WIDTH);
  constexpr int64_t ahead = kPrefetchBytes / sizeof(W);
  __m256 acc[WR][MB];
#pragma GCC unroll 4
  for (int q = 0; q < WR; ++q)
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) acc[q][r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 8) {
    __m256 v[WR];
#pragma GCC unroll 4
    for (int q = 0; q < WR; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(w + q * k + i + ahead), _MM_HINT_T1);
      v[q] = load_w8(w + q * k + i);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + i);
#pragma GCC unroll 4
      for (int q = 0; q < WR; ++q) acc[q][r] = _mm256_fmadd_ps(xv, v[q], acc[q][r]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < WR; ++q)
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) out[q * ROWS + r] = tree_sum8(acc[q][r]);
}

// Two weight rows per call up to 4 x rows, one beyond: 16 registers hold WR·MB accumulators plus the operands.
template <typename W>
Group<GroupFn<W>> group_avx2_for(int64_t rows) {
  static const Group<GroupFn<W>> table[ROWS] = {
      {group_avx2<1, 2, W>, group_avx2<1, 1, W>, 2}, {group_avx2<2, 2, W>, group_avx2<2, 1, W>, 2},
      {group_avx2<3, 2, W>, group_avx2<3, 1, W>, 2}, {group_avx2<4, 2, W>, group_avx2<4, 1, W>, 2},
      {group_avx2<5, 1, W>, group_avx2<5, 1, W>, 1}, {group_avx2<6, 1, W>, group_avx2<6, 1, W>, 1},
      {group_avx2<7, 1, W>, group_avx2<7, 1, W>, 1}, {group_avx2<8, 1, W>, group_avx2<8, 1, W>, 1}};
  return table[rows - 1];
}

// Walks output columns [n_begin, n_end) for all m rows of x: MAX_WIDTH columns at a time, and within them every
// block of ROWS x rows, so a column's weights come from memory once and stay in cache for the further blocks (rows
// past ROWS cost compute, not another pass over the weights). kernel_for(rows) gives a block's vector kernel, taking
// its width columns per call (the last few one at a time); without it (null), the portable block.
// store(r0, rows, j, out) writes column j of the block starting at row r0.
template <typename Out, typename X, typename W, typename Fn, typename Block, typename Store>
void sweep_columns(Group<Fn> (*kernel_for)(int64_t), Block block, const X* x, int64_t m, const W* w, int64_t k,
                   int64_t n_begin, int64_t n_end, Store store) {
  Out out[MAX_WIDTH * ROWS];
  for (int64_t j0 = n_begin; j0 < n_end; j0 += MAX_WIDTH) {
    const int64_t j1 = std::min(j0 + MAX_WIDTH, n_end);
    for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
      const int64_t rows = std::min(ROWS, m - r0);
      const X* xr = x + r0 * k;
      int64_t j = j0;
      if (kernel_for) {
        const Group<Fn> g = kernel_for(rows);
        for (; j + g.width <= j1; j += g.width) {
          g.wide(xr, w + j * k, k, out);
          for (int64_t q = 0; q < g.width; ++q) store(r0, rows, j + q, out + q * ROWS);
        }
        for (; j < j1; ++j) {
          g.one(xr, w + j * k, k, out);
          store(r0, rows, j, out);
        }
      } else {
        for (; j < j1; ++j) {
          block(xr, rows, w + j * k, k, out);
          store(r0, rows, j, out);
        }
      }
    }
  }
}

template <typename W>
void linear_range(const float* x, int64_t m, const W* w, const float* bias, float* y, int64_t n_begin, int64_t n_end,
                  int64_t n, int64_t k, Isa isa) {
  Group<GroupFn<W>> (*kernel_for)(int64_t) = nullptr;
  if (isa == Isa::kAvx512) kernel_for = group_for<W>;
  if (isa == Isa::kAvx2 && k % 8 == 0) kernel_for = group_avx2_for<W>;
  sweep_columns<float>(kernel_for, block_generic<W>, x, m, w, k, n_begin, n_end,
                       [&](int64_t r0, int64_t rows, int64_t j, const float* out) {
                         const float b = bias ? bias[j] : 0.0f;
                         for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * n + j] = out[r] + b;
                       });
}

}  // namespace

bool cpu_supports(Isa isa) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return isa == Isa::kPortable || (isa == Isa::kAvx2 && avx2) || (isa == Isa::kAvx512 && avx512);
}

void linear_small_m(const float* x, const void* w, WeightType wtype, const float* bias, float* y, int64_t m, int64_t n,
                    int64_t k, int64_t n_begin, int64_t n_end, Isa isa) {
  if (wtype == WeightType::kFloat32)
    return linear_range(x, m, static_cast<const float*>(w), bias, y, n_begin, n_end, n, k, isa);
  return linear_range(x, m, static_cast<const uint16_t*>(w), bias, y, n_begin, n_end, n, k, isa);
}

}  // namespace specdec
