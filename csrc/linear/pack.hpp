// Weights into the quantised kernel's layout (quant.hpp): GGUF tensors value for value, and float weights quantised
// at load; and back out to floats. See pack.cpp.
#pragma once

#include <cstdint>

#include "linear/quant.hpp"

namespace specdec {

// Where the packed rows go: the QuantMatrix fields, as writable arrays of the shapes quant.hpp gives.
// Pointers a format does not use may be null.
struct PackOut {
  uint8_t* codes;
  float* scales;
  float* mins;
  int8_t* sub_scales;
  int8_t* sub_mins;
};

// The GGUF block types the kernel holds, by their ggml names.
enum class GgufType { kQ4_0, kQ5_0, kQ8_0, kQ4_K, kQ5_K, kQ6_K };

// raw: n rows of k / (weights per block) blocks each, as the file stores them. Simple types (Q4_0, Q5_0, Q8_0) write
// scales (and Q4_0 mins) [n, k / 32]; the K-quants write scales (and Q4_K/Q5_K mins) [n, k / 256] and sub_scales (and
// sub_mins) int8 [n, k / group]. Exact: every value is w = scale · code − min with the file's own numbers.
void repack_gguf(GgufType type, const uint8_t* raw, int64_t n, int64_t k, const PackOut& out);

// Float weights quantised in groups of 32 along k.
enum class QuantKind {
  kInt8,  // symmetric 8-bit: scale max|w| / 127, code round(w / scale)
  kQ4,    // 4-bit with a min: scale (max − min) / 15, code round((w − min) / scale), stored min −min
};

// w: float32 [n, k]; writes codes, scales [n, k / 32] and, for kQ4, mins [n, k / 32]. Rounds half to even, in float32,
// as torch.round of the same expressions does.
void quantize_weights(QuantKind kind, const float* w, int64_t n, int64_t k, const PackOut& out);

// A GGUF tensor (as repack_gguf reads it) quantised as `kind` (as quantize_weights writes it) in one pass: each row's
// values, exactly as stored, are quantised without a float copy of the tensor. The same bits as quantize_weights
// over the dequantised rows.
void requantize_gguf(GgufType type, const uint8_t* raw, int64_t n, int64_t k, QuantKind kind, const PackOut& out);

// And back out: rows [r0, r1) of w in weight order, out float32 (or bfloat16 where `bf16`) [r1 − r0, k], the values
// w = scale · code − min exactly (bfloat16: those rounded to nearest even). For a GEMM over many rows (a prefill).
void dequantize_rows(const QuantMatrix& w, int64_t r0, int64_t r1, void* out, bool bf16);

}  // namespace specdec
