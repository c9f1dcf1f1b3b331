// SPDX-License-Identifier: Apache-2.0
// specdec verify/sample, writer (BRISC): the integer phase and all cross-core traffic.
//
// One core is the aggregator, the others are workers owning contiguous vocabulary tile ranges.
// Each sync round: every worker writes a record (REC_BYTES) into its slot of the aggregator's
// CB_MAILBOX and increments the aggregator's semaphore; the aggregator waits for all of them, merges
// in worker order (= vocabulary order), writes a result block (RES_BYTES) into every worker's
// CB_RESULT and increments each worker's semaphore.  Rounds per tile-row of 32 rows:
//   MAX (1) -> top-k radix search (ROUNDS) -> top-p radix search (ROUNDS) -> kept mass Z (1)
//   -> totals (residual sums, draft weights) (1) -> pick (the owning worker scans) (1).
// The searches run only where a row of the tile-row filters (search_rounds), each row histograms only
// in the searches it needs, and padding rows (after the tile-row's real rows) get no pass at all.
// All arithmetic is in specdec_tt_algo.hpp (integers on fp32 bit patterns; host-tested).
//
// Compile-time args: [0] has draft probabilities, [1] n_workers, then TensorAccessorArgs of output.
// Runtime args: is_aggregator, worker_index, first_tile, n_tiles, vocab, rows, row_tiles, batch,
//   k_plus_1, out_addr, out_row_words, agg_noc_x, agg_noc_y, sem_agg, sem_work,
//   then (aggregator only) noc x, y of every worker in worker order.
#include <stdint.h>

#include "api/dataflow/dataflow_api.h"
#include "../specdec_tt_algo.hpp"

using namespace specdec_tt;

namespace {

constexpr uint32_t MAX_WORKERS = 128;

struct Link {
    uint32_t agg_x, agg_y;
    uint32_t sem_agg_l1, sem_work_l1;
    uint32_t mailbox_l1, result_l1, rec_l1;
    uint32_t worker_index, n_workers;
    uint32_t round;  // rounds completed so far (semaphores count up monotonically)
};

// worker: send this round's record, then wait for the aggregator's result block
void worker_exchange(Link& L, uint32_t bytes) {
    const uint64_t dst = get_noc_addr(L.agg_x, L.agg_y, L.mailbox_l1 + L.worker_index * REC_BYTES);
    noc_async_write(L.rec_l1, dst, bytes);
    noc_async_write_barrier();
    noc_semaphore_inc(get_noc_addr(L.agg_x, L.agg_y, L.sem_agg_l1), 1);
    L.round += 1;
    noc_semaphore_wait_min(reinterpret_cast<volatile tt_l1_ptr uint32_t*>(L.sem_work_l1), L.round);
    invalidate_l1_cache();
}

// aggregator: wait until every worker's record of this round is in the mailbox
void agg_gather(Link& L) {
    L.round += 1;
    noc_semaphore_wait_min(reinterpret_cast<volatile tt_l1_ptr uint32_t*>(L.sem_agg_l1), L.round * L.n_workers);
    invalidate_l1_cache();
}

// aggregator: copy the result block to every worker and release them
void agg_broadcast(Link& L, const uint32_t* wx, const uint32_t* wy) {
    for (uint32_t w = 0; w < L.n_workers; ++w) {
        noc_async_write(L.result_l1, get_noc_addr(wx[w], wy[w], L.result_l1), RES_BYTES);
    }
    noc_async_write_barrier();
    for (uint32_t w = 0; w < L.n_workers; ++w) {
        noc_semaphore_inc(get_noc_addr(wx[w], wy[w], L.sem_work_l1), 1);
    }
}

inline volatile tt_l1_ptr uint32_t* words(uint32_t l1) { return reinterpret_cast<volatile tt_l1_ptr uint32_t*>(l1); }

// The aggregator's working state lives in L1 (CB_SCRATCH): the RISC-V stack is only a few KiB.
struct AggState {
    Search sk[ROWS];
    Search sp[ROWS];
    uint64_t zk[ROWS];
    uint64_t z[ROWS];
    uint64_t resid_w[MAX_WORKERS];
    uint64_t z_w[MAX_WORKERS];
    uint32_t wx[MAX_WORKERS];
    uint32_t wy[MAX_WORKERS];
    uint32_t argmax[ROWS];
    uint32_t tk[ROWS];
    uint32_t greedy_token[ROWS];
    uint8_t kact[ROWS];
    uint8_t pact[ROWS];
};
static_assert(sizeof(AggState) <= SCRATCH_BYTES, "aggregator scratch");

// A worker's per-row state, also in L1 (CB_SCRATCH of its own core).
struct WorkerState {
    uint32_t t[ROWS];    // final key threshold
    uint64_t z[ROWS];    // kept mass over the whole vocabulary
    uint64_t zc[ROWS];   // kept mass over this worker's slice
};
static_assert(sizeof(WorkerState) <= SCRATCH_BYTES, "worker scratch");

}  // namespace

