#include "sampling.hpp"

#include <algorithm>
#include <cmath>

#include "rng.hpp"
#include "threadpool.hpp"
#include "vec.hpp"

namespace specdec {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kHistBins = 256;      // top-p prefilter: bins of width 1/8 in log space
constexpr float kHistScale = 8.0f;

typedef int32_t vi8 __attribute__((vector_size(32)));
typedef int32_t vi4 __attribute__((vector_size(16)));
SD_INLINE bool any(vi m) {
  vi8 a, b;
  std::memcpy(&a, &m, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&m) + 32, 32);
  a |= b;
  vi4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  c |= d;
  uint64_t u[2];
  std::memcpy(u, &c, 16);
  return (u[0] | u[1]) != 0;
}

// ---------------------------------------------------------------------------------------------
// Chunk kernels. Each has an always-inline template body and SD_CLONES wrappers per element type,
// so every ISA clone gets its own vector code and the same results.
// ---------------------------------------------------------------------------------------------

enum StatsMode { kMaxOnly = 0, kScaled = 1 };

// e_i on the kept set (s >= tau and e >= minp), 0 elsewhere: the unfiltered case is tau = -inf, minp = 0.
// The mask is skipped when it keeps everything (tau = -inf, minp = 0): same values, no selects.
SD_INLINE vf masked_e(vf x, vf vinv, vf vsm, vf vtau, vf vminp) {
  const vf sv = x * vinv;
  const vf e = vexp(sv - vsm);
  if (vtau[0] == -kInf && vminp[0] == 0.0f) return e;
  // Keep lanes where both (sv - tau) and (e - minp) are >= 0, using their sign bits (integer ops only;
  // for finite operands a - b >= 0 exactly when a >= b, since distinct floats never subtract to 0). The one
  // difference that is -0 while a >= b holds is sv = -0 against tau = +0: adding +0 turns it into +0, so a
  // token whose s is -0 is kept with its +0 ties, as masked_e1 and prob_of keep it (e is never -0).
  const vf d1 = (sv - vtau) + vf{}, d2 = e - vminp;
  vi i1, i2, ie;
  std::memcpy(&i1, &d1, sizeof(i1));
  std::memcpy(&i2, &d2, sizeof(i2));
  std::memcpy(&ie, &e, sizeof(ie));
  ie &= ~((i1 | i2) >> 31);
  vf out;
  std::memcpy(&out, &ie, sizeof(out));
  return out;
}
SD_INLINE float masked_e1(float x, float invT, float sm, float tau, float minp) {
  const float sv = x * invT;
  const float e = exp1(sv - sm);
  return (sv >= tau && e >= minp) ? e : 0.0f;
}

template <class T>
SD_INLINE void stats_impl(const T* l, int64_t n, float invT, int mode, ChunkStats* st) {
  vf vmx = splat(-kInf), vmn = splat(kInf);
  vf nanacc = vf{};  // x - x is 0 for finite x and NaN for NaN or Inf
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf x = loadv(l + i);
    vmx = vmax(vmx, x);
    vmn = vmin(vmn, x);
    nanacc += x - x;
  }
  float mx = hmax(vmx), mn = hmin(vmn);
  bool bad = !(hsum(nanacc) == 0.0);
  for (; i < n; ++i) {
    float x = load1(l + i);
    bad |= (x != x);
    mx = x > mx ? x : mx;
    mn = x < mn ? x : mn;
  }
  bad |= !std::isfinite(mx) || !std::isfinite(mn);
  st->lmax = mx;
  st->lmin = mn;
  st->bad = bad;
  st->sum_s = 0.0;
  if (bad || mode == kMaxOnly) return;
  if (mode & kScaled) {
    const float sm = mx * invT;
    const vf vinv = splat(invT), vsm = splat(sm);
    vf acc = vf{};
    i = 0;
    for (; i + kLanes <= n; i += kLanes) acc += vexp(loadv(l + i) * vinv - vsm);
    double s = hsum(acc);
    for (; i < n; ++i) s += double(exp1(load1(l + i) * invT - sm));
    st->sum_s = s;
  }
}
SD_CLONES void k_stats(const float* l, int64_t n, float invT, int mode, ChunkStats* st) {
  stats_impl(l, n, invT, mode, st);
}
SD_CLONES void k_stats(const bf16_t* l, int64_t n, float invT, int mode, ChunkStats* st) {
  stats_impl(l, n, invT, mode, st);
}

template <class T>
SD_INLINE int64_t find_first_impl(const T* l, int64_t n, float v) {
  for (int64_t i = 0; i < n; ++i)
    if (load1(l + i) == v) return i;
  return -1;
}
int64_t k_find_first(const float* l, int64_t n, float v) { return find_first_impl(l, n, v); }
int64_t k_find_first(const bf16_t* l, int64_t n, float v) { return find_first_impl(l, n, v); }

