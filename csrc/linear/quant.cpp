// Small-M linear over quantised weights: y[m, n] = x[m, k] · w[n, k]^T for the few rows of a decode or verify step
// (and, row block by row block, for a prefill).
//
// Every GGUF type this serves is a code per weight and a float scale (and min) per group of 16 or 32 weights
// (quant.hpp), so one kernel per code width covers them all. Activations are quantised to int8 per chunk of 128
// columns; each group's dot product is an exact int32 sum. The weights stream from memory once for all rows of a
// block, so up to kRowsPerPass rows cost about one row's memory traffic; every output is reduced in one order
// whatever m is (batch-invariant).
//
// With more than one row the kernel is bound by its per-row work, so each chunk is stored interleaved
// (chunk_position): every 4-byte lane of every 32-byte vector of the chunk holds weights of the same group, the
// integer products of all the chunk's vectors sum into one int32 vector, and the float work per row is one
// conversion, one scale and one accumulate per 128 weights. Activations are stored in the same order.
//
// Paths: AVX-512 VNNI multiplies 64 byte pairs per vpdpbusd, unsigned by signed: 4-bit codes (unsigned) by the
// activations; signed 8-bit codes by the activations offset by +128, removing the offset with 128·Σcode, which each
// weight chunk computes once for all rows. AVX2 has
// no such instruction: vpmaddubsw multiplies unsigned by signed bytes into int16 pairs, so signed codes pass their
// sign to the activations first (|c| · sign(q, c)), which keeps every pair sum below 2^15. The portable path sums
// the same integers in plain C++.
#include "linear/quant.hpp"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "linear/small_m.hpp"

namespace specdec {
namespace {

constexpr int64_t ROWS = kRowsPerPass;
constexpr int64_t CHUNK = kQuantChunk;

int64_t code_bytes_per_row(const QuantMatrix& w) { return w.k * w.bits / 8; }

// The group of the chunk whose weight is stored at position p (chunk_position): lane (p % 32) / 4 of a 32-byte
// vector holds group lane / (group / 16).
inline int64_t position_group(int64_t p, int64_t group) { return (p % 32) / (group / 4); }

// ---- portable ---------------------------------------------------------------------------------------------------

int code_at(const QuantMatrix& w, const uint8_t* row, int64_t p) {
  if (w.bits == 8) return static_cast<int8_t>(row[p]);
  const int64_t b = p % CHUNK;
  const uint8_t byte = row[(p / CHUNK) * (CHUNK / 2) + (b & 63)];
  return b < 64 ? byte & 15 : byte >> 4;
}

float dot_portable(const QuantRows& x, const QuantMatrix& w, int64_t j, const float* scales, int64_t r) {
  const int64_t k = x.k, groups_per_chunk = CHUNK / w.group;
  const uint8_t* codes = w.codes + j * code_bytes_per_row(w);
  const int8_t* q = reinterpret_cast<const int8_t*>(x.q + r * k);
  float acc = 0.0f;
  for (int64_t c = 0; c < k / CHUNK; ++c) {
    int32_t d[CHUNK / 16] = {};
    for (int64_t p = c * CHUNK; p < (c + 1) * CHUNK; ++p)
      d[position_group(p, w.group)] += int32_t(q[p]) * code_at(w, codes, p);
    float chunk = 0.0f;
    for (int64_t g = 0; g < groups_per_chunk; ++g) chunk += scales[c * groups_per_chunk + g] * static_cast<float>(d[g]);
    acc += chunk * x.a[r * (k / CHUNK) + c];
  }
  return acc;
}

float min_term_portable(const float* mins, const float* gsum, int64_t groups) {
  float t = 0.0f;
  for (int64_t g = 0; g < groups; ++g) t += mins[g] * gsum[g];
  return t;
}

// ---- AVX-512 VNNI -----------------------------------------------------------------------------------------------

#define SPECDEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// Rows [r0, r0 + MB) of x against weight row j: out[r] = Σ_c a[r, c] · Σ_lanes scale · (Σ q·c), without the min term.
// Lane L of the chunk's int32 sum holds group (L % 8) / (G / 16) (position_group).
template <int BITS, int G, int MB>
SPECDEC_AVX512 void block_avx512(const QuantRows& x, const QuantMatrix& w, int64_t j, const float* scales, int64_t r0,
                                 float* out) {
  const int64_t k = x.k, chunks = k / CHUNK;
  constexpr int64_t chunk_bytes = CHUNK * BITS / 8;
  const uint8_t* codes = w.codes + j * chunks * chunk_bytes;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80)), nibble = _mm512_set1_epi8(0x0F);
  const __m512i idx = G == 32 ? _mm512_set_epi32(3, 3, 2, 2, 1, 1, 0, 0, 3, 3, 2, 2, 1, 1, 0, 0)
                              : _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 acc[MB];
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* cc = codes + c * chunk_bytes;
    _mm_prefetch(reinterpret_cast<const char*>(cc + kPrefetchBytes), _MM_HINT_T1);
    __m512i v0, v1;
    if constexpr (BITS == 4) {
      const __m512i raw = _mm512_loadu_si512(cc);
      v0 = _mm512_and_si512(raw, nibble);
      v1 = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(cc + kPrefetchBytes + 64), _MM_HINT_T1);
      v0 = _mm512_loadu_si512(cc);
      v1 = _mm512_loadu_si512(cc + 64);
    }
    // 8-bit: Σ (q + 128)·c − 128·Σ c = Σ q·c, so each row's sum starts at −128·Σ c.
    __m512i n = _mm512_setzero_si512();
    if constexpr (BITS == 8) n = _mm512_sub_epi32(n, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(n, offset, v0), offset, v1));
    const __m512 s = G == 32 ? _mm512_castps128_ps512(_mm_loadu_ps(scales + c * 4))
                             : _mm512_castps256_ps512(_mm256_loadu_ps(scales + c * 8));
    const __m512 ws = _mm512_permutexvar_ps(idx, s);
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      const uint8_t* xr = x.q + (r0 + r) * k + c * CHUNK;
      const __m512i x0 = _mm512_loadu_si512(xr), x1 = _mm512_loadu_si512(xr + 64);
      const __m512i d = BITS == 4 ? _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(n, v0, x0), v1, x1)
                                  : _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(n, x0, v0), x1, v1);
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), ws), _mm512_set1_ps(x.a[(r0 + r) * chunks + c]), acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