void kernel_main() {
    constexpr bool has_q = get_compile_time_arg_val(0) == 1;
    constexpr uint32_t n_workers = get_compile_time_arg_val(1);
    constexpr auto out_args = TensorAccessorArgs<2>();
    static_assert(n_workers >= 1 && n_workers <= MAX_WORKERS, "worker count");

    const bool is_aggregator = get_arg_val<uint32_t>(0) == 1;
    const uint32_t worker_index = get_arg_val<uint32_t>(1);
    const uint32_t first_tile = get_arg_val<uint32_t>(2);
    const uint32_t n_tiles = get_arg_val<uint32_t>(3);
    const uint32_t vocab = get_arg_val<uint32_t>(4);
    const uint32_t rows = get_arg_val<uint32_t>(5);
    const uint32_t row_tiles = get_arg_val<uint32_t>(6);
    const uint32_t batch = get_arg_val<uint32_t>(7);
    const uint32_t k_plus_1 = get_arg_val<uint32_t>(8);
    const uint32_t out_addr = get_arg_val<uint32_t>(9);
    const uint32_t out_row_words = get_arg_val<uint32_t>(10);

    Link L;
    L.agg_x = get_arg_val<uint32_t>(11);
    L.agg_y = get_arg_val<uint32_t>(12);
    L.sem_agg_l1 = get_semaphore(get_arg_val<uint32_t>(13));
    L.sem_work_l1 = get_semaphore(get_arg_val<uint32_t>(14));
    L.mailbox_l1 = get_write_ptr(CB_MAILBOX);
    L.result_l1 = get_write_ptr(CB_RESULT);
    L.rec_l1 = get_write_ptr(CB_REC);
    L.worker_index = worker_index;
    L.n_workers = n_workers;
    L.round = 0;

    volatile tt_l1_ptr uint32_t* rec = words(L.rec_l1);
    volatile tt_l1_ptr uint32_t* res = words(L.result_l1);
    volatile tt_l1_ptr uint32_t* mbox = words(L.mailbox_l1);

    if (!is_aggregator) {
        // ================================ worker ================================
        WorkerState& W = *reinterpret_cast<WorkerState*>(get_write_ptr(CB_SCRATCH));
        for (uint32_t rt = 0; rt < row_tiles; ++rt) {
            cb_wait_front(CB_PARAMS, 1);
            volatile tt_l1_ptr uint32_t* prm = words(get_read_ptr(CB_PARAMS));
            const uint32_t nrows = valid_rows(prm);
            const SearchRounds sr = search_rounds(prm, vocab);

            // MAX round
            cb_wait_front(CB_LOCALMAX, 1);
            volatile tt_l1_ptr uint32_t* lm = words(get_read_ptr(CB_LOCALMAX));
            for (uint32_t i = 0; i < 2 * ROWS; ++i) {
                rec[i] = lm[i];
            }
            cb_pop_front(CB_LOCALMAX, 1);
            worker_exchange(L, 2 * ROWS * 4);

            // scaled row max m = fp32(xmax * invT), broadcast over the columns, for compute
            cb_reserve_back(CB_XMAX, 1);
            volatile tt_l1_ptr uint32_t* xm = words(get_write_ptr(CB_XMAX));
            for (uint32_t r = 0; r < ROWS; ++r) {
                const volatile uint32_t* pr = prm + r * P_WORDS;
                const uint32_t inv_bits = (pr[P_VALID] && !pr[P_GREEDY]) ? pr[P_INVT] : 0x3F800000u;
                const uint32_t bits = r < nrows ? f32_mul_bits(res[r * RES_ROW_WORDS + 0], inv_bits) : 0u;
                for (uint32_t c = 0; c < TILE; ++c) {
                    xm[tile_offset(r, c)] = bits;
                }
            }
            cb_push_back(CB_XMAX, 1);

            cb_wait_front(CB_E, n_tiles);
            const Slice se{words(get_read_ptr(CB_E)), n_tiles, first_tile * TILE, vocab};
            Slice sq{nullptr, n_tiles, first_tile * TILE, vocab};
            if constexpr (has_q) {
                cb_wait_front(CB_Q, n_tiles);
                sq.tiles = words(get_read_ptr(CB_Q));
            }
            const Slice* qp = has_q ? &sq : nullptr;

            // top-k search (min_key 0), then top-p search (min_key = t_k); the result block carries
            // the next round's prefix (word 0) and min key (word 1)
            for (uint32_t pass = 0; pass < 2; ++pass) {
                for (uint32_t round = 0; round < (pass == 0 ? sr.k : sr.p); ++round) {
                    for (uint32_t r = 0; r < nrows; ++r) {
                        if (!row_searches(prm + r * P_WORDS, vocab, pass, round)) {
                            continue;
                        }
                        const bool first = pass == 0 && round == 0;
                        const uint32_t prefix = first ? 0 : res[r * RES_ROW_WORDS + 0];
                        const uint32_t min_key = first ? 0 : res[r * RES_ROW_WORDS + 1];
                        row_hist(se, r, round, prefix, min_key, rec + r * REC_ROW_WORDS);
                    }
                    worker_exchange(L, REC_BYTES);
                }
            }
            for (uint32_t r = 0; r < nrows; ++r) {  // with no search, t is min-p's alone
                W.t[r] = sr.k > 0 ? res[r * RES_ROW_WORDS + 2] : final_threshold(0, 0, prm[r * P_WORDS + P_MINP]);
            }

            // kept mass round
            for (uint32_t r = 0; r < nrows; ++r) {
                W.zc[r] = row_kept_mass(se, r, W.t[r]);
                split64(W.zc[r], rec + 2 * r);
            }
            worker_exchange(L, 2 * ROWS * 4);
            for (uint32_t r = 0; r < nrows; ++r) {
                W.z[r] = join64(res[r * RES_ROW_WORDS + 0], res[r * RES_ROW_WORDS + 1]);
            }

            // totals round: residual sum, draft token's weights, own kept mass
            for (uint32_t r = 0; r < nrows; ++r) {
                const volatile uint32_t* pr = prm + r * P_WORDS;
                const Totals tt = row_totals(se, qp, r, W.t[r], W.z[r], pr[P_DRAFT], pr[P_MODE] == MODE_RESIDUAL);
                volatile uint32_t* o = rec + 10 * r;
                split64(tt.resid, o + 0);
                o[2] = tt.has_x;
                split64(tt.w_x, o + 3);
                split64(tt.qz_x, o + 5);
                split64(W.zc[r], o + 7);
                o[9] = 0;
            }
            worker_exchange(L, 10 * ROWS * 4);

            // pick round: the worker that owns the sample position scans its slice
            for (uint32_t r = 0; r < ROWS; ++r) {
                const volatile uint32_t* b = res + r * RES_ROW_WORDS;
                uint32_t token = NO_TOKEN;
                if (r < nrows && b[0] == worker_index) {
                    const volatile uint32_t* pr = prm + r * P_WORDS;
                    token = row_scan(se, qp, r, W.t[r], W.z[r], pr[P_DRAFT], b[3] != 0, join64(b[1], b[2]));
                }
                rec[r] = token;
            }
            worker_exchange(L, ROWS * 4);

            cb_pop_front(CB_E, n_tiles);
            if constexpr (has_q) {
                cb_pop_front(CB_Q, n_tiles);
            }
            cb_pop_front(CB_PARAMS, 1);
        }
        noc_async_atomic_barrier();
        return;
    }

    // ================================ aggregator ================================
    AggState& S = *reinterpret_cast<AggState*>(get_write_ptr(CB_SCRATCH));
    for (uint32_t w = 0; w < n_workers; ++w) {
        S.wx[w] = get_arg_val<uint32_t>(15 + 2 * w);
        S.wy[w] = get_arg_val<uint32_t>(16 + 2 * w);
    }
    // per row of the call: {accept, token, mode, draft}
    volatile tt_l1_ptr uint32_t* rowres = words(get_write_ptr(CB_ROWRES));
    constexpr uint32_t REC_STRIDE = REC_WORDS;

    for (uint32_t rt = 0; rt < row_tiles; ++rt) {
        cb_wait_front(CB_PARAMS, 1);
        volatile tt_l1_ptr uint32_t* prm = words(get_read_ptr(CB_PARAMS));
        const uint32_t nrows = valid_rows(prm);
        const SearchRounds sr = search_rounds(prm, vocab);

        // MAX
        agg_gather(L);
        for (uint32_t r = 0; r < nrows; ++r) {
            uint32_t key;
            merge_max(mbox, n_workers, REC_STRIDE, r, &key, &S.argmax[r]);
            res[r * RES_ROW_WORDS + 0] = key_to_bits(key);
            res[r * RES_ROW_WORDS + 1] = S.argmax[r];
        }
        agg_broadcast(L, S.wx, S.wy);

        // top-k count search (sr.k rounds; the last one carries t_k, and t itself when no top-p search follows)
        for (uint32_t r = 0; r < nrows; ++r) {
            const volatile uint32_t* pr = prm + r * P_WORDS;
            S.kact[r] = row_topk_active(pr, vocab);
            S.pact[r] = row_topp_active(pr);
            search_begin(&S.sk[r], S.kact[r] ? pr[P_TOPK] : 1);
        }
        for (uint32_t round = 0; round < sr.k; ++round) {
            agg_gather(L);
            for (uint32_t r = 0; r < nrows; ++r) {
                if (S.kact[r]) {
                    search_step(&S.sk[r], mbox, n_workers, REC_STRIDE, r, round, false);
                } else if (round == 0 && S.pact[r]) {
                    Search tmp = S.sk[r];  // a top-p row without top-k needs the total mass
                    search_step(&tmp, mbox, n_workers, REC_STRIDE, r, 0, false);
                    S.sk[r].total = tmp.total;
                }
                if (round + 1 < sr.k) {
                    res[r * RES_ROW_WORDS + 0] = S.sk[r].prefix;
                    res[r * RES_ROW_WORDS + 1] = 0;
                } else {
                    const volatile uint32_t* pr = prm + r * P_WORDS;
                    S.tk[r] = S.kact[r] ? S.sk[r].prefix : 0;
                    S.zk[r] = S.kact[r] ? S.sk[r].above + S.sk[r].at : S.sk[r].total;
                    search_begin(&S.sp[r], S.pact[r] ? topp_target(S.zk[r], pr[P_TOPP]) : 1);
                    res[r * RES_ROW_WORDS + 0] = 0;
                    res[r * RES_ROW_WORDS + 1] = S.tk[r];
                    res[r * RES_ROW_WORDS + 2] = final_threshold(S.tk[r], 0, pr[P_MINP]);
                }
            }
            agg_broadcast(L, S.wx, S.wy);
        }

        // top-p mass search among {key >= t_k} (sr.p rounds; the last one carries t)
        for (uint32_t round = 0; round < sr.p; ++round) {
            agg_gather(L);
            for (uint32_t r = 0; r < nrows; ++r) {
                if (S.pact[r]) {
                    search_step(&S.sp[r], mbox, n_workers, REC_STRIDE, r, round, true);
                }
                res[r * RES_ROW_WORDS + 0] = S.sp[r].prefix;
                res[r * RES_ROW_WORDS + 1] = S.tk[r];
                if (round + 1 == sr.p) {
                    const uint32_t tp = S.pact[r] ? S.sp[r].prefix : 0;
                    res[r * RES_ROW_WORDS + 2] = final_threshold(S.tk[r], tp, prm[r * P_WORDS + P_MINP]);
                }
            }
            agg_broadcast(L, S.wx, S.wy);
        }

        // kept mass Z
        agg_gather(L);
        for (uint32_t r = 0; r < nrows; ++r) {
            uint64_t z = 0;
            for (uint32_t w = 0; w < n_workers; ++w) {
                const volatile uint32_t* p = mbox + w * REC_STRIDE + 2 * r;
                z += join64(p[0], p[1]);
            }
            S.z[r] = z;
            split64(z, res + r * RES_ROW_WORDS);
        }
        agg_broadcast(L, S.wx, S.wy);

        // totals -> decision
        agg_gather(L);
        for (uint32_t r = 0; r < nrows; ++r) {
            uint64_t rs = 0, w_x = 0, qz_x = 0;
            for (uint32_t w = 0; w < n_workers; ++w) {
                const volatile uint32_t* p = mbox + w * REC_STRIDE + 10 * r;
                S.resid_w[w] = join64(p[0], p[1]);
                rs += S.resid_w[w];
                if (p[2]) {
                    w_x = join64(p[3], p[4]);
                    qz_x = join64(p[5], p[6]);
                }
                S.z_w[w] = join64(p[7], p[8]);
            }
            const volatile uint32_t* pr = prm + r * P_WORDS;
            const Decision d = decide(pr, S.argmax[r], S.z[r], rs, w_x, qz_x, S.resid_w, S.z_w, n_workers);
            const uint32_t row = rt * ROWS + r;
            if (row < rows) {
                rowres[4 * row + 0] = d.accept;
                rowres[4 * row + 2] = pr[P_MODE];
                rowres[4 * row + 3] = pr[P_DRAFT];
            }
            S.greedy_token[r] = (pr[P_GREEDY] || d.winner == NO_WORKER) ? S.argmax[r] : NO_TOKEN;
            volatile uint32_t* b = res + r * RES_ROW_WORDS;
            b[0] = pr[P_GREEDY] ? NO_WORKER : d.winner;
            split64(d.target, b + 1);
            b[3] = d.use_residual;
        }
        agg_broadcast(L, S.wx, S.wy);

        // pick
        agg_gather(L);
        for (uint32_t r = 0; r < nrows; ++r) {
            uint32_t token = S.greedy_token[r];
            for (uint32_t w = 0; w < n_workers; ++w) {
                const uint32_t v = mbox[w * REC_STRIDE + r];
                if (v != NO_TOKEN) {
                    token = v;
                }
            }
            const uint32_t row = rt * ROWS + r;
            if (row < rows) {
                rowres[4 * row + 1] = token;
            }
        }
        agg_broadcast(L, S.wx, S.wy);
        cb_pop_front(CB_PARAMS, 1);
    }

    // output rows: tokens[b, 0..K] padded with -1, then num_accepted at column K+1.  Rows j < num_draft
    // are MODE_RESIDUAL; n = the first of them that was rejected, or num_draft.
    const auto out = TensorAccessor(out_args, out_addr, out_row_words * 4);
    volatile tt_l1_ptr uint32_t* o = words(get_write_ptr(CB_OUT));
    for (uint32_t b = 0; b < batch; ++b) {
        for (uint32_t i = 0; i < out_row_words; ++i) {
            o[i] = 0xFFFFFFFFu;
        }
        const uint32_t base = b * k_plus_1;
        uint32_t n = 0;
        while (n + 1 < k_plus_1 && rowres[4 * (base + n) + 2] == MODE_RESIDUAL && rowres[4 * (base + n)] == 1) {
            o[n] = rowres[4 * (base + n) + 3];
            n += 1;
        }
        o[n] = rowres[4 * (base + n) + 1];
        o[k_plus_1] = n;
        noc_async_write_page(b, out, get_write_ptr(CB_OUT));
        noc_async_write_barrier();
    }
    noc_async_atomic_barrier();
}
