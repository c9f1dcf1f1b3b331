// Weights → the quantised kernel's layout. A model's worth of tensors passes through here at every start, so it runs
// in C++, in one pass over each row (numpy's many passes over the same bytes took seconds per model).
//
// Each block is decoded as ggml stores it (ggml-common.h's block_q4_0 ... block_q6_K):
//   Q4_0  d, 16 bytes of nibbles        code = q (0..15),   scale d, min 8·d
//   Q5_0  d, 32 high bits, 16 bytes      code = q − 16,      scale d
//   Q8_0  d, 32 int8                     code = q,           scale d
//   Q4_K  d, dmin, 12 bytes of 6-bit sub-scales and sub-mins, 128 bytes of nibbles: code = q, scale d·sc, min dmin·m
//   Q5_K  as Q4_K with 32 bytes of high bits before the nibbles: code = q (0..31)
//   Q6_K  128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 sub-scales, d: code = q − 32, scale d·sc
// then written in the kernel's chunk order (chunk_position), 4-bit codes two to a byte. Float weights are quantised
// with the same rounding as torch.round, row by row, and stored the same way.
#include "linear/pack.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/threadpool.hpp"
#include "kernels/vec.hpp"
#include "linear/quant.hpp"

namespace specdec {
namespace {

struct Format {
  int64_t block_bytes, per_block;
  int bits, group;
  bool two_level;
};

Format format_of(GgufType t) {
  switch (t) {
    case GgufType::kQ4_0: return {18, 32, 4, 32, false};
    case GgufType::kQ5_0: return {22, 32, 8, 32, false};
    case GgufType::kQ8_0: return {34, 32, 8, 32, false};
    case GgufType::kQ4_K: return {144, 256, 4, 32, true};
    case GgufType::kQ5_K: return {176, 256, 8, 32, true};
    case GgufType::kQ6_K: return {210, 256, 8, 16, true};
  }
  return {};
}

// IEEE half → float, exactly (every half is a float).
float half(const uint8_t* p) {
  const uint32_t h = uint32_t(p[0]) | uint32_t(p[1]) << 8;
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (exp == 31 ? 0x7F800000u | mant << 13 : (exp + 112) << 23 | mant << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The 8 six-bit sub-scales and sub-mins of a Q4_K/Q5_K block from its 12 packed bytes.
void k_scales(const uint8_t* s, int8_t* sc, int8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = static_cast<int8_t>(s[j] & 63);
    mn[j] = static_cast<int8_t>(s[4 + j] & 63);
    sc[4 + j] = static_cast<int8_t>((s[8 + j] & 15) | (s[j] >> 6) << 4);
    mn[4 + j] = static_cast<int8_t>((s[8 + j] >> 4) | (s[4 + j] >> 6) << 4);
  }
}

// One block → its codes in weight order, and its scales in the row's arrays at block index b.
void decode_block(GgufType t, const uint8_t* blk, int64_t b, int8_t* code, float* scales, float* mins, int8_t* sub,
                  int8_t* sub_min) {
  switch (t) {
    case GgufType::kQ4_0: {
      const float d = half(blk);
      scales[b] = d;
      mins[b] = 8.0f * d;
      for (int i = 0; i < 16; ++i) {
        code[i] = static_cast<int8_t>(blk[2 + i] & 15);
        code[16 + i] = static_cast<int8_t>(blk[2 + i] >> 4);
      }
      return;
    }
    case GgufType::kQ5_0: {
      scales[b] = half(blk);
      const uint32_t high = uint32_t(blk[2]) | uint32_t(blk[3]) << 8 | uint32_t(blk[4]) << 16 | uint32_t(blk[5]) << 24;
      for (int i = 0; i < 16; ++i) {
        code[i] = static_cast<int8_t>(((blk[6 + i] & 15) | ((high >> i) & 1) << 4) - 16);
        code[16 + i] = static_cast<int8_t>(((blk[6 + i] >> 4) | ((high >> (16 + i)) & 1) << 4) - 16);
      }
      return;
    }
    case GgufType::kQ8_0:
      scales[b] = half(blk);
      std::memcpy(code, blk + 2, 32);
      return;
    case GgufType::kQ4_K:
    case GgufType::kQ5_K: {
      scales[b] = half(blk);
      mins[b] = half(blk + 2);
      k_scales(blk + 4, sub + 8 * b, sub_min + 8 * b);
      const bool five = t == GgufType::kQ5_K;
      const uint8_t* qh = blk + 16;
      const uint8_t* qs = blk + (five ? 48 : 16);
      for (int s = 0; s < 4; ++s) {  // 64 weights per span: 32 low nibbles, then 32 high
        for (int i = 0; i < 32; ++i) {
          int lo = qs[32 * s + i] & 15, hi = qs[32 * s + i] >> 4;
          if (five) {
            lo |= ((qh[i] >> (2 * s)) & 1) << 4;
            hi |= ((qh[i] >> (2 * s + 1)) & 1) << 4;
          }
          code[64 * s + i] = static_cast<int8_t>(lo);
          code[64 * s + 32 + i] = static_cast<int8_t>(hi);
        }
      }
      return;
    }
    case GgufType::kQ6_K: {
      const uint8_t *ql = blk, *qh = blk + 128;
      std::memcpy(sub + 16 * b, blk + 192, 16);
      scales[b] = half(blk + 208);
      for (int h = 0; h < 2; ++h) {  // 128 weights per half: 64 low nibbles, then 64 high; 2 high bits each
        for (int i = 0; i < 64; ++i) {
          const int s_lo = i / 32, s_hi = 2 + i / 32, j = i % 32;
          const int lo = (ql[64 * h + i] & 15) | ((qh[32 * h + j] >> (2 * s_lo)) & 3) << 4;
          const int hi = (ql[64 * h + i] >> 4) | ((qh[32 * h + j] >> (2 * s_hi)) & 3) << 4;
          code[128 * h + i] = static_cast<int8_t>(lo - 32);
          code[128 * h + 64 + i] = static_cast<int8_t>(hi - 32);
        }
      }
      return;
    }
  }
}

// A row's codes (weight order) → dst in the kernel's chunk order (chunk_position), 4-bit codes two to a byte.
void store_row(const int8_t* code, int64_t k, int bits, int group, uint8_t* dst) {
  static const auto positions = [] {
    std::array<std::array<uint8_t, kQuantChunk>, 2> t{};  // groups 16 and 32
    for (int64_t p = 0; p < kQuantChunk; ++p) {
      t[0][p] = static_cast<uint8_t>(chunk_position(p, 16));
      t[1][p] = static_cast<uint8_t>(chunk_position(p, 32));
    }
    return t;
  }();
  const uint8_t* position = positions[group == 32].data();
  for (int64_t c = 0; c < k / kQuantChunk; ++c) {
    const int8_t* chunk = code + c * kQuantChunk;
    if (bits == 4) {
      for (int64_t b = 0; b < kQuantChunk / 2; ++b)
        dst[c * kQuantChunk / 2 + b] = static_cast<uint8_t>(chunk[position[b]] | chunk[position[64 + b]] << 4);
    } else {
      for (int64_t p = 0; p < kQuantChunk; ++p) dst[c * kQuantChunk + p] = static_cast<uint8_t>(chunk[position[p]]);
    }
  }
}

// fn(row, scratch) for every row in [0, n), rows in parallel on the kernels' pool; scratch holds k codes.
template <class Fn>
void for_rows(int64_t n, int64_t k, const Fn& fn) {
  constexpr int64_t kRowsPerTask = 64;
  parallel_run((n + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
    std::vector<int8_t> code(k);
    for (int64_t j = task * kRowsPerTask; j < std::min(n, (task + 1) * kRowsPerTask); ++j) fn(j, code.data());
  });
}

// Row j of float weights x[k] → its codes (via scratch `code`) and scales (and mins) in `out`, groups of 32.
// Cloned per ISA so that rounding is one instruction rather than a libm call; every clone gives the same bits.
SD_CLONES void quantize_row(QuantKind kind, const float* x, int64_t k, int64_t j, int8_t* code, const PackOut& out) {
  constexpr int64_t G = 32;
  for (int64_t g = 0; g < k / G; ++g) {
    const float* v = x + g * G;
    float lo = v[0], hi = v[0], amax = 0.0f;
    for (int64_t i = 0; i < G; ++i) {
      lo = std::min(lo, v[i]);
      hi = std::max(hi, v[i]);
      amax = std::max(amax, std::fabs(v[i]));
    }
    int8_t* c = code + g * G;
    if (kind == QuantKind::kQ4) {
      float s = (hi - lo) / 15.0f;
      s = s > 0.0f ? s : 1.0f;
      for (int64_t i = 0; i < G; ++i) c[i] = static_cast<int8_t>(std::clamp(std::nearbyint((v[i] - lo) / s), 0.0f, 15.0f));
      out.scales[j * (k / G) + g] = s;
      out.mins[j * (k / G) + g] = -lo;
    } else {
      float s = amax / 127.0f;
      s = s > 0.0f ? s : 1.0f;
      for (int64_t i = 0; i < G; ++i) c[i] = static_cast<int8_t>(std::clamp(std::nearbyint(v[i] / s), -127.0f, 127.0f));
      out.scales[j * (k / G) + g] = s;
    }
  }
  const int bits = kind == QuantKind::kQ4 ? 4 : 8;
  store_row(code, k, bits, static_cast<int>(G), out.codes + j * (k * bits / 8));
}

}  // namespace

void repack_gguf(GgufType type, const uint8_t* raw, int64_t n, int64_t k, const PackOut& out) {
  const Format f = format_of(type);
  const int64_t blocks = k / f.per_block, row_bytes = blocks * f.block_bytes, code_bytes = k * f.bits / 8;
  const int64_t groups = k / f.group;
  const auto repack_row = [&](int64_t j, int8_t* code) {  // code: scratch for the row's codes in weight order
    float* scales = out.scales + j * blocks;
    float* mins = out.mins ? out.mins + j * blocks : nullptr;
    int8_t* sub = out.sub_scales ? out.sub_scales + j * groups : nullptr;
    int8_t* sub_min = out.sub_mins ? out.sub_mins + j * groups : nullptr;
    for (int64_t b = 0; b < blocks; ++b)
      decode_block(type, raw + j * row_bytes + b * f.block_bytes, b, code + b * f.per_block, scales, mins, sub, sub_min);
    store_row(code, k, f.bits, f.group, out.codes + j * code_bytes);
  };
  for_rows(n, k, repack_row);
}

void quantize_weights(QuantKind kind, const float* w, int64_t n, int64_t k, const PackOut& out) {
  for_rows(n, k, [&](int64_t j, int8_t* code) { quantize_row(kind, w + j * k, k, j, code, out); });
}

void requantize_gguf(GgufType type, const uint8_t* raw, int64_t n, int64_t k, QuantKind kind, const PackOut& out) {
  const Format f = format_of(type);
  const int64_t blocks = k / f.per_block, groups = k / f.group;
  for_rows(n, k, [&](int64_t j, int8_t* code) {
    std::vector<float> scales(blocks), mins(blocks), values(k);
    std::vector<int8_t> sub(groups), sub_min(groups);
    const uint8_t* row = raw + j * blocks * f.block_bytes;
    for (int64_t b = 0; b < blocks; ++b)
      decode_block(type, row + b * f.block_bytes, b, code + b * f.per_block, scales.data(), mins.data(), sub.data(),
                   sub_min.data());
    const bool with_mins = type == GgufType::kQ4_0 || type == GgufType::kQ4_K || type == GgufType::kQ5_K;
    for (int64_t g = 0; g < groups; ++g) {  // the values QuantWeight.dequantize gives: code · scale − min
      const int64_t b = g * f.group / f.per_block;
      const float scale = f.two_level ? scales[b] * static_cast<float>(sub[g]) : scales[b];
      const float min = !with_mins ? 0.0f : f.two_level ? mins[b] * static_cast<float>(sub_min[g]) : mins[b];
      for (int64_t i = g * f.group; i < (g + 1) * f.group; ++i) values[i] = static_cast<float>(code[i]) * scale - min;
    }
    quantize_row(kind, values.data(), k, j, code, out);
  });
}

namespace {

// Row j of w in weight order, the values QuantWeight.dequantize gives (code · scale − min, in float32). The codes
// are first put back in weight order (chunk_position moves runs of group / 4 bytes), so that the arithmetic runs
// over contiguous groups and vectorises.
SD_CLONES void dequantize_row(const QuantMatrix& w, int64_t j, int8_t* code, float* out) {
  const int64_t groups = w.k / w.group, blocks = w.k / w.block, per = w.block / w.group, run = w.group / 4;
  const uint8_t* codes = w.codes + j * (w.k * w.bits / 8);
  for (int64_t c = 0; c < w.k / kQuantChunk; ++c) {
    int8_t stored[kQuantChunk];
    if (w.bits == 4) {
      const uint8_t* b = codes + c * kQuantChunk / 2;
      for (int64_t i = 0; i < kQuantChunk / 2; ++i) {
        stored[i] = static_cast<int8_t>(b[i] & 15);
        stored[kQuantChunk / 2 + i] = static_cast<int8_t>(b[i] >> 4);
      }
    } else {
      std::memcpy(stored, codes + c * kQuantChunk, kQuantChunk);
    }
    for (int64_t p = 0; p < kQuantChunk; p += run)  // a run of `run` stored bytes is a run of weights
      std::memcpy(code + c * kQuantChunk + chunk_position(p, w.group), stored + p, static_cast<size_t>(run));
  }
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = w.sub_scales ? w.scales[j * blocks + g / per] * static_cast<float>(w.sub_scales[j * groups + g])
                                     : w.scales[j * groups + g];
    const float min = !w.mins ? 0.0f
                      : w.sub_mins ? w.mins[j * blocks + g / per] * static_cast<float>(w.sub_mins[j * groups + g])
                                   : w.mins[j * groups + g];
    const int8_t* cg = code + g * w.group;
    float* og = out + g * w.group;
    for (int64_t i = 0; i < w.group; ++i) og[i] = static_cast<float>(cg[i]) * scale - min;
  }
}

// float32 → bfloat16, rounding to nearest even (as torch's conversion does; weights are finite).
SD_CLONES void to_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    out[i] = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  }
}

}  // namespace

void dequantize_rows(const QuantMatrix& w, int64_t r0, int64_t r1, void* out, bool bf16) {
  constexpr int64_t kRowsPerTask = 16;
  parallel_run((r1 - r0 + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
    std::vector<float> row(bf16 ? w.k : 0);
    std::vector<int8_t> code(w.k);
    for (int64_t j = r0 + task * kRowsPerTask; j < std::min(r1, r0 + (task + 1) * kRowsPerTask); ++j) {
      if (!bf16) {
        dequantize_row(w, j, code.data(), static_cast<float*>(out) + (j - r0) * w.k);
        continue;
      }
      dequantize_row(w, j, code.data(), row.data());
      to_bf16(row.data(), w.k, static_cast<uint16_t*>(out) + (j - r0) * w.k);
    }
  });
}

}  // namespace specdec
