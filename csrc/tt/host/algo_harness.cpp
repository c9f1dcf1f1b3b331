// SPDX-License-Identifier: Apache-2.0
// Host harness for csrc/tt/kernels/specdec_tt_algo.hpp: runs the device program's integer phases
// (phase 1 max/argmax, phase 3 radix searches, sums, accept test, sampling) with the same per-worker
// tile-layout slices and the same aggregator merges as reader.cpp/writer.cpp, minus the NOC.
// The tests compare its output bit for bit with python/specdec/tt/model.py.
//
// stdin (little-endian uint32): R V n_workers has_q, then x bits [R*V], e bits [R*V],
// q bits [R*V] (if has_q), params [R*16].  stdout: one line per row: argmax t Zlo Zhi accept token.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../kernels/specdec_tt_algo.hpp"

using namespace specdec_tt;

static std::vector<uint32_t> read_words(size_t n) {
    std::vector<uint32_t> v(n);
    if (n && fread(v.data(), 4, n, stdin) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return v;
}

// Lay rows [r0, r0+32) x tiles [t0, t0+nt) of a row-major [R, V] array out as tiles; padding = 1.0f
// (a value that would be chosen if masking of columns >= V were broken).
static std::vector<uint32_t> tiles_of(const std::vector<uint32_t>& a, uint32_t R, uint32_t V, uint32_t r0,
                                      uint32_t t0, uint32_t nt) {
    std::vector<uint32_t> out(size_t(nt) * TILE_ELEMS, 0x3F800000u);
    for (uint32_t t = 0; t < nt; ++t) {
        for (uint32_t r = 0; r < ROWS; ++r) {
            for (uint32_t c = 0; c < TILE; ++c) {
                const uint32_t row = r0 + r, col = (t0 + t) * TILE + c;
                if (row < R && col < V) {
                    out[size_t(t) * TILE_ELEMS + tile_offset(r, c)] = a[size_t(row) * V + col];
                }
            }
        }
    }
    return out;
}

int main() {
    const auto hdr = read_words(4);
    const uint32_t R = hdr[0], V = hdr[1], NW_req = hdr[2], has_q = hdr[3];
    const auto x = read_words(size_t(R) * V);
    const auto e = read_words(size_t(R) * V);
    const auto q = has_q ? read_words(size_t(R) * V) : std::vector<uint32_t>();
    const auto prm = read_words(size_t(R) * P_WORDS);

    // work split (same rule as ttnn.split_work_to_cores / model.split_vocab)
    const uint32_t vt = (V + TILE - 1) / TILE;
    const uint32_t nw = vt < NW_req ? vt : NW_req;
    std::vector<uint32_t> first(nw), count(nw);
    for (uint32_t w = 0, s = 0; w < nw; ++w) {
        count[w] = vt / nw + (w < vt % nw ? 1 : 0);
        first[w] = s;
        s += count[w];
    }
    std::vector<uint32_t> rec(size_t(nw) * REC_WORDS);
    const uint32_t RT = (R + ROWS - 1) / ROWS;

    for (uint32_t rt = 0; rt < RT; ++rt) {
        const uint32_t r0 = rt * ROWS;
        std::vector<std::vector<uint32_t>> xs(nw), es(nw), qs(nw);
        std::vector<Slice> se(nw), sq(nw);
        for (uint32_t w = 0; w < nw; ++w) {
            xs[w] = tiles_of(x, R, V, r0, first[w], count[w]);
            es[w] = tiles_of(e, R, V, r0, first[w], count[w]);
            se[w] = Slice{es[w].data(), count[w], first[w] * TILE, V};
            if (has_q) {
                qs[w] = tiles_of(q, R, V, r0, first[w], count[w]);
                sq[w] = Slice{qs[w].data(), count[w], first[w] * TILE, V};
            }
        }
        auto P = [&](uint32_t r) { return &prm[size_t(r0 + r) * P_WORDS]; };
        // phase 1: reader max per worker, aggregator merge
        for (uint32_t w = 0; w < nw; ++w) {
            uint32_t bk[ROWS], bc[ROWS];
            for (uint32_t r = 0; r < ROWS; ++r) { bk[r] = 0; bc[r] = NO_TOKEN; }
            for (uint32_t t = 0; t < count[w]; ++t) {
                const uint32_t* tile = &xs[w][size_t(t) * TILE_ELEMS];
                tile_max([&](uint32_t i) { return tile[i]; }, (first[w] + t) * TILE, V, ROWS, bk, bc);
            }
            for (uint32_t r = 0; r < ROWS; ++r) { rec[w * REC_WORDS + 2 * r] = bk[r]; rec[w * REC_WORDS + 2 * r + 1] = bc[r]; }
        }
        uint32_t argmax[ROWS];
        for (uint32_t r = 0; r < ROWS; ++r) {
            uint32_t k;
            merge_max(rec.data(), nw, REC_WORDS, r, &k, &argmax[r]);
        }
        // phase 3: top-k count search, then top-p mass search
        Search sk[ROWS], sp[ROWS];
        bool kact[ROWS], pact[ROWS];
        uint32_t tk[ROWS], tp[ROWS], t[ROWS];
        uint64_t zk[ROWS];
        for (uint32_t r = 0; r < ROWS; ++r) {
            const uint32_t* p = P(r < R - r0 ? r : 0);
            const bool valid = r0 + r < R && p[P_VALID];
            kact[r] = valid && !p[P_GREEDY] && p[P_TOPK] > 0 && p[P_TOPK] < V;
            search_begin(&sk[r], kact[r] ? p[P_TOPK] : 1);
        }
        for (uint32_t round = 0; round < ROUNDS; ++round) {
            for (uint32_t w = 0; w < nw; ++w)
                for (uint32_t r = 0; r < ROWS; ++r)
                    row_hist(se[w], r, round, sk[r].prefix, 0, &rec[w * REC_WORDS + r * REC_ROW_WORDS]);
            for (uint32_t r = 0; r < ROWS; ++r) {
                Search keep = sk[r];
                search_step(&sk[r], rec.data(), nw, REC_WORDS, r, round, false);
                if (!kact[r]) { const uint64_t tot = sk[r].total; sk[r] = keep; sk[r].total = tot; }
            }
        }
        for (uint32_t r = 0; r < ROWS; ++r) {
            tk[r] = kact[r] ? sk[r].prefix : 0;
            zk[r] = kact[r] ? sk[r].above + sk[r].at : sk[r].total;
            const uint32_t* p = P(r < R - r0 ? r : 0);
            const bool valid = r0 + r < R && p[P_VALID];
            pact[r] = valid && !p[P_GREEDY] && topp_active(p[P_TOPP]);
            search_begin(&sp[r], pact[r] ? topp_target(zk[r], p[P_TOPP]) : 1);
        }
        for (uint32_t round = 0; round < ROUNDS; ++round) {
            for (uint32_t w = 0; w < nw; ++w)
                for (uint32_t r = 0; r < ROWS; ++r)
                    row_hist(se[w], r, round, sp[r].prefix, tk[r], &rec[w * REC_WORDS + r * REC_ROW_WORDS]);
            for (uint32_t r = 0; r < ROWS; ++r) {
                if (pact[r]) search_step(&sp[r], rec.data(), nw, REC_WORDS, r, round, true);
            }
        }
        for (uint32_t r = 0; r < ROWS && r0 + r < R; ++r) {
            tp[r] = pact[r] ? sp[r].prefix : 0;
            const uint32_t tm = P(r)[P_MINP];
            t[r] = tk[r] > tp[r] ? tk[r] : tp[r];
            t[r] = t[r] > tm ? t[r] : tm;
        }
        // sums, decision, scan
        for (uint32_t r = 0; r < ROWS && r0 + r < R; ++r) {
            const uint32_t* p = P(r);
            std::vector<uint64_t> zw(nw), rw(nw);
            uint64_t z = 0;
            for (uint32_t w = 0; w < nw; ++w) { zw[w] = row_kept_mass(se[w], r, t[r]); z += zw[w]; }
            const bool residual = p[P_MODE] == MODE_RESIDUAL;
            uint64_t rs = 0, wx = 0, qzx = 0;
            for (uint32_t w = 0; w < nw; ++w) {
                const Totals tt = row_totals(se[w], has_q ? &sq[w] : nullptr, r, t[r], z, p[P_DRAFT], residual);
                rw[w] = tt.resid;
                rs += tt.resid;
                if (tt.has_x) { wx = tt.w_x; qzx = tt.qz_x; }
            }
            const Decision d = decide(p, argmax[r], z, rs, wx, qzx, rw.data(), zw.data(), nw);
            uint32_t token = argmax[r];
            if (!p[P_GREEDY] && d.winner != NO_WORKER) {
                const uint32_t w = d.winner;
                token = row_scan(se[w], has_q ? &sq[w] : nullptr, r, t[r], z, p[P_DRAFT], d.use_residual, d.target);
            }
            printf("%u %u %u %u %u %u\n", argmax[r], t[r], uint32_t(z), uint32_t(z >> 32), d.accept, token);
        }
    }
    return 0;
}