// Σ e_i over the chunk, with local index `excl` (or -1) left out.
template <class T>
SD_INLINE double sum_e_impl(const T* l, int64_t n, float invT, float sm, float tau, float minp, int64_t excl) {
  const vf vinv = splat(invT), vsm = splat(sm), vtau = splat(tau), vminp = splat(minp);
  vf acc = vf{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf e = masked_e(loadv(l + i), vinv, vsm, vtau, vminp);
    if (excl >= i && excl < i + kLanes) e[excl - i] = 0.0f;
    acc += e;
  }
  double s = hsum(acc);
  for (; i < n; ++i)
    if (i != excl) s += double(masked_e1(load1(l + i), invT, sm, tau, minp));
  return s;
}
SD_CLONES double k_sum_e(const float* l, int64_t n, float invT, float sm, float tau, float minp, int64_t excl) {
  return sum_e_impl(l, n, invT, sm, tau, minp, excl);
}
SD_CLONES double k_sum_e(const bf16_t* l, int64_t n, float invT, float sm, float tau, float minp, int64_t excl) {
  return sum_e_impl(l, n, invT, sm, tau, minp, excl);
}

// Residual weights r_i = max(fl(e_i·invZ) - q_i, 0).
template <class T>
SD_INLINE double sum_resid_impl(const T* l, const float* q, int64_t n, float invT, float sm, float tau, float minp,
                                 float invZ) {
  const vf vinv = splat(invT), vsm = splat(sm), vz = splat(invZ), zero = vf{}, vtau = splat(tau), vminp = splat(minp);
  vf acc = vf{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf r = masked_e(loadv(l + i), vinv, vsm, vtau, vminp) * vz - loadv(q + i);
    acc += vmax(r, zero);
  }
  double s = hsum(acc);
  for (; i < n; ++i) {
    float r = masked_e1(load1(l + i), invT, sm, tau, minp) * invZ - q[i];
    s += double(r > 0.0f ? r : 0.0f);
  }
  return s;
}
SD_CLONES double k_sum_resid(const float* l, const float* q, int64_t n, float invT, float sm, float tau, float minp,
                             float invZ) {
  return sum_resid_impl(l, q, n, invT, sm, tau, minp, invZ);
}
SD_CLONES double k_sum_resid(const bf16_t* l, const float* q, int64_t n, float invT, float sm, float tau, float minp,
                             float invZ) {
  return sum_resid_impl(l, q, n, invT, sm, tau, minp, invZ);
}

// Weight of element i for the sequential scan (identical to the vector lanes above).
template <class T>
SD_INLINE float w_e(const T* l, int64_t i, float invT, float sm) {
  return exp1(load1(l + i) * invT - sm);
}

// Sequential inverse-CDF scan inside one chunk: first i with prefix + Σ_{j<=i} w_j > target; if the
// running sum never gets there (rounding), the last i with w_i > 0; -1 if all weights are zero.
// Weights are computed 16 at a time with the same vector arithmetic as the chunk sums.
template <class T>
int64_t scan_e(const T* l, int64_t n, float invT, float sm, float tau, float minp, int64_t excl, double prefix,
               double target) {
  const vf vinv = splat(invT), vsm = splat(sm), vtau = splat(tau), vminp = splat(minp);
  double acc = prefix;
  int64_t last = -1;
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    vf e;
    const int64_t m = std::min<int64_t>(kLanes, n - i0);
    if (m == kLanes) {
      e = masked_e(loadv(l + i0), vinv, vsm, vtau, vminp);
    } else {
      for (int j = 0; j < m; ++j) e[j] = masked_e1(load1(l + i0 + j), invT, sm, tau, minp);
    }
    for (int j = 0; j < m; ++j) {
      const int64_t i = i0 + j;
      if (i == excl) continue;
      const float w = e[j];
      if (w > 0.0f) last = i;
      acc += double(w);
      if (acc > target) return i;
    }
  }
  return last;
}
template <class T>
int64_t scan_resid(const T* l, const float* q, int64_t n, float invT, float sm, float tau, float minp, float invZ,
                   double prefix, double target) {
  const vf vinv = splat(invT), vsm = splat(sm), vz = splat(invZ), vtau = splat(tau), vminp = splat(minp);
  double acc = prefix;
  int64_t last = -1;
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    vf r;
    const int64_t m = std::min<int64_t>(kLanes, n - i0);
    if (m == kLanes) {
      r = masked_e(loadv(l + i0), vinv, vsm, vtau, vminp) * vz - loadv(q + i0);
    } else {
      for (int j = 0; j < m; ++j) r[j] = masked_e1(load1(l + i0 + j), invT, sm, tau, minp) * invZ - q[i0 + j];
    }
    for (int j = 0; j < m; ++j) {
      const float w = r[j];
      if (!(w > 0.0f)) continue;
      last = i0 + j;
      acc += double(w);
      if (acc > target) return i0 + j;
    }
  }
  return last;
}

template <class T>
SD_INLINE void write_probs_impl(const T* l, int64_t n, float invT, float sm, float tau, float minp, float invZ,
                                float* out) {
  const vf vinv = splat(invT), vsm = splat(sm), vz = splat(invZ), vtau = splat(tau), vminp = splat(minp);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf p = masked_e(loadv(l + i), vinv, vsm, vtau, vminp) * vz;
    std::memcpy(out + i, &p, sizeof(p));
  }
  for (; i < n; ++i) out[i] = masked_e1(load1(l + i), invT, sm, tau, minp) * invZ;
}
SD_CLONES void k_write_probs(const float* l, int64_t n, float invT, float sm, float tau, float minp, float invZ,
                             float* out) {
  write_probs_impl(l, n, invT, sm, tau, minp, invZ, out);
}
SD_CLONES void k_write_probs(const bf16_t* l, int64_t n, float invT, float sm, float tau, float minp, float invZ,
                             float* out) {
  write_probs_impl(l, n, invT, sm, tau, minp, invZ, out);
}

