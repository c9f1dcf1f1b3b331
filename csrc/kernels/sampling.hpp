// Row-level building blocks shared by sample() and verify().
//
// Processing of one row of logits l[0..V) (the same in sample and verify):
//   greedy (temperature 0):   p = one-hot at argmax l (lowest id on ties)
//   otherwise:                s_i = fl32(l_i * fl32(1/T)),  m = max_i s_i,  e_i = exp32(s_i - m)
//                             keep = top-k (all s >= k-th largest s, ties kept)
//                                  ∩ top-p (tokens whose strictly-larger mass G_i < top_p · Σ_{top-k} e)
//                                  ∩ min-p (e_i >= min_p, i.e. p_i >= min_p · p_max)
//                             p_i = fl32(e_i · fl32(1/Z)) on keep, 0 elsewhere, Z = Σ_keep e_i
// exp32 is the vector exp in vec.hpp. Filters are applied in transformers' order:
// temperature, top-k, top-p, min-p.
//
// Sampling from a weight vector w with a uniform u is the inverse CDF in token-id order: the first
// token whose running sum exceeds u·Σw (sums in double over fixed 4096-token chunks, so results do
// not depend on the thread count).
#pragma once
#include <cstdint>
#include <limits>
#include <vector>

namespace specdec {

enum Dtype : int { kF32 = 0, kBF16 = 1 };

constexpr int64_t kChunk = 4096;  // fixed: reductions are per chunk, combined in chunk order
constexpr float kGreedyTemperature = 1e-5f;  // temperatures at or below this are treated as greedy

struct RowParams {
  double temperature = 0.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  double min_p = 0.0;
};

struct LogitsRow {
  const void* ptr = nullptr;
  int dtype = kF32;
  int64_t V = 0;
};

struct Dist {
  bool bad = false;  // NaN or Inf in the logits
  bool greedy = false;
  int64_t argmax = -1;
  float invT = 1.0f, smax = 0.0f;
  bool filtered = false;  // true: the kept tokens are listed in kidx/ke (sorted by id)
  float tau = -std::numeric_limits<float>::infinity();
  float minp = 0.0f;
  double Z = 0.0;
  float invZ = 0.0f;
  const int32_t* kidx = nullptr;
  const float* ke = nullptr;
  int64_t nkept = 0;
};

struct CandBuf {
  std::vector<int32_t> idx;
  std::vector<float> s;
  float theta = -std::numeric_limits<float>::infinity();
  void clear() {
    idx.clear();
    s.clear();
    theta = -std::numeric_limits<float>::infinity();
  }
};

struct ChunkStats {
  float lmax, lmin;
  bool bad;
  double sum_s;  // Σ exp(s - fl(lmax·invT)) over the chunk
};

// Per-thread scratch, reused across calls (no allocation of size V in the steady state).
struct RowCtx {
  std::vector<ChunkStats> stats;
  std::vector<CandBuf> wbuf;  // per pool worker
  std::vector<int32_t> cidx;
  std::vector<float> cs, ce, tmp;
  std::vector<std::pair<int32_t, float>> pairs;
  std::vector<double> csum;
  std::vector<double> chist;  // per-chunk top-p histograms
  std::vector<float> gmax;  // per 64-token group maxima (top-k)
  static RowCtx& local();
};

// par: split the vocabulary across the thread pool.
Dist compute_dist(RowCtx& ctx, const LogitsRow& L, const RowParams& P, bool par);
// p(x) exactly as sample(return_probs=True) reports it.
float prob_of(const Dist& d, const LogitsRow& L, int64_t x);
// Sample from p with token `excl` removed (excl < 0: none); -1 when no mass is left.
int64_t sample_p(RowCtx& ctx, const Dist& d, const LogitsRow& L, double u, int64_t excl, bool par);
// Sample from normalize(max(p - q, 0)); -1 when it has no positive mass.
int64_t sample_residual(RowCtx& ctx, const Dist& d, const LogitsRow& L, const float* q, double u, bool par);
void write_probs(const Dist& d, const LogitsRow& L, float* out, bool par);
// False when the row has NaN or Inf.
bool row_finite(RowCtx& ctx, const LogitsRow& L, bool par);

// Batched sample(); status[b] = 1 for a row with NaN/Inf logits (its outputs are left as -1 / 0).
void sample_batch(const void* logits, int dtype, int64_t B, int64_t V, const double* temperature,
                  const int64_t* top_k, const double* top_p, const double* min_p, const uint64_t* seed,
                  const uint64_t* offset, int64_t* out_tokens, float* out_probs, int32_t* status);

// Log-probabilities under each row's processed distribution (a greedy row's at temperature 1): of tokens[r], and
// the top_n most likely tokens, most likely first (ties to the lower id), padded with -1 / -inf where fewer are
// kept. logits [N, V]; out_logprobs [N]; out_top_ids, out_top_logprobs [N, top_n]; status[r] = 1 for NaN/Inf.
void logprobs_batch(const void* logits, int dtype, int64_t N, int64_t V, const int64_t* tokens,
                    const double* temperature, const int64_t* top_k, const double* top_p, const double* min_p,
                    int64_t top_n, float* out_logprobs, int64_t* out_top_ids, float* out_top_logprobs,
                    int32_t* status);

}  // namespace specdec