SPECDEC_AVX512 float min_term_avx512(const float* mins, const float* gsum, int64_t groups) {
  __m512 t = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (groups - g)) - 1);
    t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, mins + g), _mm512_maskz_loadu_ps(mask, gsum + g), t);
  }
  return _mm512_reduce_add_ps(t);
}

// out[g] = super[g / PER] · sub[g], sixteen groups per vector (two blocks of 8, or one of 16).
template <int PER>
SPECDEC_AVX512 void expand_avx512(const float* super, const int8_t* sub, int64_t groups, float* out) {
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16(0x00FF);  // groups is a multiple of 8
    const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, sub + g)));
    __m512 top;
    if constexpr (PER == 16) {
      top = _mm512_set1_ps(super[g / 16]);
    } else {
      const int64_t b = g / 8;
      top = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(super[b]), _mm512_set1_ps(mask == 0xFFFF ? super[b + 1] : 0.0f));
    }
    _mm512_mask_storeu_ps(out + g, mask, _mm512_mul_ps(s, top));
  }
}

SPECDEC_AVX512 void expand_avx512(const float* super, const int8_t* sub, int64_t groups, int64_t per, float* out) {
  if (per == 16) return expand_avx512<16>(super, sub, groups, out);
  expand_avx512<8>(super, sub, groups, out);
}

// ---- AVX2 + FMA -------------------------------------------------------------------------------------------------

#define SPECDEC_AVX2 __attribute__((target("avx2,fma")))

SPECDEC_AVX2 inline float reduce_avx2(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

// As block_avx512, in four 32-weight vectors per chunk; lane l of each holds group l / (G / 16). The 4-bit products
// sum in int16 across the four vectors (at most 4 · 2 · 15 · 127 < 2^15) before one widening; the 8-bit ones
// widen first. At most 4 rows per call: more accumulators than that spill out of the 16 vector registers, and the
// weight chunk is still in L1 for the next call.
template <int BITS, int G, int MB>
SPECDEC_AVX2 void block_avx2(const QuantRows& x, const QuantMatrix& w, int64_t j, const float* scales, int64_t r0,
                             float* out) {
  const int64_t k = x.k, chunks = k / CHUNK;
  constexpr int64_t chunk_bytes = CHUNK * BITS / 8;
  const uint8_t* codes = w.codes + j * chunks * chunk_bytes;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  __m256 acc[MB];
#pragma GCC unroll 4
  for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint8_t* cc = codes + c * chunk_bytes;
    _mm_prefetch(reinterpret_cast<const char*>(cc + kPrefetchBytes), _MM_HINT_T1);
    __m256i v[4], mag[4];  // the chunk's four 32-byte vectors of codes; mag: |codes| for the signed ones
    if constexpr (BITS == 4) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cc));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cc + 32));
      v[0] = _mm256_and_si256(b0, nibble);
      v[1] = _mm256_and_si256(b1, nibble);
      v[2] = _mm256_and_si256(_mm256_srli_epi16(b0, 4), nibble);
      v[3] = _mm256_and_si256(_mm256_srli_epi16(b1, 4), nibble);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(cc + kPrefetchBytes + 64), _MM_HINT_T1);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cc + 32 * i));
        mag[i] = _mm256_abs_epi8(v[i]);
      }
    }
    const __m256 ws = G == 32 ? _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(scales + c * 4)), idx)
                              : _mm256_loadu_ps(scales + c * 8);