// One streaming pass for top-k rows: max/min/NaN of the chunk and the max of every 64-token group
// (raw logits). The k-th largest group max is a lower bound on the k-th largest logit (k groups reach
// it), so only the few groups at or above it are read again to collect the candidates.
constexpr int64_t kGroup = 64;
template <class T>
SD_INLINE void stats_groups_impl(const T* l, int64_t n, ChunkStats* st, float* gmax) {
  vf vmx = splat(-kInf), vmn = splat(kInf);
  vf nanacc = vf{};  // x - x is 0 for finite x and NaN for NaN or Inf
  int64_t i = 0, g = 0;
  for (; i + kGroup <= n; i += kGroup, ++g) {
    vf x0 = loadv(l + i), x1 = loadv(l + i + kLanes), x2 = loadv(l + i + 2 * kLanes), x3 = loadv(l + i + 3 * kLanes);
    vf gm = vmax(vmax(x0, x1), vmax(x2, x3));
    vmx = vmax(vmx, gm);
    vmn = vmin(vmn, vmin(vmin(x0, x1), vmin(x2, x3)));
    nanacc += ((x0 - x0) + (x1 - x1)) + ((x2 - x2) + (x3 - x3));
    gmax[g] = hmax(gm);
  }
  float mx = hmax(vmx), mn = hmin(vmn);
  bool bad = !(hsum(nanacc) == 0.0);
  if (i < n) {
    float gm = -kInf;
    for (; i < n; ++i) {
      float x = load1(l + i);
      bad |= (x != x);
      gm = x > gm ? x : gm;
      mn = x < mn ? x : mn;
    }
    mx = gm > mx ? gm : mx;
    gmax[g] = gm;
  }
  bad |= !std::isfinite(mx) || !std::isfinite(mn);
  st->lmax = mx;
  st->lmin = mn;
  st->bad = bad;
  st->sum_s = 0.0;
}
SD_CLONES void k_stats_groups(const float* l, int64_t n, ChunkStats* st, float* gmax) {
  stats_groups_impl(l, n, st, gmax);
}
SD_CLONES void k_stats_groups(const bf16_t* l, int64_t n, ChunkStats* st, float* gmax) {
  stats_groups_impl(l, n, st, gmax);
}

// Mass histogram over d = sm - s in bins of width 1/kHistScale (the last bin takes the tail).
template <class T>
SD_INLINE void hist_impl(const T* l, int64_t n, float invT, float sm, double* hist) {
  const vf vinv = splat(invT), vsm = splat(sm);
  const vf top = splat(float(kHistBins - 1));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf s = loadv(l + i) * vinv;
    vf e = vexp(s - vsm);
    vf b = vmin((vsm - s) * splat(kHistScale), top);
    vi bi = __builtin_convertvector(b, vi);
    for (int j = 0; j < kLanes; j += 2) {
      hist[bi[j]] += double(e[j]);
      hist[kHistBins + bi[j + 1]] += double(e[j + 1]);
    }
  }
  for (; i < n; ++i) {
    float s = load1(l + i) * invT;
    float b = std::min((sm - s) * kHistScale, float(kHistBins - 1));
    hist[int(b)] += double(exp1(s - sm));
  }
}
SD_CLONES void k_hist(const float* l, int64_t n, float invT, float sm, double* hist) {
  hist_impl(l, n, invT, sm, hist);
}
SD_CLONES void k_hist(const bf16_t* l, int64_t n, float invT, float sm, double* hist) {
  hist_impl(l, n, invT, sm, hist);
}

SD_CLONES void k_exp_shift(const float* s, int64_t n, float sm, float* e) {
  const vf vsm = splat(sm);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf v = vexp(loadv(s + i) - vsm);
    std::memcpy(e + i, &v, sizeof(v));
  }
  for (; i < n; ++i) e[i] = exp1(s[i] - sm);
}

// ---------------------------------------------------------------------------------------------

template <class F>
void for_chunks(int64_t nch, bool par, const F& f) {
  if (par && nch > 1) {
    parallel_run(nch, [&](int64_t c, int w) { f(c, w); });
  } else {
    for (int64_t c = 0; c < nch; ++c) f(c, 0);
  }
}

inline int64_t nchunks(int64_t V) { return (V + kChunk - 1) / kChunk; }

// Dispatch on dtype: f(typed pointer).
template <class F>
auto with_typed(const LogitsRow& L, const F& f) {
  if (L.dtype == kBF16) return f(static_cast<const bf16_t*>(L.ptr));
  return f(static_cast<const float*>(L.ptr));
}

