// Small-M linear kernel for decode and verify forwards. See small_m.cpp.
#pragma once

#include <cstdint>

#include "linear/isa.hpp"

namespace specdec {

enum class WeightType { kFloat32, kBFloat16 };

// Rows of x whose accumulators stay in registers while a weight row streams: up to this many rows a forward costs
// about one row's; beyond, each further block of this many rows reuses the weights from cache and costs compute.
inline constexpr int64_t kRowsPerPass = 8;

// Software prefetch distance along a weight row, into L2 (T1). The hardware prefetcher alone falls behind once the
// multiplies of several x rows sit between the weight loads, and prefetching into L2 rather than L1 keeps more
// misses in flight than L1's fill buffers allow, which speeds up one row too. The level and the distance are the
// fastest that `python bench/linear_rows.py` finds on Qwen2.5-1.5B's shapes; distances of 4-32 KiB tie.
inline constexpr int64_t kPrefetchBytes = 8192;

// y[m, n] = x[m, k] · w[n, k]^T (+ bias[n]) for output columns [n_begin, n_end), on the `isa` path.
// x, y: float32 row-major; w: float32 or bfloat16 row-major; bias: float32 or null.
// The result of each element is independent of m (batch-invariant).
void linear_small_m(const float* x, const void* w, WeightType wtype, const float* bias, float* y, int64_t m, int64_t n,
                    int64_t k, int64_t n_begin, int64_t n_end, Isa isa);

}  // namespace specdec
