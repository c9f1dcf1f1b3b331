// Small-M linear kernel for decode and verify forwards. See small_m.cpp.
#pragma once

#include <cstdint>

namespace specdec {

enum class WeightType { kFloat32, kBFloat16, kInt8 };

bool cpu_has_avx512();

// y[m, n] = x[m, k] · w[n, k]^T (+ bias[n]) for output columns [n_begin, n_end).
// x, y: float32 row-major; w: float32, bfloat16 or int8 row-major; bias: float32 or null.
// scale: float32[n], one per weight row, required for int8 (y = scale[n] · Σ x·w + bias) and ignored otherwise.
// The result of each element is independent of m (batch-invariant).
void linear_small_m(const float* x, const void* w, WeightType wtype, const float* scale, const float* bias, float* y,
                    int64_t m, int64_t n, int64_t k, int64_t n_begin, int64_t n_end);

}  // namespace specdec
