// Attention one query row at a time, each over its own span of keys: the decode and verify steps of a CPU forward.
#pragma once

#include <cstdint>

#include "linear/isa.hpp"

namespace specdec {

// One query head's view of a tensor: element [i, d] of head h at base + h · head_stride + i · row_stride + d.
struct HeadRows {
  const float* base;
  int64_t head_stride, row_stride;
};

// For query rows r < rows and heads h < heads (grouped: query head h reads key/value head h / (heads / kv_heads)):
//   out[r, h, :] = Σ_{j in [begin[r], end[r])} softmax_j(scale · q[r, h, :] · k[j, :]) · v[j, :]
// q, out: [rows, heads, dim] as HeadRows (out writable); keys, values: [kv_heads, ≥ end, dim]. A row with an empty
// span gets zeros. Each (row, head) is computed alone in one fixed order, so its bits do not depend on the other
// rows: a verify over k rows equals k decode steps (batch-invariant per path).
void attend_rows(HeadRows q, HeadRows keys, HeadRows values, int64_t rows, int64_t heads, int64_t kv_heads,
                 int64_t dim, const int64_t* begin, const int64_t* end, float scale, float* out,
                 int64_t out_head_stride, int64_t out_row_stride, Isa isa);

}  // namespace specdec
