// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011), the same generator as Random123 / curand / JAX.
//
// The kernels never keep generator state. Uniform number `index` of stream `stream` for a row with
// (seed, offset) is
//
//     (x0, x1, x2, x3) = Philox4x32_10(counter = (index, stream, lo32(offset), hi32(offset)),
//                                      key     = (lo32(seed), hi32(seed)))
//     u = ((uint64(x1) << 32 | x0) >> 11) * 2^-53            in [0, 1), 53 random bits
//
// so a row's randomness depends only on its own (seed, offset), never on the batch or on threads.
#pragma once
#include <cstdint>

namespace specdec {

struct Philox4x32 {
  static constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  static constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;

  static inline void round(uint32_t c[4], const uint32_t k[2]) {
    const uint64_t p0 = uint64_t(M0) * c[0];
    const uint64_t p1 = uint64_t(M1) * c[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k[0];
    const uint32_t n2 = hi0 ^ c[3] ^ k[1];
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }

  // Ten rounds; the key is bumped by the Weyl constants between rounds.
  static inline void generate(const uint32_t ctr_in[4], const uint32_t key_in[2], uint32_t out[4]) {
    uint32_t c[4] = {ctr_in[0], ctr_in[1], ctr_in[2], ctr_in[3]};
    uint32_t k[2] = {key_in[0], key_in[1]};
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        k[0] += W0;
        k[1] += W1;
      }
      round(c, k);
    }
    out[0] = c[0];
    out[1] = c[1];
    out[2] = c[2];
    out[3] = c[3];
  }
};

// Streams keep the kernels' uniforms apart even when a caller reuses (seed, offset) across kernels.
enum Stream : uint32_t { kStreamSample = 0, kStreamVerify = 1 };

inline void philox_words(uint64_t seed, uint64_t offset, uint32_t stream, uint32_t index, uint32_t out[4]) {
  const uint32_t ctr[4] = {index, stream, uint32_t(offset), uint32_t(offset >> 32)};
  const uint32_t key[2] = {uint32_t(seed), uint32_t(seed >> 32)};
  Philox4x32::generate(ctr, key, out);
}

inline double uniform(uint64_t seed, uint64_t offset, uint32_t stream, uint32_t index) {
  uint32_t w[4];
  philox_words(seed, offset, stream, index, w);
  const uint64_t bits = ((uint64_t(w[1]) << 32) | w[0]) >> 11;
  return double(bits) * 0x1.0p-53;
}

}  // namespace specdec
