// Small-M linear kernel for decode and verify forwards. See small_m.cpp.
#pragma once

#include <cstdint>

namespace specdec {

enum class WeightType { kFloat32, kBFloat16 };

// Rows of x whose accumulators stay in registers while a weight row streams: up to this many rows a forward costs
// about one row's; beyond, each further block of this many rows reuses the weights from cache and costs compute.
inline constexpr int64_t kRowsPerPass = 8;

bool cpu_has_avx512();

// y[m, n] = x[m, k] · w[n, k]^T (+ bias[n]) for output columns [n_begin, n_end).
// x, y: float32 row-major; w: float32 or bfloat16 row-major; bias: float32 or null.
// The result of each element is independent of m (batch-invariant).
void linear_small_m(const float* x, const void* w, WeightType wtype, const float* bias, float* y, int64_t m, int64_t n,
                    int64_t k, int64_t n_begin, int64_t n_end);

// int8 weights (one float32 scale per row) against int8-quantised activations: quantize_rows_q8 turns x[m, k] into
// xu[m, k] = round(x / sx) + 128 with sx[m] = max|x_row| / 127, and linear_small_m_q8 computes
// y = sx[m] · scale[n] · Σ xq·w (+ bias) from exact int32 sums (VNNI where the CPU has it, else a portable loop:
// bit-identical either way, and for any m). Sums stay exact for k < 2^31 / (255 · 127), about 66000.
bool cpu_has_avx512_vnni();
void quantize_rows_q8(const float* x, int64_t m, int64_t k, uint8_t* xu, float* sx);
void linear_small_m_q8(const uint8_t* xu, const float* sx, const int8_t* w, const float* scale, const float* bias,
                       float* y, int64_t m, int64_t n, int64_t k, int64_t n_begin, int64_t n_end);

}  // namespace specdec
