// The per-token arithmetic between a decoder layer's linear layers: RMSNorm, rotary positions and SwiGLU's
// gate. Each is one call over all of a forward's rows, in place of several torch ops per layer, whose dispatch
// costs more than their arithmetic at the few rows of a decode or verify step. Every row is computed alone in a
// fixed order, so its bits do not depend on the other rows (a verify equals decode steps).
#pragma once

#include <cstdint>

namespace specdec {

// out[r, :] = x[r, :] · rsqrt(mean(x[r, :]²) + eps) · weight, for r < rows; x, out [rows, n] (may alias), weight [n].
void rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t n, float eps);

// Rotary positions, the half-split convention of Llama-family checkpoints, in place: for r < rows and h < heads,
//   v = x[r · row_stride + h · dim + :dim], half = dim / 2,
//   v[i] ← v[i] · cos[p, i] + (i < half ? −v[i + half] : v[i − half]) · sin[p, i], p = positions[r];
// cos, sin [≥ max(positions) + 1, dim].
void rope(float* x, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride, const int64_t* positions,
          const float* cos, const float* sin);

// out[r, i] = silu(gate_up[r, i]) · gate_up[r, inter + i], for r < rows, i < inter; gate_up [rows, 2 · inter],
// out [rows, inter].
void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter);

}  // namespace specdec