// The smallest s among tokens whose strictly-larger mass is < T (top-p threshold). Reorders s/e.
float weighted_threshold(float* s, float* e, int64_t n, double T, double above0 = 0.0) {
  int64_t lo = 0, hi = n;
  double above = above0;
  float best = kInf;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    float a = s[lo], b = s[mid], c = s[hi - 1];
    const float v = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    int64_t lt = lo, i = lo, gt = hi;  // [lo,lt) > v, [lt,i) == v, [gt,hi) < v
    while (i < gt) {
      if (s[i] > v) {
        std::swap(s[i], s[lt]);
        std::swap(e[i], e[lt]);
        ++lt;
        ++i;
      } else if (s[i] < v) {
        --gt;
        std::swap(s[i], s[gt]);
        std::swap(e[i], e[gt]);
      } else {
        ++i;
      }
    }
    double mass_hi = 0.0, mass_eq = 0.0;
    for (int64_t j = lo; j < lt; ++j) mass_hi += e[j];
    for (int64_t j = lt; j < gt; ++j) mass_eq += e[j];
    const double G = above + mass_hi;
    if (G < T) {
      best = v;
      above = G + mass_eq;
      lo = gt;
    } else {
      hi = lt;
    }
  }
  return best;
}

// Merges per-worker candidate buffers into ctx.cidx/cs sorted by token id.
void merge_candidates(RowCtx& ctx, int nworkers) {
  ctx.pairs.clear();
  for (int w = 0; w < nworkers; ++w) {
    CandBuf& b = ctx.wbuf[w];
    for (size_t i = 0; i < b.idx.size(); ++i) ctx.pairs.emplace_back(b.idx[i], b.s[i]);
  }
  std::sort(ctx.pairs.begin(), ctx.pairs.end(),
            [](const std::pair<int32_t, float>& a, const std::pair<int32_t, float>& b) { return a.first < b.first; });
  ctx.cidx.resize(ctx.pairs.size());
  ctx.cs.resize(ctx.pairs.size());
  for (size_t i = 0; i < ctx.pairs.size(); ++i) {
    ctx.cidx[i] = ctx.pairs[i].first;
    ctx.cs[i] = ctx.pairs[i].second;
  }
}

// Collects the tokens of histogram bucket `bstar` (same bucket arithmetic as k_hist) and the smallest
// s among tokens in buckets before it.
template <class T>
SD_INLINE void collect_bucket_impl(const T* l, int64_t n, int64_t base, float invT, float sm, int bstar, CandBuf& b,
                                   float* min_above) {
  // bucket(s) = int(min((sm - s)·8, 255)); with x = (sm - s)·8: bucket < bstar iff x < bstar, and
  // bucket == bstar iff bstar <= x < bstar + 1 (x >= 255 for the last bucket). Sign bits, no selects.
  const vf vinv = splat(invT), vsm = splat(sm), top = splat(float(kHistBins - 1));
  const vf lo = splat(float(bstar)), hi = splat(bstar == kHistBins - 1 ? kInf : float(bstar + 1));
  const vf pinf = splat(kInf);
  vi pinf_bits;
  std::memcpy(&pinf_bits, &pinf, sizeof(pinf_bits));
  vf vmin_above = pinf;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf sv = loadv(l + i) * vinv;
    const vf x = vmin((vsm - sv) * splat(kHistScale), top);
    const vf dlo = x - lo, dhi = x - hi;
    vi ilo, ihi, isv;
    std::memcpy(&ilo, &dlo, sizeof(ilo));
    std::memcpy(&ihi, &dhi, sizeof(ihi));
    std::memcpy(&isv, &sv, sizeof(isv));
    const vi below = ilo >> 31;                 // all ones where x < bstar
    const vi in_bucket = ~below & (ihi >> 31);  // bstar <= x < bstar + 1
    const vi cand = (isv & below) | (pinf_bits & ~below);
    vf cf;
    std::memcpy(&cf, &cand, sizeof(cf));
    vmin_above = vmin(vmin_above, cf);
    if (any(in_bucket)) {
      for (int j = 0; j < kLanes; ++j)
        if (in_bucket[j]) {
          b.idx.push_back(int32_t(base + i + j));
          b.s.push_back(sv[j]);
        }
    }
  }
  float ma = hmin(vmin_above);
  for (; i < n; ++i) {
    const float sv = load1(l + i) * invT;
    const int bi = int(std::min((sm - sv) * kHistScale, float(kHistBins - 1)));
    if (bi < bstar) ma = std::min(ma, sv);
    if (bi == bstar) {
      b.idx.push_back(int32_t(base + i));
      b.s.push_back(sv);
    }
  }
  *min_above = std::min(*min_above, ma);
}
SD_CLONES void k_collect_bucket(const float* l, int64_t n, int64_t base, float invT, float sm, int bstar, CandBuf& b,
                                float* min_above) {
  collect_bucket_impl(l, n, base, invT, sm, bstar, b, min_above);
}
SD_CLONES void k_collect_bucket(const bf16_t* l, int64_t n, int64_t base, float invT, float sm, int bstar, CandBuf& b,
                                float* min_above) {
  collect_bucket_impl(l, n, base, invT, sm, bstar, b, min_above);
}

