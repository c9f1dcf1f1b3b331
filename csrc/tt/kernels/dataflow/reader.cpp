// SPDX-License-Identifier: Apache-2.0
// specdec verify/sample, reader (NCRISC).  Per tile-row of 32 rows:
//   all cores:   the 32 parameter records -> CB_PARAMS (for the writer)
//   workers:     1/T broadcast tile -> CB_INVT (compute);
//                phase 1: stream the slice's logits tiles once, local max / lowest argmax -> CB_LOCALMAX;
//                phase 2: stream them again -> CB_X (compute turns them into e);
//                draft probabilities of the slice -> CB_Q (resident, writer), unless the draft is one-hot.
//
// Compile-time args: [0] logits are fp32 (else bf16), [1] has draft probabilities, [2] logits tile
//   bytes, then TensorAccessorArgs of logits, params and q (q's are those of the logits when [1] is 0).
// Runtime args: logits_addr, params_addr, q_addr, is_aggregator, first_tile, n_tiles, vocab_tiles,
//   vocab, row_tiles.
#include <stdint.h>

#include "api/dataflow/dataflow_api.h"
#include "../specdec_tt_algo.hpp"

using namespace specdec_tt;

void kernel_main() {
    constexpr bool x_fp32 = get_compile_time_arg_val(0) == 1;
    constexpr bool has_q = get_compile_time_arg_val(1) == 1;
    constexpr uint32_t x_tile_bytes = get_compile_time_arg_val(2);
    constexpr auto x_args = TensorAccessorArgs<3>();
    constexpr auto p_args = TensorAccessorArgs<x_args.next_compile_time_args_offset()>();
    constexpr auto q_args = TensorAccessorArgs<p_args.next_compile_time_args_offset()>();

    const uint32_t x_addr = get_arg_val<uint32_t>(0);
    const uint32_t p_addr = get_arg_val<uint32_t>(1);
    const uint32_t q_addr = get_arg_val<uint32_t>(2);
    const bool is_aggregator = get_arg_val<uint32_t>(3) == 1;
    const uint32_t first_tile = get_arg_val<uint32_t>(4);
    const uint32_t n_tiles = get_arg_val<uint32_t>(5);
    const uint32_t vocab_tiles = get_arg_val<uint32_t>(6);
    const uint32_t vocab = get_arg_val<uint32_t>(7);
    const uint32_t row_tiles = get_arg_val<uint32_t>(8);

    const auto xs = TensorAccessor(x_args, x_addr, x_tile_bytes);
    const auto ps = TensorAccessor(p_args, p_addr, P_WORDS * 4);

    for (uint32_t rt = 0; rt < row_tiles; ++rt) {
        // parameter records of the 32 rows
        cb_reserve_back(CB_PARAMS, 1);
        const uint32_t p_l1 = get_write_ptr(CB_PARAMS);
        for (uint32_t r = 0; r < ROWS; ++r) {
            noc_async_read_page(rt * ROWS + r, ps, p_l1 + r * P_WORDS * 4);
        }
        noc_async_read_barrier();
        volatile tt_l1_ptr uint32_t* prm = reinterpret_cast<volatile tt_l1_ptr uint32_t*>(p_l1);
        const uint32_t nrows = valid_rows(prm);  // read before the records go to the writer

        if (!is_aggregator) {
            // 1/T broadcast over the 32 columns of each row (1.0 on greedy and padding rows)
            cb_reserve_back(CB_INVT, 1);
            volatile tt_l1_ptr uint32_t* it = reinterpret_cast<volatile tt_l1_ptr uint32_t*>(get_write_ptr(CB_INVT));
            for (uint32_t r = 0; r < ROWS; ++r) {
                const volatile uint32_t* pr = prm + r * P_WORDS;
                const uint32_t bits = (pr[P_VALID] && !pr[P_GREEDY]) ? pr[P_INVT] : 0x3F800000u;
                for (uint32_t c = 0; c < TILE; ++c) {
                    it[tile_offset(r, c)] = bits;
                }
            }
            cb_push_back(CB_INVT, 1);
        }
        cb_push_back(CB_PARAMS, 1);
        if (is_aggregator) {
            continue;
        }

        // phase 1: local max and lowest argmax over the slice, real rows only
        uint32_t best_key[ROWS], best_col[ROWS];
        for (uint32_t r = 0; r < ROWS; ++r) {
            best_key[r] = 0;
            best_col[r] = NO_TOKEN;
        }
        for (uint32_t t = 0; t < n_tiles; ++t) {
            cb_reserve_back(CB_X, 1);
            const uint32_t l1 = get_write_ptr(CB_X);
            noc_async_read_tile(rt * vocab_tiles + first_tile + t, xs, l1);
            noc_async_read_barrier();
            const uint32_t col0 = (first_tile + t) * TILE;
            if constexpr (x_fp32) {
                volatile tt_l1_ptr uint32_t* v = reinterpret_cast<volatile tt_l1_ptr uint32_t*>(l1);
                tile_max([&](uint32_t i) { return v[i]; }, col0, vocab, nrows, best_key, best_col);
            } else {
                volatile tt_l1_ptr uint16_t* v = reinterpret_cast<volatile tt_l1_ptr uint16_t*>(l1);
                tile_max([&](uint32_t i) { return uint32_t(v[i]) << 16; }, col0, vocab, nrows, best_key, best_col);
            }
            // not pushed: the slot is reused by the next tile
        }
        cb_reserve_back(CB_LOCALMAX, 1);
        volatile tt_l1_ptr uint32_t* lm = reinterpret_cast<volatile tt_l1_ptr uint32_t*>(get_write_ptr(CB_LOCALMAX));
        for (uint32_t r = 0; r < ROWS; ++r) {
            lm[2 * r] = best_key[r];
            lm[2 * r + 1] = best_col[r];
        }
        cb_push_back(CB_LOCALMAX, 1);

        // phase 2: stream the same tiles to compute
        for (uint32_t t = 0; t < n_tiles; ++t) {
            cb_reserve_back(CB_X, 1);
            noc_async_read_tile(rt * vocab_tiles + first_tile + t, xs, get_write_ptr(CB_X));
            noc_async_read_barrier();
            cb_push_back(CB_X, 1);
        }

        if constexpr (has_q) {
            const auto qs = TensorAccessor(q_args, q_addr, TILE_ELEMS * 4);
            cb_reserve_back(CB_Q, n_tiles);
            const uint32_t q_l1 = get_write_ptr(CB_Q);
            for (uint32_t t = 0; t < n_tiles; ++t) {
                noc_async_read_tile(rt * vocab_tiles + first_tile + t, qs, q_l1 + t * TILE_ELEMS * 4);
            }
            noc_async_read_barrier();
            cb_push_back(CB_Q, n_tiles);
        }
    }
}
