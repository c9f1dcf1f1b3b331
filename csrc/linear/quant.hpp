// Small-M linear over quantised weights that hold a GGUF file's values exactly. See quant.cpp.
#pragma once

#include <cstdint>

#include "linear/isa.hpp"

namespace specdec {

// Columns of x quantised under one scale; also the unit the kernels stream (a multiple of every group size).
inline constexpr int64_t kQuantChunk = 128;

// A weight matrix w[n, k] (k a multiple of kQuantChunk) stored as unsigned or signed codes with one float32 scale
// (and optionally one float32 min) per `group` consecutive weights of a row:  w[j, i] = scale[j, g] · c[j, i] − min[j, g],
// g = i / group.
// Within each chunk of 128 weights the codes are stored interleaved: position p holds weight chunk_position(p, group)
// of the chunk, so that every 4-byte lane of every 32-byte vector holds one group's weights.
//   bits 8: codes int8 [n, k], c = codes[j, position]; group 16 or 32.
//   bits 4: codes uint8 [n, k / 2], c in [0, 15]; group 32. Within each chunk, byte b (0..63) holds position b in
//           its low nibble and position 64 + b in its high nibble.
// scales, mins: float32 [n, k / group]; mins may be null (no min term).
// Two-level scales (the K-quants' layout, which streams 2 bytes per group instead of 8): where sub_scales is set,
// scale[j, g] = scales[j, g · group / block] · sub_scales[j, g], and likewise min[j, g] from mins and sub_mins;
// scales and mins are then float32 [n, k / block] and the sub-scales int8 [n, k / group]. Each product is an int8
// times a float16 value, exact in float32, so both layouts of the same values give the same bits. Without
// sub-scales, block == group.
struct QuantMatrix {
  const uint8_t* codes;
  const float* scales;
  const float* mins;
  const int8_t* sub_scales;
  const int8_t* sub_mins;
  int bits;
  int group;
  int block;
  int64_t n, k;
};

// Which weight of a chunk (0..127) is stored at position p: with w = group / 4 bytes of each group per 32-byte
// vector, position p = 32·v + t holds weight group · (t / w) + w · v + t % w.
constexpr int64_t chunk_position(int64_t p, int64_t group) {
  const int64_t w = group / 4, t = p % 32;
  return group * (t / w) + w * (p / 32) + t % w;
}

// Activations x[m, k] quantised per chunk (and stored in the codes' interleaved order): q[r, i] = round(x[r, i] / a[r, c]), a[r, c] = max|x[r, chunk c]| / 127,
// stored as int8, or as uint8 q + 128 where `offset` is set (what the AVX-512 VNNI path multiplies).
// gsum[r, g] = a[r, c(g)] · Σ_{i in group g} q[r, i], the input of the min term (only where the weights have mins).
struct QuantRows {
  const uint8_t* q;     // [m, k]
  const float* a;       // [m, k / kQuantChunk]
  const float* gsum;    // [m, k / group] or null
  int64_t m, k;
};

// The activation layout `isa` multiplies into codes of `bits`: whether q carries the +128 offset.
bool quant_offset(Isa isa, int bits);

// Quantise x[m, k] (float32 row-major) into q[m, k], a[m, k / kQuantChunk] and, if gsum is not null, gsum[m, k / group].
void quantize_activations(const float* x, int64_t m, int64_t k, int group, bool offset, uint8_t* q, float* a,
                          float* gsum);

// y[r, j] = Σ_i x[r, i] · w[j, i] (+ bias[j]) for r < m and output columns j in [n_begin, n_end), y row-major [m, n].
// Integer sums are exact (int32); each output's float reduction has one order for any m (batch-invariant per path).
void linear_quant(const QuantRows& x, const QuantMatrix& w, const float* bias, float* y, int64_t n_begin, int64_t n_end,
                  Isa isa);

}  // namespace specdec