// Top-p threshold without top-k: the smallest kept s. A mass histogram over d = m - s (per chunk, merged
// in chunk order so the result does not depend on threads) finds the bucket where the strictly-larger
// mass crosses top_p·Z: buckets before it are kept, buckets after it dropped, and only its own tokens
// go through the weighted selection.
float top_p_threshold(RowCtx& ctx, const LogitsRow& L, float invT, float sm, double top_p, bool par) {
  const int64_t V = L.V, nch = nchunks(V);
  const int nw = par ? std::max(1, available_workers()) : 1;
  ctx.chist.assign(size_t(nch) * 2 * kHistBins, 0.0);
  with_typed(L, [&](auto* l) {
    for_chunks(nch, par, [&](int64_t c, int) {
      const int64_t b = c * kChunk;
      k_hist(l + b, std::min(kChunk, V - b), invT, sm, ctx.chist.data() + c * 2 * kHistBins);
    });
    return 0;
  });
  double H[kHistBins];
  double total = 0.0;
  for (int b = 0; b < kHistBins; ++b) {
    double h = 0.0;
    for (int64_t c = 0; c < nch; ++c) h += ctx.chist[c * 2 * kHistBins + b] + ctx.chist[c * 2 * kHistBins + kHistBins + b];
    H[b] = h;
    total += h;
  }
  const double T = top_p * total;
  double above = 0.0;
  int bstar = kHistBins - 1;
  for (int b = 0; b < kHistBins; ++b) {
    if (above + H[b] >= T) {
      bstar = b;
      break;
    }
    above += H[b];
  }
  if (int(ctx.wbuf.size()) < nw) ctx.wbuf.resize(nw);
  std::vector<float> min_above(nw, kInf);
  for (int w = 0; w < nw; ++w) ctx.wbuf[w].clear();
  with_typed(L, [&](auto* l) {
    for_chunks(nch, par, [&](int64_t c, int w) {
      const int64_t b = c * kChunk;
      k_collect_bucket(l + b, std::min(kChunk, V - b), b, invT, sm, bstar, ctx.wbuf[w], &min_above[w]);
    });
    return 0;
  });
  merge_candidates(ctx, nw);
  const int64_t n = int64_t(ctx.cs.size());
  ctx.ce.resize(n);
  k_exp_shift(ctx.cs.data(), n, sm, ctx.ce.data());
  const float best = weighted_threshold(ctx.cs.data(), ctx.ce.data(), n, T, above);
  if (best < kInf) return best;
  float ma = kInf;
  for (int w = 0; w < nw; ++w) ma = std::min(ma, min_above[w]);
  return ma;
}

}  // namespace

RowCtx& RowCtx::local() {
  thread_local RowCtx ctx;
  return ctx;
}

