// Batched speculative verification (Leviathan et al. 2023; Chen et al. 2023).
#pragma once
#include <cstdint>

namespace specdec {

// target_logits [B, K+1, V] (dtype kF32/kBF16), draft_tokens [B, K], draft_probs [B, K, V] float32 or
// nullptr (one-hot drafts), num_draft [B]. Outputs: out_tokens [B, K+1] (-1 padded), out_num_accepted [B].
// status[b] = 1 when row b has NaN/Inf logits at a position <= num_draft[b]; status_pos[b] is that position.
void verify_batch(const void* target_logits, int dtype, int64_t B, int64_t K, int64_t V,
                  const int64_t* draft_tokens, const float* draft_probs, const int32_t* num_draft,
                  const double* temperature, const int64_t* top_k, const double* top_p, const double* min_p,
                  const uint64_t* seed, const uint64_t* offset, int64_t* out_tokens, int32_t* out_num_accepted,
                  int32_t* status, int32_t* status_pos);

}  // namespace specdec
