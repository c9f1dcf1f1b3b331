// SPDX-License-Identifier: Apache-2.0
// specdec verify/sample, compute (TRISC 0-2), workers only.  Per tile-row, for each logits tile of
// the worker's slice:
//     e = exp(x * invT - m),   m = fp32(xmax * invT)
// in fp32 dest registers (fp32_dest_acc_en, fp32 CBs unpacked straight to dest), packed as fp32
// tiles into CB_E, which stays resident for the writer's integer phase.  m and invT arrive as
// fp32 tiles whose row r holds that row's value in every column, so each operation is an
// element-wise SFPU binary op; no broadcast rounding through the 19-bit source registers.
//
// Compile-time args: none.  Runtime args: n_tiles, row_tiles.
#include <stdint.h>

#include "api/compute/common.h"
#include "api/compute/compute_kernel_api.h"
#include "api/compute/tile_move_copy.h"
#include "api/compute/eltwise_binary_sfpu.h"
#include "api/compute/eltwise_unary/exp.h"
#include "api/compute/reconfig_data_format.h"
#include "api/compute/pack.h"
#include "api/compute/cb_api.h"
#include "api/compute/reg_api.h"
#include "api/compute/compute_kernel_hw_startup.h"
#include "../specdec_tt_algo.hpp"

using namespace specdec_tt;

void kernel_main() {
    const uint32_t n_tiles = get_arg_val<uint32_t>(0);
    const uint32_t row_tiles = get_arg_val<uint32_t>(1);

    compute_kernel_hw_startup(CB_X, CB_E);

    for (uint32_t rt = 0; rt < row_tiles; ++rt) {
        cb_wait_front(CB_INVT, 1);
        cb_wait_front(CB_XMAX, 1);
        for (uint32_t t = 0; t < n_tiles; ++t) {
            cb_wait_front(CB_X, 1);
            tile_regs_acquire();
            // dst0 = x, dst1 = invT; dst0 = s = x * invT
            reconfig_data_format_srca(CB_X);
            copy_init(CB_X);
            copy_tile(CB_X, 0, 0);
            reconfig_data_format_srca(CB_X, CB_INVT);
            copy_init(CB_INVT);
            copy_tile(CB_INVT, 0, 1);
            mul_binary_tile_init();
            mul_binary_tile(0, 1, 0);
            // dst1 = m = fp32(xmax * invT) (computed by the writer); dst0 = s - m
            reconfig_data_format_srca(CB_INVT, CB_XMAX);
            copy_init(CB_XMAX);
            copy_tile(CB_XMAX, 0, 1);
            sub_binary_tile_init();
            sub_binary_tile(0, 1, 0);
            // dst0 = exp(dst0), accurate (non-approximate) mode
            exp_tile_init<false>();
            exp_tile<false>(0);
            tile_regs_commit();
            cb_pop_front(CB_X, 1);

            cb_reserve_back(CB_E, 1);
            tile_regs_wait();
            pack_reconfig_data_format(CB_E);
            pack_tile(0, CB_E);
            tile_regs_release();
            cb_push_back(CB_E, 1);
        }
        cb_pop_front(CB_INVT, 1);
        cb_pop_front(CB_XMAX, 1);
    }
}