Dist compute_dist(RowCtx& ctx, const LogitsRow& L, const RowParams& P, bool par) {
  Dist d;
  const int64_t V = L.V;
  const int64_t nch = nchunks(V);
  const int nw = par ? std::max(1, available_workers()) : 1;
  ctx.stats.resize(nch);
  if (int(ctx.wbuf.size()) < nw) ctx.wbuf.resize(nw);

  d.greedy = !(P.temperature > double(kGreedyTemperature));
  const float invT = d.greedy ? 1.0f : float(1.0 / P.temperature);
  d.invT = invT;
  const int64_t k = (!d.greedy && P.top_k > 0 && P.top_k < V) ? P.top_k : 0;
  // Top-k rows never need the full softmax sum: p is renormalised over the kept tokens. Their one
  // pass over the vocabulary finds the max and the top-k candidates together.
  const bool need_sum = !d.greedy && k == 0;
  const int mode = need_sum ? kScaled : kMaxOnly;

  for (int w = 0; w < nw; ++w) ctx.wbuf[w].clear();
  const int64_t ngroups = (V + kGroup - 1) / kGroup;
  if (k > 0) ctx.gmax.resize(ngroups);
  with_typed(L, [&](auto* l) {
    for_chunks(nch, par, [&](int64_t c, int w) {
      const int64_t b = c * kChunk, n = std::min(kChunk, V - b);
      if (k > 0) {
        k_stats_groups(l + b, n, &ctx.stats[c], ctx.gmax.data() + b / kGroup);
      } else {
        k_stats(l + b, n, invT, mode, &ctx.stats[c]);
      }
    });
    return 0;
  });
  float lmax = -kInf;
  for (int64_t c = 0; c < nch; ++c) {
    if (ctx.stats[c].bad) {
      d.bad = true;
      return d;
    }
    lmax = std::max(lmax, ctx.stats[c].lmax);
  }

  if (d.greedy) {
    for (int64_t c = 0; c < nch; ++c)
      if (ctx.stats[c].lmax == lmax) {
        const int64_t b = c * kChunk;
        d.argmax = b + with_typed(L, [&](auto* l) { return k_find_first(l + b, std::min(kChunk, V - b), lmax); });
        break;
      }
    return d;
  }

  const float sm = lmax * invT;
  d.smax = sm;
  double zall = 0.0;
  if (need_sum)
    for (int64_t c = 0; c < nch; ++c)
      zall += ctx.stats[c].sum_s * std::exp(double(ctx.stats[c].lmax * invT) - double(sm));

  const bool use_p = P.top_p < 1.0, use_minp = P.min_p > 0.0;
  if (k == 0 && !use_p && !use_minp) {
    d.Z = zall;
    d.invZ = float(1.0 / zall);
    return d;
  }

  if (k == 0) {
    // No top-k: the kept set is a mask over the whole vocabulary, {s >= tau} ∩ {e >= min_p}.
    float tau = -kInf;
    if (use_p) tau = top_p_threshold(ctx, L, invT, sm, P.top_p, par);
    d.tau = tau;
    d.minp = use_minp ? float(P.min_p) : 0.0f;
    ctx.csum.resize(nch);
    with_typed(L, [&](auto* l) {
      for_chunks(nch, par, [&](int64_t c, int) {
        const int64_t b = c * kChunk;
        ctx.csum[c] = k_sum_e(l + b, std::min(kChunk, V - b), invT, sm, d.tau, d.minp, -1);
      });
      return 0;
    });
    double z = 0.0;
    for (int64_t c = 0; c < nch; ++c) z += ctx.csum[c];
    d.Z = z;
    d.invZ = float(1.0 / z);
    return d;
  }

  // Top-k: gather a candidate superset of the kept tokens, sorted by id.
  d.filtered = true;
  {
    // Lower bound on the k-th largest raw logit from the group maxima, then collect the candidates
    // (s >= fl(bound * invT)) from the groups that reach it, in token order.
    float bound = -kInf;
    if (k <= ngroups) {
      ctx.tmp.assign(ctx.gmax.begin(), ctx.gmax.end());
      std::nth_element(ctx.tmp.begin(), ctx.tmp.begin() + (k - 1), ctx.tmp.end(), std::greater<float>());
      bound = ctx.tmp[k - 1];
    }
    const float sb = bound * invT;
    ctx.cidx.clear();
    ctx.cs.clear();
    with_typed(L, [&](auto* l) {
      for (int64_t g = 0; g < ngroups; ++g) {
        if (!(ctx.gmax[g] * invT >= sb)) continue;  // s-space: monotone rounding never drops a tie
        const int64_t e = std::min(V, (g + 1) * kGroup);
        for (int64_t i = g * kGroup; i < e; ++i) {
          const float sv = load1(l + i) * invT;
          if (sv >= sb) {
            ctx.cidx.push_back(int32_t(i));
            ctx.cs.push_back(sv);
          }
        }
      }
      return 0;
    });
    ctx.tmp.assign(ctx.cs.begin(), ctx.cs.end());
    std::nth_element(ctx.tmp.begin(), ctx.tmp.begin() + (k - 1), ctx.tmp.end(), std::greater<float>());
    d.tau = ctx.tmp[k - 1];
  }
  int64_t n = int64_t(ctx.cs.size());
  ctx.ce.resize(n);
  k_exp_shift(ctx.cs.data(), n, sm, ctx.ce.data());

  float tau = d.tau;
  if (use_p) {
    double zk = 0.0;
    if (k > 0) {
      for (int64_t i = 0; i < n; ++i)
        if (ctx.cs[i] >= tau) zk += double(ctx.ce[i]);
    } else {
      zk = zall;
    }
    // Work on copies restricted to the top-k set.
    ctx.tmp.clear();
    std::vector<float>& ws = ctx.tmp;
    thread_local std::vector<float> we;
    we.clear();
    for (int64_t i = 0; i < n; ++i)
      if (ctx.cs[i] >= tau) {
        ws.push_back(ctx.cs[i]);
        we.push_back(ctx.ce[i]);
      }
    const float tp = weighted_threshold(ws.data(), we.data(), int64_t(ws.size()), P.top_p * zk);
    tau = std::max(tau, tp);
  }
  const float minp = use_minp ? float(P.min_p) : 0.0f;
  int64_t w = 0;
  double z = 0.0;
  for (int64_t i = 0; i < n; ++i)
    if (ctx.cs[i] >= tau && ctx.ce[i] >= minp) {
      ctx.cidx[w] = ctx.cidx[i];
      ctx.cs[w] = ctx.cs[i];
      ctx.ce[w] = ctx.ce[i];
      z += double(ctx.ce[w]);
      ++w;
    }
  d.tau = tau;
  d.minp = minp;
  d.Z = z;
  d.invZ = float(1.0 / z);
  d.kidx = ctx.cidx.data();
  d.ke = ctx.ce.data();
  d.nkept = w;
  return d;
}

float prob_of(const Dist& d, const LogitsRow& L, int64_t x) {
  if (d.greedy) return x == d.argmax ? 1.0f : 0.0f;
  const float s = with_typed(L, [&](auto* l) { return load1(l + x); }) * d.invT;
  const float e = exp1(s - d.smax);
  if (!(s >= d.tau && e >= d.minp)) return 0.0f;
  return e * d.invZ;
}