#pragma GCC unroll 4
    for (int r = 0; r < MB; ++r) {
      const uint8_t* xr = x.q + (r0 + r) * k + c * CHUNK;
      __m256i xq[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) xq[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32 * i));
      __m256i d;
      if constexpr (BITS == 4) {
        const __m256i p = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(v[0], xq[0]), _mm256_maddubs_epi16(v[1], xq[1])),
                                           _mm256_add_epi16(_mm256_maddubs_epi16(v[2], xq[2]), _mm256_maddubs_epi16(v[3], xq[3])));
        d = _mm256_madd_epi16(p, ones);
      } else {
        __m256i part[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) part[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(mag[i], _mm256_sign_epi8(xq[i], v[i])), ones);
        d = _mm256_add_epi32(_mm256_add_epi32(part[0], part[1]), _mm256_add_epi32(part[2], part[3]));
      }
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), ws), _mm256_set1_ps(x.a[(r0 + r) * chunks + c]), acc[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MB; ++r) out[r] = reduce_avx2(acc[r]);
}

// out[g] = super[g / per] · sub[g] for per = block / group in {8, 16}, eight groups per vector.
SPECDEC_AVX2 void expand_avx2(const float* super, const int8_t* sub, int64_t groups, int64_t per, float* out) {
  for (int64_t b = 0; b < groups / per; ++b) {
    const __m256 top = _mm256_set1_ps(super[b]);
    for (int64_t g = b * per; g < (b + 1) * per; g += 8) {
      const __m256i s = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sub + g)));
      _mm256_storeu_ps(out + g, _mm256_mul_ps(_mm256_cvtepi32_ps(s), top));
    }
  }
}

SPECDEC_AVX2 float min_term_avx2(const float* mins, const float* gsum, int64_t groups) {
  __m256 t = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) t = _mm256_fmadd_ps(_mm256_loadu_ps(mins + g), _mm256_loadu_ps(gsum + g), t);
  float tail = 0.0f;
  for (; g < groups; ++g) tail += mins[g] * gsum[g];
  return reduce_avx2(t) + tail;
}

// ---- dispatch ---------------------------------------------------------------------------------------------------

using BlockFn = void (*)(const QuantRows&, const QuantMatrix&, int64_t, const float*, int64_t, float*);

#define SPECDEC_BLOCK_TABLE(NAME, FN)                                                                        \
  template <int BITS, int G>                                                                                  \
  BlockFn NAME(int64_t rows) {                                                                                \
    static const BlockFn table[ROWS] = {FN<BITS, G, 1>, FN<BITS, G, 2>, FN<BITS, G, 3>, FN<BITS, G, 4>,       \
                                        FN<BITS, G, 5>, FN<BITS, G, 6>, FN<BITS, G, 7>, FN<BITS, G, 8>};      \
    return table[rows - 1];                                                                                   \
  }
SPECDEC_BLOCK_TABLE(avx512_block, block_avx512)
#undef SPECDEC_BLOCK_TABLE

template <int BITS, int G>
BlockFn avx2_block(int64_t rows) {
  static const BlockFn table[4] = {block_avx2<BITS, G, 1>, block_avx2<BITS, G, 2>, block_avx2<BITS, G, 3>,
                                   block_avx2<BITS, G, 4>};
  return table[rows - 1];
}

void expand_portable(const float* super, const int8_t* sub, int64_t groups, int64_t per, float* out) {
  for (int64_t g = 0; g < groups; ++g) out[g] = super[g / per] * static_cast<float>(sub[g]);
}

struct Path {
  BlockFn (*block)(int64_t rows);  // null: the portable loop
  int64_t rows_per_call;
  float (*min_term)(const float*, const float*, int64_t);
  void (*expand)(const float*, const int8_t*, int64_t, int64_t, float*);  // two-level scales → one float per group
};

template <int BITS, int G>
Path path_for(Isa isa) {
  if (isa == Isa::kAvx512) return {avx512_block<BITS, G>, ROWS, min_term_avx512, expand_avx512};
  if (isa == Isa::kAvx2) return {avx2_block<BITS, G>, 4, min_term_avx2, expand_avx2};
  return {nullptr, ROWS, min_term_portable, expand_portable};
}

Path path_for(const QuantMatrix& w, Isa isa) {
  if (w.bits == 4) return path_for<4, 32>(isa);
  if (w.group == 16) return path_for<8, 16>(isa);
  return path_for<8, 32>(isa);
}

