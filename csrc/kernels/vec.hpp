// Portable SIMD helpers on GCC/Clang vector extensions (16 float lanes).
//
// The same source is compiled for several ISAs through target_clones (see SD_CLONES). Every result
// must be bit-identical between clones, so the build uses -ffp-contract=off (no FMA contraction),
// no -ffast-math, and reductions always run over the same 16 lanes in the same order.
#pragma once
#include <cstdint>
#include <cstring>

namespace specdec {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

using bf16_t = uint16_t;  // bfloat16 storage: the top half of an IEEE float32

#define SD_INLINE static inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SPECDEC_NO_CLONES)
#define SD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SD_CLONES
#endif

SD_INLINE vf splat(float x) { return vf{} + x; }

SD_INLINE vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SD_INLINE vf loadv(const bf16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
SD_INLINE float load1(const float* p) { return *p; }
SD_INLINE float load1(const bf16_t* p) {
  uint32_t u = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

SD_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
SD_INLINE vf vmin(vf a, vf b) { return a < b ? a : b; }

// exp(x) for x <= 0 (Cephes expf polynomial; about 1 ulp). x below -87 is clamped to -87, so
// exp never returns 0 or a denormal. exp(0) == 1 exactly.
SD_INLINE vf vexp(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  vf t = x * splat(1.44269504088896341f);
  vf n = (t + splat(12582912.0f)) - splat(12582912.0f);  // round to nearest
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  vf r2 = r * r;
  p = p * r2 + r + splat(1.0f);
  vi ni = __builtin_convertvector(n, vi);
  vi bits = (ni + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Scalar exp with the exact same arithmetic as vexp (lane 0 of a broadcast).
SD_INLINE float exp1(float x) { return vexp(splat(x))[0]; }

SD_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
SD_INLINE float hmin(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] < m ? v[i] : m;
  return m;
}
// Lane sum in double, lane order fixed.
SD_INLINE double hsum(vf v) {
  double s = 0.0;
  for (int i = 0; i < kLanes; ++i) s += double(v[i]);
  return s;
}

}  // namespace specdec
