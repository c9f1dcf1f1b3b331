"""Microbenchmark: fused C++ verify/sample (specdec.kernels) against the same computation in torch ops.

    python bench/kernels.py [--json out.json] [--quick] [--filters topk-topp|topp|none] [--draft q|onehot]

The torch side is what a plain PyTorch implementation does: temperature, transformers-style top-k
(torch.topk) and sort-based top-p, softmax, then the rejection-sampling rule with torch ops over the
whole batch (accept test, residual normalize(max(p - q, 0)), bonus token), all K+1 positions at once.
Both sides use 2 threads (torch.get_num_threads() and the kernels' pool) unless told otherwise.

Reported per cell: median ms of each side, their ratio, and the GB/s of target logits read by the
fused kernel (B*(K+1)*V*itemsize / median time; the kernel reads every target logit at least once,
including positions after a rejection, which it checks for NaN/Inf). The machine's streaming bandwidth
is measured in the same run with a plain large array copy (torch copy_, same thread count; STREAM
convention: bytes read + bytes written per second) and printed beside the table.

Logits are synthetic but LLM-like: N(0, 2^2) with one boosted token per position (+10), and drafts
are sampled from a draft distribution q (a perturbed copy of the target) so that acceptance runs
deep, as with a real draft model. The acceptance rate measured in the run is printed.

The fused side cycles through enough copies of its inputs (>= 96 MB in all) that every call reads
its logits from DRAM, not from the 32 MB L3: small cells would otherwise report cache bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from specdec import torch_env

torch_env.prepare()  # before torch loads its libraries

# ruff: noqa: E402
import numpy as np
import torch

from specdec import kernels as K

GRID_V = [32000, 128256, 151936]
GRID_K = [1, 4, 8]
GRID_B = [1, 8, 32]
FILTERS = {
    "topk-topp": dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.0),
    "topp": dict(temperature=0.8, top_k=0, top_p=0.95, min_p=0.0),
    "none": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
}


# ---------------------------------------------------------------------------------------------------
# The torch-ops version


def torch_process(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Processed probabilities [..., V] as transformers' warpers compute them (float32)."""
    x = logits.float() / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, si = torch.sort(x, dim=-1, descending=False)
        cum = sx.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False
        x = x.masked_fill(remove.scatter(-1, si, remove), float("-inf"))
    p = torch.softmax(x, dim=-1)
    if min_p > 0.0:
        p = p.masked_fill(p < min_p * p.amax(-1, keepdim=True), 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p


def torch_verify(target_logits, draft_tokens, draft_probs, num_draft, filters, u):
    """Rejection sampling with torch ops; u [B, 2K+2] uniforms. Returns (tokens [B, K+1], num_accepted [B])."""
    B, K1, V = target_logits.shape
    Kd = K1 - 1
    p = torch_process(target_logits, **filters)  # [B, K+1, V]
    px = p[:, :Kd].gather(-1, draft_tokens[..., None]).squeeze(-1)
    if draft_probs is not None:
        q = draft_probs
        qx = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
    else:
        q = torch.zeros_like(p[:, :Kd]).scatter_(-1, draft_tokens[..., None], 1.0)
        qx = torch.ones_like(px)
    accept = u[:, 0 : 2 * Kd : 2] * qx < px
    accept &= torch.arange(Kd)[None] < num_draft[:, None]
    nacc = accept.int().cumprod(-1).sum(-1)  # first rejection
    # residual at every position, bonus distribution at the last: pick each row's final distribution
    r = (p[:, :Kd] - q).clamp_min(0.0)
    rs = r.sum(-1, keepdim=True)
    r = torch.where(rs > 0, r / rs.clamp_min(1e-30), p[:, :Kd])
    final = torch.cat([r, p[:, Kd:]], dim=1)
    rows = torch.arange(B)
    last = torch.where(nacc < num_draft, nacc, num_draft).long()
    w = final[rows, last]  # [B, V]
    cdf = w.cumsum(-1)
    uu = u[rows, 2 * last + 1].float()[:, None] * cdf[:, -1:]
    tok = torch.searchsorted(cdf, uu, right=True).clamp_max(V - 1).squeeze(-1)
    tokens = torch.full((B, K1), -1, dtype=torch.int64)
    keep = torch.arange(K1)[None] < nacc[:, None]
    tokens[:, :Kd] = torch.where(keep[:, :Kd], draft_tokens, -1)
    tokens[rows, last] = tok
    return tokens, nacc


def torch_sample(logits, filters, u0):
    p = torch_process(logits, **filters)
    cdf = p.cumsum(-1)
    return torch.searchsorted(cdf, u0.float()[:, None] * cdf[:, -1:], right=True).clamp_max(logits.shape[-1] - 1).squeeze(-1)


# ---------------------------------------------------------------------------------------------------


def timeit(fn, min_reps=5, budget_s=1.0, max_reps=200):
    fn()  # warm-up
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def stream_bandwidth(nbytes=1 << 30):
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), min_reps=5, budget_s=2.0)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def cold_copies(x: torch.Tensor, total_bytes=96 << 20, max_copies=64):
    n = max(1, min(max_copies, -(-total_bytes // (x.numel() * x.element_size()))))
    return [x] + [x.clone() for _ in range(n - 1)]


def make_inputs(B, Kd, V, dtype, filters, draft, rng):
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
    logits = torch.randn((B, Kd + 1, V), generator=g) * 2.0
    hot = torch.randint(0, V, (B, Kd + 1), generator=g)
    logits.scatter_add_(-1, hot[..., None], torch.full((B, Kd + 1, 1), 10.0))
    logits = logits.to(dtype)
    seeds = rng.integers(0, 2**63, size=B, dtype=np.uint64)
    # draft distribution: the target perturbed, processed the same way; drafts sampled from it
    ql = logits[:, :Kd].float() + torch.randn((B, Kd, V), generator=g) * 0.3
    q = torch.empty((B, Kd, V), dtype=torch.float32)
    drafts = torch.empty((B, Kd), dtype=torch.int64)
    for j in range(Kd):
        drafts[:, j], q[:, j] = K.sample(ql[:, j].contiguous(), seed=seeds, offset=1000 + j, return_probs=True, **filters)
    if draft == "onehot":
        q = None
    return logits, drafts, q, seeds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="V=128256, K=4 only")
    ap.add_argument("--filters", choices=sorted(FILTERS), default="topk-topp")
    ap.add_argument("--draft", choices=["q", "onehot"], default="q", help="draft_probs given (draft model) or one-hot (n-gram)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--budget", type=float, default=0.6, help="seconds of repeats per side and cell")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    K.set_num_threads(args.threads)
    filters = FILTERS[args.filters]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    grid_v, grid_k = ([128256], [4]) if args.quick else (GRID_V, GRID_K)
    rng = np.random.default_rng(0)

    bw = stream_bandwidth()
    print(f"# specdec kernels benchmark  (python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, threads={args.threads})")
    print(f"# filters {filters}, draft={args.draft}")
    print(f"# streaming bandwidth (torch copy_ of 1 GiB, read+write): {bw:.1f} GB/s; load average {os.getloadavg()[0]:.2f}")
    hdr = f"{'op':6} {'dtype':8} {'V':>6} {'K':>2} {'B':>2} | {'fused ms':>9} {'torch ms':>9} {'ratio':>7} | {'GB/s':>6} {'%bw':>5} | {'acc':>5}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for dtype in dtypes:
        for V in grid_v:
            for Kd in grid_k:
                for B in GRID_B:
                    logits, drafts, q, seeds = make_inputs(B, Kd, V, dtype, filters, args.draft, rng)
                    nd = torch.full((B,), Kd, dtype=torch.int32)
                    u = torch.from_numpy(K.uniforms(seeds, np.zeros(B, np.uint64), 2 * Kd + 2, stream=K.STREAM_VERIFY))
                    copies = cold_copies(logits)
                    it = iter(range(10**9))
                    fused = lambda: K.verify(copies[next(it) % len(copies)], drafts, q, nd, seed=seeds, offset=0, **filters)  # noqa: E731
                    ref = lambda: torch_verify(logits, drafts, q, nd, filters, u)  # noqa: E731
                    toks, nacc = fused()
                    acc = float(nacc.float().mean()) / Kd
                    ms_f = timeit(fused, budget_s=args.budget)
                    ms_t = timeit(ref, min_reps=3, budget_s=args.budget)
                    nbytes = logits.numel() * logits.element_size()
                    gbs = nbytes / (ms_f * 1e-3) / 1e9
                    row = dict(op="verify", dtype=str(dtype).replace("torch.", ""), V=V, K=Kd, B=B, fused_ms=ms_f,
                               torch_ms=ms_t, ratio=ms_t / ms_f, gbps=gbs, pct_bw=100 * gbs / bw, acceptance=acc)
                    rows.append(row)
                    print(f"{row['op']:6} {row['dtype']:8} {V:6d} {Kd:2d} {B:2d} | {ms_f:9.3f} {ms_t:9.3f} {ms_t / ms_f:6.1f}x |"
                          f" {gbs:6.1f} {row['pct_bw']:4.0f}% | {acc:5.2f}", flush=True)
            # sample at the same V (K does not apply)
            for B in GRID_B:
                logits, _, _, seeds = make_inputs(B, 0, V, dtype, filters, "onehot", rng)
                x = logits[:, 0].contiguous()
                u0 = torch.from_numpy(K.uniforms(seeds, np.zeros(B, np.uint64), 1)[:, 0])
                xs = cold_copies(x)
                it = iter(range(10**9))
                ms_f = timeit(lambda: K.sample(xs[next(it) % len(xs)], seed=seeds, offset=0, **filters), budget_s=args.budget)
                ms_t = timeit(lambda: torch_sample(x, filters, u0), min_reps=3, budget_s=args.budget)
                gbs = x.numel() * x.element_size() / (ms_f * 1e-3) / 1e9
                row = dict(op="sample", dtype=str(dtype).replace("torch.", ""), V=V, K=0, B=B, fused_ms=ms_f,
                           torch_ms=ms_t, ratio=ms_t / ms_f, gbps=gbs, pct_bw=100 * gbs / bw, acceptance=None)
                rows.append(row)
                print(f"{'sample':6} {row['dtype']:8} {V:6d} {'-':>2} {B:2d} | {ms_f:9.3f} {ms_t:9.3f} {ms_t / ms_f:6.1f}x |"
                      f" {gbs:6.1f} {row['pct_bw']:4.0f}% | {'':5}", flush=True)
    goal = [r for r in rows if r["op"] == "verify" and r["V"] == 128256 and r["K"] == 4 and r["B"] in (1, 32)]
    print()
    print("# goal (verify, V=128256, K=4, B in {1, 32}): >= 5x torch and >= 50% of streaming bandwidth")
    for r in goal:
        ok = r["ratio"] >= 5 and r["pct_bw"] >= 50
        print(f"#   {r['dtype']:8} B={r['B']:2d}: {r['ratio']:.1f}x, {r['pct_bw']:.0f}% of bandwidth -> {'MET' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(stream_gbps=bw, loadavg=os.getloadavg(), threads=args.threads, filters=filters, draft=args.draft, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
