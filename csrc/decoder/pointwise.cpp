// Pointwise kernels of the lean decoder forward (pointwise.hpp), on the vector helpers of kernels/vec.hpp:
// compiled per ISA through target clones, 16 lanes reduced in a fixed order, no FMA contraction, so every clone
// gives the same bits and each row's bits are its own.
#include "decoder/pointwise.hpp"

#include <cmath>

#include "kernels/vec.hpp"

namespace specdec {

SD_CLONES void rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* o = out + r * n;
    vf acc = splat(0.0f);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const vf v = loadv(xr + i);
      acc += v * v;
    }
    double sum = hsum(acc);
    for (; i < n; ++i) sum += double(xr[i]) * double(xr[i]);
    const float inv = 1.0f / std::sqrt(float(sum / double(n)) + eps);
    for (i = 0; i < n; ++i) o[i] = xr[i] * inv * weight[i];
  }
}

SD_CLONES void rope(float* x, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride, const int64_t* positions,
                    const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + positions[r] * dim;
    const float* s = sin + positions[r] * dim;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + r * row_stride + h * dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] + -b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

SD_CLONES void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    float* o = out + r * inter;
    int64_t i = 0;
    for (; i + kLanes <= inter; i += kLanes) {
      const vf gv = loadv(g + i);
      const vf e = vexp(gv > splat(0.0f) ? -gv : gv);  // exp(−|g|) ≤ 1: no overflow on either side
      const vf sig = gv > splat(0.0f) ? splat(1.0f) / (splat(1.0f) + e) : e / (splat(1.0f) + e);
      const vf res = gv * sig * loadv(u + i);
      std::memcpy(o + i, &res, sizeof(res));
    }
    for (; i < inter; ++i) {
      const float e = exp1(g[i] > 0.0f ? -g[i] : g[i]);
      const float sig = g[i] > 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
      o[i] = g[i] * sig * u[i];
    }
  }
}

}  // namespace specdec