int64_t sample_p(RowCtx& ctx, const Dist& d, const LogitsRow& L, double u, int64_t excl, bool par) {
  if (d.greedy) return d.argmax == excl ? -1 : d.argmax;
  if (d.filtered) {
    double R = 0.0;
    for (int64_t i = 0; i < d.nkept; ++i)
      if (d.kidx[i] != excl) R += double(d.ke[i]);
    if (!(R > 0.0)) return -1;
    const double target = u * R;
    double acc = 0.0;
    int64_t last = -1;
    for (int64_t i = 0; i < d.nkept; ++i) {
      if (d.kidx[i] == excl) continue;
      last = d.kidx[i];
      acc += double(d.ke[i]);
      if (acc > target) return d.kidx[i];
    }
    return last;
  }
  const int64_t V = L.V, nch = nchunks(V);
  ctx.csum.resize(nch);
  return with_typed(L, [&](auto* l) -> int64_t {
    for_chunks(nch, par, [&](int64_t c, int) {
      const int64_t b = c * kChunk;
      ctx.csum[c] = k_sum_e(l + b, std::min(kChunk, V - b), d.invT, d.smax, d.tau, d.minp, excl >= b && excl < b + kChunk ? excl - b : -1);
    });
    double R = 0.0;
    for (int64_t c = 0; c < nch; ++c) R += ctx.csum[c];
    if (!(R > 0.0)) return -1;
    const double target = u * R;
    double prefix = 0.0;
    int64_t lastc = -1;
    for (int64_t c = 0; c < nch; ++c) {
      if (ctx.csum[c] > 0.0) lastc = c;
      if (prefix + ctx.csum[c] > target) {
        lastc = c;
        break;
      }
      prefix += ctx.csum[c];
    }
    if (lastc < 0) return -1;
    const int64_t b = lastc * kChunk;
    double pre = 0.0;
    for (int64_t c = 0; c < lastc; ++c) pre += ctx.csum[c];
    const int64_t i = scan_e(l + b, std::min(kChunk, V - b), d.invT, d.smax, d.tau, d.minp,
                             excl >= b && excl < b + kChunk ? excl - b : -1, pre, target);
    return i < 0 ? -1 : b + i;
  });
}

int64_t sample_residual(RowCtx& ctx, const Dist& d, const LogitsRow& L, const float* q, double u, bool par) {
  if (d.filtered) {
    double R = 0.0;
    for (int64_t i = 0; i < d.nkept; ++i) {
      const float r = d.ke[i] * d.invZ - q[d.kidx[i]];
      if (r > 0.0f) R += double(r);
    }
    if (!(R > 0.0) || !std::isfinite(R)) return -1;
    const double target = u * R;
    double acc = 0.0;
    int64_t last = -1;
    for (int64_t i = 0; i < d.nkept; ++i) {
      const float r = d.ke[i] * d.invZ - q[d.kidx[i]];
      if (!(r > 0.0f)) continue;
      last = d.kidx[i];
      acc += double(r);
      if (acc > target) return d.kidx[i];
    }
    return last;
  }
  const int64_t V = L.V, nch = nchunks(V);
  ctx.csum.resize(nch);
  return with_typed(L, [&](auto* l) -> int64_t {
    for_chunks(nch, par, [&](int64_t c, int) {
      const int64_t b = c * kChunk;
      ctx.csum[c] = k_sum_resid(l + b, q + b, std::min(kChunk, V - b), d.invT, d.smax, d.tau, d.minp, d.invZ);
    });
    double R = 0.0;
    for (int64_t c = 0; c < nch; ++c) R += ctx.csum[c];
    if (!(R > 0.0) || !std::isfinite(R)) return -1;
    const double target = u * R;
    double prefix = 0.0;
    int64_t cc = -1;
    for (int64_t c = 0; c < nch; ++c) {
      if (ctx.csum[c] > 0.0) cc = c;
      if (prefix + ctx.csum[c] > target) {
        cc = c;
        break;
      }
      prefix += ctx.csum[c];
    }
    if (cc < 0) return -1;
    const int64_t b = cc * kChunk;
    double pre = 0.0;
    for (int64_t c = 0; c < cc; ++c) pre += ctx.csum[c];
    const int64_t i = scan_resid(l + b, q + b, std::min(kChunk, V - b), d.invT, d.smax, d.tau, d.minp, d.invZ, pre, target);
    return i < 0 ? -1 : b + i;
  });
}

void write_probs(const Dist& d, const LogitsRow& L, float* out, bool par) {
  const int64_t V = L.V;
  if (d.greedy || d.filtered) {
    std::fill(out, out + V, 0.0f);
    if (d.greedy) {
      out[d.argmax] = 1.0f;
    } else {
      for (int64_t i = 0; i < d.nkept; ++i) out[d.kidx[i]] = d.ke[i] * d.invZ;
    }
    return;
  }
  const int64_t nch = nchunks(V);
  with_typed(L, [&](auto* l) {
    for_chunks(nch, par, [&](int64_t c, int) {
      const int64_t b = c * kChunk;
      k_write_probs(l + b, std::min(kChunk, V - b), d.invT, d.smax, d.tau, d.minp, d.invZ, out + b);
    });
    return 0;
  });
}

bool row_finite(RowCtx& ctx, const LogitsRow& L, bool par) {
  const int64_t V = L.V, nch = nchunks(V);
  ctx.stats.resize(nch);
  with_typed(L, [&](auto* l) {
    for_chunks(nch, par, [&](int64_t c, int) {
      const int64_t b = c * kChunk;
      k_stats(l + b, std::min(kChunk, V - b), 1.0f, kMaxOnly, &ctx.stats[c]);
    });
    return 0;
  });
  for (int64_t c = 0; c < nch; ++c)
    if (ctx.stats[c].bad) return false;
  return true;
}

