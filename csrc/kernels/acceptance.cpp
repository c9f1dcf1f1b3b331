#include "acceptance.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "rng.hpp"
#include "sampling.hpp"
#include "threadpool.hpp"

namespace specdec {

void verify_batch(const void* target_logits, int dtype, int64_t B, int64_t K, int64_t V,
                  const int64_t* draft_tokens, const float* draft_probs, const int32_t* num_draft,
                  const double* temperature, const int64_t* top_k, const double* top_p, const double* min_p,
                  const uint64_t* seed, const uint64_t* offset, int64_t* out_tokens, int32_t* out_num_accepted,
                  int32_t* status, int32_t* status_pos) {
  const int64_t esize = dtype == kBF16 ? 2 : 4;
  const bool rows_par = B > 1 && available_workers() > 1;

  auto row = [&](int64_t b, bool par) {
    RowCtx& ctx = RowCtx::local();
    const RowParams P{temperature[b], top_k[b], top_p[b], min_p[b]};
    const int64_t n = num_draft[b];
    int64_t* toks = out_tokens + b * (K + 1);
    std::fill(toks, toks + K + 1, int64_t(-1));
    status[b] = 0;
    status_pos[b] = -1;
    out_num_accepted[b] = 0;
    auto logits_at = [&](int64_t j) {
      return LogitsRow{static_cast<const char*>(target_logits) + (b * (K + 1) + j) * V * esize, dtype, V};
    };
    auto fail = [&](int64_t j) {
      status[b] = 1;
      status_pos[b] = int32_t(j);
      std::fill(toks, toks + K + 1, int64_t(-1));
      out_num_accepted[b] = 0;
    };
    for (int64_t j = 0; j <= n; ++j) {
      const LogitsRow L = logits_at(j);
      const Dist d = compute_dist(ctx, L, P, par);
      if (d.bad) return fail(j);
      int64_t tok;
      bool stop = true;
      if (j == n) {
        // Every draft accepted: the bonus token from p at position n.
        tok = d.greedy ? d.argmax : sample_p(ctx, d, L, uniform(seed[b], offset[b], kStreamVerify, uint32_t(2 * j + 1)), -1, par);
      } else {
        const int64_t x = draft_tokens[b * K + j];
        const float* q = draft_probs ? draft_probs + (b * K + j) * V : nullptr;
        bool accept;
        if (d.greedy) {
          accept = x == d.argmax;
        } else {
          const double px = prob_of(d, L, x);
          const double qx = q ? double(q[x]) : 1.0;
          const double u = uniform(seed[b], offset[b], kStreamVerify, uint32_t(2 * j));
          accept = u * qx < px;  // u < min(1, p(x)/q(x)) without dividing
        }
        if (accept) {
          tok = x;
          stop = false;
        } else if (d.greedy) {
          tok = d.argmax;
        } else {
          const double u = uniform(seed[b], offset[b], kStreamVerify, uint32_t(2 * j + 1));
          tok = q ? sample_residual(ctx, d, L, q, u, par) : sample_p(ctx, d, L, u, x, par);
          if (tok < 0) tok = sample_p(ctx, d, L, u, -1, par);  // p - q has no positive mass: sample p
        }
      }
      toks[j] = tok;
      if (stop) {
        out_num_accepted[b] = int32_t(j);
        // The rest of the row is not needed, but it must still be valid input.
        for (int64_t r = j + 1; r <= n; ++r)
          if (!row_finite(ctx, logits_at(r), par)) return fail(r);
        return;
      }
    }
  };
  if (rows_par) {
    parallel_run(B, [&](int64_t b, int) { row(b, false); });
  } else {
    for (int64_t b = 0; b < B; ++b) row(b, V > kChunk);
  }
}

}  // namespace specdec
