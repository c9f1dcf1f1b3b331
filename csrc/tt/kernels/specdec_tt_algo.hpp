// SPDX-License-Identifier: Apache-2.0
// specdec tt-metal kernels: the integer part of the acceptance/sampling algorithm.
//
// Pure C++17 on <stdint.h> only, so the same source is compiled three ways: into the RISC-V
// dataflow kernels (reader.cpp, writer.cpp), and on the host by tests/tt (csrc/tt/host/algo_harness.cpp)
// where it is checked bit for bit against the numpy model python/specdec/tt/model.py.
//
// Everything here works on bit patterns: e (fp32, >= 0) compares as its uint32 bits, masses are
// fixed point floor(e * 2^32) in uint64, so every sum is exact and independent of the order in which
// cores add it.  See model.py for the algorithm in words.
#pragma once

#include <stdint.h>

namespace specdec_tt {

constexpr uint32_t TILE = 32;
constexpr uint32_t TILE_ELEMS = 1024;
constexpr uint32_t ROWS = 32;  // rows per tile-row: one sync step handles 32 rows
constexpr uint32_t RADIX_BITS = 4;
constexpr uint32_t RADIX = 1u << RADIX_BITS;
constexpr uint32_t ROUNDS = 32 / RADIX_BITS;
constexpr uint32_t NO_TOKEN = 0xFFFFFFFFu;
constexpr uint32_t NO_WORKER = 0xFFFFFFFFu;

// Circular buffers (the Python builder python/specdec/tt/program.py parses these lines).
constexpr uint32_t CB_X = 0;         // logits tiles, streamed (reader -> compute), 2 pages
constexpr uint32_t CB_XMAX = 1;      // fp32 tile, row max broadcast over columns (writer -> compute)
constexpr uint32_t CB_INVT = 2;      // fp32 tile, row 1/T broadcast over columns (reader -> compute)
constexpr uint32_t CB_PARAMS = 3;    // 32 parameter records of 64 bytes (reader -> writer)
constexpr uint32_t CB_LOCALMAX = 4;  // 32 x {key, column} (reader -> writer)
constexpr uint32_t CB_Q = 5;         // fp32 draft-probability tiles of the slice, resident (reader -> writer)
constexpr uint32_t CB_E = 16;        // fp32 e tiles of the slice, resident (compute -> writer)
constexpr uint32_t CB_MAILBOX = 24;  // aggregator: n_workers records of REC_BYTES
constexpr uint32_t CB_RESULT = 25;   // aggregator -> worker result block, RES_BYTES
constexpr uint32_t CB_REC = 26;      // worker's outgoing record, REC_BYTES
constexpr uint32_t CB_ROWRES = 27;   // aggregator: {accept, token} for every row of the call
constexpr uint32_t CB_OUT = 28;      // aggregator: one output row staging page
constexpr uint32_t CB_SCRATCH = 29;  // aggregator: its per-row search state (kept off the small RISC-V stack)
constexpr uint32_t SCRATCH_BYTES = 8192;

// Per-row parameter record written by the host (uint32 words; one 64-byte page per row).
enum ParamWord : uint32_t {
    P_VALID = 0,   // 1 for a real row, 0 for padding
    P_GREEDY = 1,  // temperature == 0
    P_INVT = 2,    // fp32 bits of 1/T (1.0 on greedy rows)
    P_TOPK = 3,    // 0 = off
    P_TOPP = 4,    // fp32 bits of top_p; 1.0 = off
    P_MINP = 5,    // fp32 bits of min_p; 0 = off
    P_MODE = 6,    // MODE_*
    P_DRAFT = 7,   // draft token of the row (NO_TOKEN when none)
    P_UACC = 8,    // accept uniform as floor(u * 2^32)
    P_USMP = 9,    // sample uniform as floor(u * 2^32)
    P_WORDS = 16,
};
enum Mode : uint32_t { MODE_SKIP = 0, MODE_PLAIN = 1, MODE_RESIDUAL = 2 };

// Worker -> aggregator record: per row, at most REC_ROW_WORDS words (the radix histogram is largest).
constexpr uint32_t REC_ROW_WORDS = RADIX * 3;
constexpr uint32_t REC_WORDS = ROWS * REC_ROW_WORDS;
constexpr uint32_t REC_BYTES = REC_WORDS * 4;
// Aggregator -> worker result: 8 words per row.
constexpr uint32_t RES_ROW_WORDS = 8;
constexpr uint32_t RES_BYTES = ROWS * RES_ROW_WORDS * 4;

inline uint32_t tile_offset(uint32_t r, uint32_t c) {
    // 32x32 tile = four 16x16 faces in row-major face order, each face row-major.
    return (((r >> 4) << 1) + (c >> 4)) * 256u + ((r & 15u) << 4) + (c & 15u);
}

inline uint32_t order_key(uint32_t bits) {
    if (bits == 0x80000000u) {
        bits = 0;  // -0.0 ranks as +0.0
    }
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// floor(v * 2^32) for an fp32 v in [0, 1], from its bits.
inline uint64_t fixed32(uint32_t bits) {
    const uint32_t ex = (bits >> 23) & 0xFFu;
    if (ex == 0) {
        return 0;
    }
    const uint64_t mant = (bits & 0x7FFFFFu) | 0x800000u;
    const int32_t s = static_cast<int32_t>(ex) - 118;
    if (s >= 0) {
        return mant << s;
    }
    if (s <= -24) {
        return 0;
    }
    return mant >> (-s);
}

// floor(a * big / 2^32) for a <= 2^32, big < 2^50, from 32x32-bit pieces.
inline uint64_t mulhi(uint64_t a, uint64_t big) {
    if (a >= (uint64_t(1) << 32)) {
        return big;
    }
    const uint64_t hi = big >> 32;
    const uint64_t lo = big & 0xFFFFFFFFull;
    return a * hi + ((a * lo) >> 32);
}

// fp32 product of two fp32 bit patterns (soft-float on the data-movement cores; IEEE, nearest even).
inline uint32_t f32_mul_bits(uint32_t a, uint32_t b) {
    float fa, fb;
    __builtin_memcpy(&fa, &a, 4);
    __builtin_memcpy(&fb, &b, 4);
    const float r = fa * fb;
    uint32_t o;
    __builtin_memcpy(&o, &r, 4);
    return o;
}

inline uint64_t join64(uint32_t lo, uint32_t hi) { return (uint64_t(hi) << 32) | lo; }
inline void split64(uint64_t v, volatile uint32_t* lo_hi) {
    lo_hi[0] = uint32_t(v);
    lo_hi[1] = uint32_t(v >> 32);
}

// A worker's view of one tile-row of its vocabulary slice: n_tiles resident tiles of 32 bit words
// (fp32 bit patterns), covering vocabulary columns [first_col, first_col + 32 * n_tiles) clipped to V.
struct Slice {
    const volatile uint32_t* tiles;
    uint32_t n_tiles;
    uint32_t first_col;
    uint32_t vocab;
    inline uint32_t cols() const {
        const uint32_t end = first_col + n_tiles * TILE;
        return (end > vocab ? vocab : end) - first_col;
    }
    inline uint32_t at(uint32_t r, uint32_t j) const {  // j = column within the slice
        return tiles[(j >> 5) * TILE_ELEMS + tile_offset(r, j & 31u)];
    }
};

// ---- phase 1 (reader): local max of one logits tile, lowest column on ties -------------------------
// tile: 1024 elements of the logits tile, fp32 bits (bf16 inputs widened by << 16).
// best_key/best_col hold the running result for each of the 32 rows.
// Only the first nrows rows (the real ones) are visited.
template <typename Load>
inline void tile_max(Load load, uint32_t col0, uint32_t vocab, uint32_t nrows, uint32_t* best_key, uint32_t* best_col) {
    for (uint32_t r = 0; r < nrows; ++r) {
        for (uint32_t c = 0; c < TILE && col0 + c < vocab; ++c) {
            const uint32_t k = order_key(load(tile_offset(r, c)));
            if (k > best_key[r] || (k == best_key[r] && col0 + c < best_col[r])) {
                best_key[r] = k;
                best_col[r] = col0 + c;
            }
        }
    }
}

// Aggregator: merge per-worker (key, col) in worker order; the lowest column wins ties.
inline void merge_max(const volatile uint32_t* rec, uint32_t n_workers, uint32_t rec_stride_words, uint32_t r,
                      uint32_t* key, uint32_t* col) {
    *key = 0;
    *col = NO_TOKEN;
    for (uint32_t w = 0; w < n_workers; ++w) {
        const volatile uint32_t* p = rec + w * rec_stride_words + r * 2;
        if (p[1] == NO_TOKEN) {
            continue;
        }
        if (p[0] > *key || (p[0] == *key && p[1] < *col)) {
            *key = p[0];
            *col = p[1];
        }
    }
}

inline uint32_t key_to_bits(uint32_t key) { return (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key; }

// ---- phase 3: radix search ------------------------------------------------------------------------
// Histogram of the next 4-bit digit among the row's elements with bits >= min_key whose higher digits
// equal those of prefix.  out: RADIX x {count, mass lo, mass hi}.
inline void row_hist(const Slice& s, uint32_t r, uint32_t round, uint32_t prefix, uint32_t min_key,
                     volatile uint32_t* out) {
    uint32_t cnt[RADIX];
    uint64_t mass[RADIX];
    for (uint32_t d = 0; d < RADIX; ++d) {
        cnt[d] = 0;
        mass[d] = 0;
    }
    const uint32_t shift = 32 - RADIX_BITS * (round + 1);
    const uint32_t hi = 32 - RADIX_BITS * round;
    const uint32_t n = s.cols();
    for (uint32_t j = 0; j < n; ++j) {
        const uint32_t b = s.at(r, j);
        if (b < min_key) {
            continue;
        }
        if (round > 0 && (b >> hi) != (prefix >> hi)) {
            continue;
        }
        const uint32_t d = (b >> shift) & (RADIX - 1);
        cnt[d] += 1;
        mass[d] += fixed32(b);
    }
    for (uint32_t d = 0; d < RADIX; ++d) {
        out[3 * d] = cnt[d];
        split64(mass[d], out + 3 * d + 1);
    }
}

// Aggregator state of one row's search.
struct Search {
    uint32_t prefix;
    uint64_t rem;    // count (or mass) still to find below the chosen prefix
    uint64_t above;  // mass of elements strictly above the prefix so far
    uint64_t at;     // mass of elements equal to the chosen digit at the last round
    uint64_t total;  // mass of all matching elements at round 0
};

inline void search_begin(Search* st, uint64_t target) {
    st->prefix = 0;
    st->rem = target;
    st->above = 0;
    st->at = 0;
    st->total = 0;
}

// Merge the workers' histograms (worker order) and choose this round's digit.
inline void search_step(Search* st, const volatile uint32_t* rec, uint32_t n_workers, uint32_t rec_stride_words,
                        uint32_t r, uint32_t round, bool by_mass) {
    uint64_t cnt[RADIX];
    uint64_t mass[RADIX];
    for (uint32_t d = 0; d < RADIX; ++d) {
        cnt[d] = 0;
        mass[d] = 0;
    }
    for (uint32_t w = 0; w < n_workers; ++w) {
        const volatile uint32_t* p = rec + w * rec_stride_words + r * REC_ROW_WORDS;
        for (uint32_t d = 0; d < RADIX; ++d) {
            cnt[d] += p[3 * d];
            mass[d] += join64(p[3 * d + 1], p[3 * d + 2]);
        }
    }
    if (round == 0) {
        for (uint32_t d = 0; d < RADIX; ++d) {
            st->total += mass[d];
        }
    }
    uint64_t acc = 0, acc_mass = 0;
    uint32_t chosen = 0;
    uint64_t metric_above = 0, mass_above = 0;
    bool found = false;
    for (int32_t d = RADIX - 1; d >= 0; --d) {
        const uint64_t m = by_mass ? mass[d] : cnt[d];
        if (acc + m >= st->rem) {
            chosen = uint32_t(d);
            metric_above = acc;
            mass_above = acc_mass;
            found = true;
            break;
        }
        acc += m;
        acc_mass += mass[d];
    }
    if (!found) {  // unreachable for valid targets; mirrors the model's fallback to digit 0
        chosen = 0;
        metric_above = acc - (by_mass ? mass[0] : cnt[0]);
        mass_above = acc_mass - mass[0];
    }
    const uint32_t shift = 32 - RADIX_BITS * (round + 1);
    st->rem -= metric_above;
    st->above += mass_above;
    st->at = mass[chosen];
    st->prefix |= chosen << shift;
}

// ceil(a * big / 2^32), same ranges as mulhi.
inline uint64_t mulhi_ceil(uint64_t a, uint64_t big) {
    if (a >= (uint64_t(1) << 32)) {
        return big;
    }
    const uint64_t low = a * (big & 0xFFFFFFFFull);
    return mulhi(a, big) + ((low & 0xFFFFFFFFull) != 0 ? 1 : 0);
}

inline bool topp_active(uint32_t topp_bits) { return fixed32(topp_bits) < (uint64_t(1) << 32); }

// ---- the work a tile-row needs: every core decides the same from the same parameter records ----------
inline bool row_topk_active(const volatile uint32_t* pr, uint32_t vocab) {
    return pr[P_VALID] && !pr[P_GREEDY] && pr[P_TOPK] > 0 && pr[P_TOPK] < vocab;
}
inline bool row_topp_active(const volatile uint32_t* pr) {
    return pr[P_VALID] && !pr[P_GREEDY] && topp_active(pr[P_TOPP]);
}

// Real rows come first in a tile-row; the rest are padding, which no pass visits.
inline uint32_t valid_rows(const volatile uint32_t* prm) {
    uint32_t n = 0;
    while (n < ROWS && prm[n * P_WORDS + P_VALID]) {
        ++n;
    }
    return n;
}

// Sync rounds of the top-k and the top-p search: none where no row filters (most requests), a single top-k
// round where only top-p rows need it (for their total mass Z_k), ROUNDS each otherwise.
struct SearchRounds {
    uint32_t k, p;
};
inline SearchRounds search_rounds(const volatile uint32_t* prm, uint32_t vocab) {
    bool any_k = false, any_p = false;
    for (uint32_t r = 0; r < ROWS; ++r) {
        any_k = any_k || row_topk_active(prm + r * P_WORDS, vocab);
        any_p = any_p || row_topp_active(prm + r * P_WORDS);
    }
    return SearchRounds{any_k ? ROUNDS : (any_p ? 1u : 0u), any_p ? ROUNDS : 0u};
}

// Does this row histogram in round `round` of search `pass` (0 top-k, 1 top-p)?
inline bool row_searches(const volatile uint32_t* pr, uint32_t vocab, uint32_t pass, uint32_t round) {
    if (pass == 1) {
        return row_topp_active(pr);
    }
    return row_topk_active(pr, vocab) || (round == 0 && row_topp_active(pr));
}

// The kept set is {key >= t}: t = max(t_k, t_p, bits(min_p)) (0 for a filter that is off).
inline uint32_t final_threshold(uint32_t tk, uint32_t tp, uint32_t tm) {
    const uint32_t t = tk > tp ? tk : tp;
    return t > tm ? t : tm;
}

// Mass the kept prefix must reach: ceil(top_p * Z_k), so that "mass strictly above < T" is exactly
// "mass strictly above < top_p * Z_k" for integer masses.
inline uint64_t topp_target(uint64_t zk, uint32_t topp_bits) {
    const uint64_t t = mulhi_ceil(fixed32(topp_bits), zk);
    return t == 0 ? 1 : t;
}

// ---- phase 3: sums, accept test, sampling -------------------------------------------------------
inline uint64_t row_kept_mass(const Slice& s, uint32_t r, uint32_t t) {
    uint64_t z = 0;
    const uint32_t n = s.cols();
    for (uint32_t j = 0; j < n; ++j) {
        const uint32_t b = s.at(r, j);
        if (b >= t) {
            z += fixed32(b);
        }
    }
    return z;
}

// qz of column j: draft mass scaled to Z.  q == nullptr means a one-hot draft at `draft`.
inline uint64_t q_scaled(const Slice* q, uint32_t r, uint32_t j, uint32_t col, uint32_t draft, uint64_t z) {
    if (q == nullptr) {
        return col == draft ? z : 0;
    }
    return mulhi(fixed32(q->at(r, j)), z);
}

struct Totals {
    uint64_t resid;  // sum of max(w - qz, 0) over the slice
    uint32_t has_x;  // the draft token lies in this slice
    uint64_t w_x;
    uint64_t qz_x;
};

inline Totals row_totals(const Slice& s, const Slice* q, uint32_t r, uint32_t t, uint64_t z, uint32_t draft,
                         bool residual) {
    Totals out{0, 0, 0, 0};
    const uint32_t n = s.cols();
    for (uint32_t j = 0; j < n; ++j) {
        const uint32_t b = s.at(r, j);
        const uint64_t w = b >= t ? fixed32(b) : 0;
        const uint32_t col = s.first_col + j;
        if (residual) {
            const uint64_t qz = q_scaled(q, r, j, col, draft, z);
            if (w > qz) {
                out.resid += w - qz;
            }
            if (col == draft) {
                out.has_x = 1;
                out.w_x = w;
                out.qz_x = qz;
            }
        }
    }
    return out;
}

// First column of the slice where the running weight exceeds target (weights: residual or kept mass).
inline uint32_t row_scan(const Slice& s, const Slice* q, uint32_t r, uint32_t t, uint64_t z, uint32_t draft,
                         bool use_residual, uint64_t target) {
    uint64_t run = 0;
    const uint32_t n = s.cols();
    for (uint32_t j = 0; j < n; ++j) {
        const uint32_t b = s.at(r, j);
        uint64_t w = b >= t ? fixed32(b) : 0;
        if (use_residual) {
            const uint64_t qz = q_scaled(q, r, j, s.first_col + j, draft, z);
            w = w > qz ? w - qz : 0;
        }
        run += w;
        if (run > target) {
            return s.first_col + j;
        }
    }
    return NO_TOKEN;
}

// Aggregator decision after the totals round: accept flag, and which worker samples at what target.
struct Decision {
    uint32_t accept;
    uint32_t use_residual;
    uint32_t winner;  // worker index, NO_WORKER for greedy rows
    uint64_t target;  // U minus the running weight of the workers before the winner
};

// local_sums[w]: worker w's residual sum (use_residual) or kept mass Z_w.
inline Decision decide(const volatile uint32_t* params, uint32_t argmax, uint64_t z, uint64_t resid_total,
                       uint64_t w_x, uint64_t qz_x, const uint64_t* resid_w, const uint64_t* z_w, uint32_t n_workers) {
    Decision d{0, 0, NO_WORKER, 0};
    const uint32_t mode = params[P_MODE];
    if (params[P_GREEDY]) {
        d.accept = (mode == MODE_RESIDUAL && params[P_DRAFT] == argmax) ? 1u : 0u;
        return d;
    }
    if (mode == MODE_RESIDUAL) {
        d.accept = mulhi(params[P_UACC], qz_x) < w_x ? 1u : 0u;
    }
    d.use_residual = (mode == MODE_RESIDUAL && resid_total > 0) ? 1u : 0u;
    const uint64_t total = d.use_residual ? resid_total : z;
    const uint64_t u = mulhi(params[P_USMP], total);
    uint64_t before = 0;
    for (uint32_t w = 0; w < n_workers; ++w) {
        const uint64_t s = d.use_residual ? resid_w[w] : z_w[w];
        if (u < before + s) {
            d.winner = w;
            d.target = u - before;
            break;
        }
        before += s;
    }
    return d;
}

}  // namespace specdec_tt