void sample_batch(const void* logits, int dtype, int64_t B, int64_t V, const double* temperature,
                  const int64_t* top_k, const double* top_p, const double* min_p, const uint64_t* seed,
                  const uint64_t* offset, int64_t* out_tokens, float* out_probs, int32_t* status) {
  const int64_t esize = dtype == kBF16 ? 2 : 4;
  const bool rows_par = B > 1 && available_workers() > 1;
  auto row = [&](int64_t b, bool par) {
    RowCtx& ctx = RowCtx::local();
    LogitsRow L{static_cast<const char*>(logits) + b * V * esize, dtype, V};
    RowParams P{temperature[b], top_k[b], top_p[b], min_p[b]};
    status[b] = 0;
    out_tokens[b] = -1;
    Dist d = compute_dist(ctx, L, P, par);
    if (d.bad) {
      status[b] = 1;
      if (out_probs) std::fill(out_probs + b * V, out_probs + (b + 1) * V, 0.0f);
      return;
    }
    const double u = uniform(seed[b], offset[b], kStreamSample, 0);
    out_tokens[b] = sample_p(ctx, d, L, u, -1, par);
    if (out_probs) write_probs(d, L, out_probs + b * V, par);
  };
  if (rows_par) {
    parallel_run(B, [&](int64_t b, int) { row(b, false); });
  } else {
    for (int64_t b = 0; b < B; ++b) row(b, V > kChunk);
  }
}

}  // namespace specdec

namespace specdec {

namespace {

// log p_i of the processed distribution d, in double from the scaled logit: s_i - max s - log Z, so that a token far
// below the maximum gets its true value, not the floor of the samplers' exp. −inf where a filter removes i.
double processed_logprob(const Dist& d, const LogitsRow& L, int64_t i) {
  const float s = with_typed(L, [&](auto* l) { return load1(l + i); }) * d.invT;
  const bool kept = d.filtered ? std::binary_search(d.kidx, d.kidx + d.nkept, int32_t(i))
                               : s >= d.tau && exp1(s - d.smax) >= d.minp;
  if (!kept) return -std::numeric_limits<double>::infinity();
  return double(s) - double(d.smax) - std::log(d.Z);
}

}  // namespace

void logprobs_batch(const void* logits, int dtype, int64_t N, int64_t V, const int64_t* tokens,
                    const double* temperature, const int64_t* top_k, const double* top_p, const double* min_p,
                    int64_t top_n, float* out_logprobs, int64_t* out_top_ids, float* out_top_logprobs,
                    int32_t* status) {
  const int64_t esize = dtype == kBF16 ? 2 : 4;
  const bool rows_par = N > 1 && available_workers() > 1;
  auto row = [&](int64_t r, bool par) {
    RowCtx& ctx = RowCtx::local();
    const LogitsRow L{static_cast<const char*>(logits) + r * V * esize, dtype, V};
    // A greedy row reports its distribution at temperature 1 (its own is one-hot).
    const double T = temperature[r] > double(kGreedyTemperature) ? temperature[r] : 1.0;
    const Dist d = compute_dist(ctx, L, RowParams{T, top_k[r], top_p[r], min_p[r]}, par);
    int64_t* ids = out_top_ids + r * top_n;
    float* lps = out_top_logprobs + r * top_n;
    std::fill(ids, ids + top_n, int64_t(-1));
    std::fill(lps, lps + top_n, -std::numeric_limits<float>::infinity());
    status[r] = d.bad ? 1 : 0;
    if (d.bad) {
      out_logprobs[r] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    out_logprobs[r] = float(processed_logprob(d, L, tokens[r]));
    if (top_n == 0) return;
    // The top_n largest logits (the processed order is the logits' order), ties to the lower id: a sorted list of
    // (logit, id) that a larger logit, or an equal one with a lower id (never: ids ascend), displaces.
    std::vector<std::pair<float, int64_t>> best;
    best.reserve(top_n + 1);
    auto offer = [&](float v, int64_t i) {
      if (int64_t(best.size()) == top_n && !(v > best.back().first)) return;
      auto at = std::upper_bound(best.begin(), best.end(), v, [](float a, const auto& b) { return a > b.first; });
      best.insert(at, {v, i});
      if (int64_t(best.size()) > top_n) best.pop_back();
    };
    with_typed(L, [&](auto* l) {
      if (d.filtered) {
        for (int64_t i = 0; i < d.nkept; ++i) offer(load1(l + d.kidx[i]), d.kidx[i]);
      } else {
        for (int64_t i = 0; i < V; ++i) offer(load1(l + i), i);
      }
      return 0;
    });
    for (size_t j = 0; j < best.size(); ++j) {
      const double lp = processed_logprob(d, L, best[j].second);
      if (lp == -std::numeric_limits<double>::infinity()) break;  // the rest are filtered out too
      ids[j] = best[j].second;
      lps[j] = float(lp);
    }
  };
  if (rows_par) {
    parallel_run(N, [&](int64_t r, int) { row(r, false); });
  } else {
    for (int64_t r = 0; r < N; ++r) row(r, V > kChunk);
  }
}

}  // namespace specdec