// ---- activations ------------------------------------------------------------------------------------------------

// qc[i] = round(x[i] / s), s = max|x| / 127 over a chunk; returns s.
float round_chunk(const float* x, int8_t* qc) {
  float amax = 0.0f;
  for (int64_t i = 0; i < CHUNK; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  for (int64_t i = 0; i < CHUNK; ++i) qc[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] / s))));
  return s;
}

// round_chunk eight lanes at a time: the same division and round-to-nearest-even, so the same bits.
SPECDEC_AVX2 float round_chunk_avx2(const float* x, int8_t* qc) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t i = 0; i < CHUNK; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  for (int64_t i = 0; i < CHUNK; i += 8) {
    const __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v))));
    for (int j = 0; j < 8; ++j) qc[i + j] = static_cast<int8_t>(t[j]);
  }
  return s;
}

// chunk_position(p, G) for every p, computed once.
template <int G>
const uint8_t* chunk_positions() {
  static const auto table = [] {
    std::array<uint8_t, CHUNK> t{};
    for (int64_t p = 0; p < CHUNK; ++p) t[p] = static_cast<uint8_t>(chunk_position(p, G));
    return t;
  }();
  return table.data();
}

}  // namespace

bool quant_offset(Isa isa, int bits) { return isa == Isa::kAvx512 && bits == 8; }

void quantize_activations(const float* x, int64_t m, int64_t k, int group, bool offset, uint8_t* q, float* a,
                          float* gsum) {
  static const bool vector = cpu_supports(Isa::kAvx2);  // the same bits as the scalar loop, faster
  const auto position = group == 16 ? chunk_positions<16>() : chunk_positions<32>();
  const uint8_t flip = offset ? 0x80 : 0x00;
  const int64_t chunks = k / CHUNK;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < chunks; ++c) {
      int8_t qc[CHUNK];
      const float s = vector ? round_chunk_avx2(x + r * k + c * CHUNK, qc) : round_chunk(x + r * k + c * CHUNK, qc);
      a[r * chunks + c] = s;
      uint8_t* out = q + r * k + c * CHUNK;
      for (int64_t p = 0; p < CHUNK; ++p) out[p] = static_cast<uint8_t>(qc[position[p]]) ^ flip;
      if (gsum) {
        for (int64_t g = 0; g < CHUNK / group; ++g) {
          int32_t sum = 0;
          for (int64_t i = g * group; i < (g + 1) * group; ++i) sum += qc[i];
          gsum[r * (k / group) + c * (CHUNK / group) + g] = s * static_cast<float>(sum);
        }
      }
    }
  }
}

void linear_quant(const QuantRows& x, const QuantMatrix& w, const float* bias, float* y, int64_t n_begin, int64_t n_end,
                  Isa isa) {
  const Path path = path_for(w, isa);
  const int64_t groups = w.k / w.group, blocks = w.k / w.block, per = w.block / w.group;
  // One weight row's scales and mins expanded from the two-level layout, shared by every row of x.
  std::vector<float> expanded(w.sub_scales ? (w.mins ? 2 : 1) * groups : 0);
  float out[ROWS];
  for (int64_t j = n_begin; j < n_end; ++j) {
    const float b = bias ? bias[j] : 0.0f;
    const float* scales = w.scales + j * groups;
    const float* mins = w.mins ? w.mins + j * groups : nullptr;
    if (w.sub_scales) {
      for (int64_t off = 0; off < groups; off += 64) {  // the next row's sub-scales: small streams the prefetchers miss
        _mm_prefetch(reinterpret_cast<const char*>(w.sub_scales + (j + 1) * groups + off), _MM_HINT_T0);
        if (w.mins) _mm_prefetch(reinterpret_cast<const char*>(w.sub_mins + (j + 1) * groups + off), _MM_HINT_T0);
      }
      path.expand(w.scales + j * blocks, w.sub_scales + j * groups, groups, per, expanded.data());
      scales = expanded.data();
      if (w.mins) {
        path.expand(w.mins + j * blocks, w.sub_mins + j * groups, groups, per, expanded.data() + groups);
        mins = expanded.data() + groups;
      }
    }
    for (int64_t r0 = 0; r0 < x.m; r0 += path.rows_per_call) {
      const int64_t rows = std::min(path.rows_per_call, x.m - r0);
      if (path.block) {
        path.block(rows)(x, w, j, scales, r0, out);
      } else {
        for (int64_t r = 0; r < rows; ++r) out[r] = dot_portable(x, w, j, scales, r0 + r);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float v = out[r];
        if (mins) v -= path.min_term(mins, x.gsum + (r0 + r) * groups, groups);
        y[(r0 + r) * w.n + j] = v + b;
      }
    }
  }
}

}  // namespace specdec
