"""Tile-faithful numpy model of the tt-metal acceptance/sampling program in ``csrc/tt/kernels``.

This module imports numpy only (never ttnn), so it runs in the main test suite.  It computes, step by
step, what the device program computes, in the same number formats and with the same split of the
vocabulary over worker cores, so that the device algorithm's arithmetic can be checked against the
exact C++ kernels before any hardware runs it.

The device algorithm (one program; W worker cores own contiguous ranges of 32-wide vocabulary tiles,
one aggregator core merges; rows are processed one tile-row = 32 rows at a time)
=============================================================================================

Rows.  ``verify`` works on R = B*(K+1) target rows, row r = b*(K+1) + j.  ``sample`` is the same
program with K = 0.  Per row the host passes: greedy flag (T <= 1e-5, as the CPU kernels), 1/T as
fp32(1/T), top_k, top_p (fp32), min_p (fp32), the row's draft token (or none), its mode (residual
sample for j < num_draft, plain sample for j == num_draft, skipped for j > num_draft) and two
uniforms ``u_accept``, ``u_sample`` as 32-bit fractions floor(u * 2^32).  The uniforms are inputs:
the host takes them from ``specdec.kernels.uniforms`` with the CPU kernels' index mapping (verify:
stream 1, u[2j] accept test and u[2j+1] sample at position j; sample: stream 0, u[0]), so the CPU
and device results can be compared draw for draw.

Phase 1, reader (RISC-V, integers only).  Each worker streams its logits tiles (bf16 or fp32) into L1
and finds its local row maximum and the lowest token id holding it, comparing order-preserving
integer keys of the fp32 bit patterns (-0.0 counts as +0.0).  Round 1: the aggregator merges the
per-worker records (max, then lowest id) and sends every worker the row maximum ``xmax``.

Phase 2, compute (Tensix SFPU in fp32 dest, ``fp32_dest_acc_en``):
    s = fp32(x * invT);  z = fp32(s - m);  e = fp32(exp(z)),   m = fp32(xmax * invT) (writer)
packed as fp32 tiles that stay resident in L1 (one per vocabulary tile of the worker's slice).
Model assumption: the SFPU's fp32 subtract/multiply round to nearest even and exp_tile (non-approx
mode) is correctly rounded; a deviation of a few ulp only moves probabilities by ~1e-7 relative.

Phase 3, writer (RISC-V, integers only).  From here on every value is an integer derived from the
fp32 bit pattern of e, so every sum is exact and independent of the order in which cores or lanes
add it:
  key(e)   = bits(e) (e >= 0, so the bits order like the values);
  fx(e)    = floor(e * 2^32) as uint64 (exact for e >= 2^-25, floor below).
  Filters.  All three filters keep a prefix of the tokens ordered by e, ties included, so the kept
  set is {key >= t} with t = max(t_k, t_p, t_m):
    t_k = key of the k-th largest e (top_k in 1..V-1; else 0), found by radix select over the key in
          8 rounds of 4 bits: each worker histograms (count, mass) of the next digit among its tokens
          that match the prefix chosen so far; the aggregator adds the 16-bin histograms over
          workers in worker order and picks the digit.  Z_k = mass of {key >= t_k}.
    t_p = largest t with S(t) >= T_p, S(t) = mass of {key >= t} within the top-k set, and
          T_p = max(1, ceil(fx(top_p) * Z_k / 2^32)) (active when top_p < 1); the same radix search
          on mass instead of count.  So a token is kept iff the mass strictly above it is < top_p*Z_k.
    t_m = bits(fp32(min_p)): keep e >= min_p, since e_max = exp(0) = 1 (min-p relative to p_max).
  w_i = fx(e_i) if key_i >= t else 0;  Z = sum w.   p_i = w_i / Z.
  Draft probabilities q (fp32 tiles) go through qz_i = floor(fx(q_i) * Z / 2^32) (q = 1 gives Z);
  a one-hot draft has qz = Z at the draft token and 0 elsewhere.
  Accept test at row (b, j < num_draft) with draft x:  floor(u32(u_accept) * qz_x / 2^32) < w_x,
  i.e. u < p(x)/q(x).  Greedy rows accept iff x == argmax (lowest id on ties).
  Sample: weights r_i = max(w_i - qz_i, 0) for residual rows (falling back to w when they sum to 0),
  w_i for plain rows; U = floor(u32(u_sample) * sum(r) / 2^32); the token is the first id (token
  order) whose running sum of r exceeds U.  The aggregator finds the worker whose range of the
  running sum holds U (worker order = vocabulary order); that worker scans its slice.  Greedy rows
  emit argmax.
  u32(u) = floor(u * 2^32) (host).  All products are formed as 32x32->64-bit pieces (``mulhi``).

Differences from the CPU kernels (the reason the comparison has tolerances): filters act on the
keys of e rather than on s (two s that round to the same fp32 e tie); masses are truncated to
2^-32 of the row maximum; uniforms keep 32 of their 53 bits; the CPU's exp is its own float
approximation.  Each moves a threshold or a CDF boundary by ~1e-7 relative or less.
Output: per batch row the aggregator takes n = first rejected j (or num_draft), emits the n drafts
and the row-n sample, pads with -1, and writes num_accepted = n.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE = 32
RADIX_BITS = 4
RADIX = 1 << RADIX_BITS
ROUNDS = 32 // RADIX_BITS
MODE_SKIP, MODE_PLAIN, MODE_RESIDUAL = 0, 1, 2
TWO32 = np.uint64(1 << 32)
MASK32 = np.uint64(0xFFFFFFFF)


# ---------------------------------------------------------------------------------------------------
# number formats
def bf16_round(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (round to nearest even), returned as float32."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = a.view(np.uint32).astype(np.uint64)
    b = (b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) & np.uint64(0xFFFF0000)
    return b.astype(np.uint32).view(np.float32)


def order_key(x: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 key of float32 values (the reader's integer compare); -0.0 == +0.0."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).copy()
    b[b == np.uint32(0x80000000)] = 0
    neg = (b >> np.uint32(31)).astype(bool)
    return np.where(neg, ~b, b | np.uint32(0x80000000)).astype(np.uint32)


def fixed32(v: np.ndarray) -> np.ndarray:
    """floor(v * 2^32) as uint64 for float32 v in [0, 1] from the bit pattern (exact shifts)."""
    bits = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.int64)
    exp = (bits >> 23) & 0xFF
    mant = (bits & 0x7FFFFF) | 0x800000
    shift = exp - 118  # value = mant * 2^(exp-150); times 2^32 -> mant * 2^(exp-118)
    left = np.left_shift(mant, np.clip(shift, 0, 40))
    right = np.right_shift(mant, np.clip(-shift, 0, 63))
    out = np.where(shift >= 0, left, np.where(shift > -24, right, 0))
    out = np.where(exp == 0, 0, out)
    return out.astype(np.uint64)


def u32_of(u) -> np.ndarray:
    """floor(u * 2^32) of float64 uniforms in [0, 1) (exact: u carries 53 bits)."""
    return np.floor(np.asarray(u, dtype=np.float64) * 4294967296.0).astype(np.uint64)


def mulhi_ceil(a32: np.ndarray, big: np.ndarray) -> np.ndarray:
    """ceil(a32 * big / 2^32), same ranges as ``mulhi``."""
    a = np.asarray(a32, dtype=np.uint64)
    big = np.asarray(big, dtype=np.uint64)
    full = a >= TWO32
    a_ = np.where(full, np.uint64(0), a)
    frac = ((a_ * (big & MASK32)) & MASK32) != 0
    return np.where(full, big, mulhi(a_, big) + frac.astype(np.uint64))


def mulhi(a32: np.ndarray, big: np.ndarray) -> np.ndarray:
    """floor(a32 * big / 2^32) for a32 <= 2^32 and big < 2^50, from 32x32 pieces (no overflow)."""
    a = np.asarray(a32, dtype=np.uint64)
    big = np.asarray(big, dtype=np.uint64)
    full = a >= TWO32
    a_ = np.where(full, np.uint64(0), a)
    res = a_ * (big >> np.uint64(32)) + ((a_ * (big & MASK32)) >> np.uint64(32))
    return np.where(full, big, res)


# ---------------------------------------------------------------------------------------------------
# work split (mirrors ttnn.split_work_to_cores: the first `rem` cores take one unit more)
def split_vocab(vocab_tiles: int, n_workers: int) -> list[tuple[int, int]]:
    """Contiguous (first_tile, n_tiles) per worker, in worker order; covers every tile exactly once."""
    if vocab_tiles <= 0 or n_workers <= 0:
        raise ValueError("vocab_tiles and n_workers must be positive")
    n = min(vocab_tiles, n_workers)
    base, rem = divmod(vocab_tiles, n)
    out, start = [], 0
    for i in range(n):
        cnt = base + (1 if i < rem else 0)
        out.append((start, cnt))
        start += cnt
    return out


@dataclass
class RowParams:
    """Per-row inputs of the device program (length R = B*(K+1))."""

    greedy: np.ndarray  # bool
    inv_t: np.ndarray  # float32 (1.0 on greedy rows)
    top_k: np.ndarray  # int64, 0 = off
    top_p: np.ndarray  # float32, 1.0 = off
    min_p: np.ndarray  # float32, 0 = off
    mode: np.ndarray  # int64 MODE_*
    draft: np.ndarray  # int64 draft token of the row (-1 when none)
    u_accept: np.ndarray  # uint64 floor(u * 2^32)
    u_sample: np.ndarray  # uint64 floor(u * 2^32)


def _radix_select(keys, weights, valid, wid, n_workers, active, target, by_mass):
    """Radix search over 8 rounds of 4-bit digits, per-worker 16-bin histograms merged in worker order.

    by_mass=False: key of the target-th largest element (count rank).  by_mass=True: largest t with
    mass{key >= t} >= target.  Returns (threshold key, mass of {key >= threshold}) per row.
    """
    R, _ = keys.shape
    prefix = np.zeros(R, dtype=np.uint64)
    rem = target.astype(np.uint64).copy()
    above = np.zeros(R, dtype=np.uint64)
    at = np.zeros(R, dtype=np.uint64)
    k64 = keys.astype(np.uint64)
    rows = np.broadcast_to(np.arange(R)[:, None], keys.shape)
    wcol = np.broadcast_to(wid[None, :], keys.shape)
    for rnd in range(ROUNDS):
        shift = np.uint64(32 - RADIX_BITS * (rnd + 1))
        hi = np.uint64(32 - RADIX_BITS * rnd)
        match = valid & ((k64 >> hi) == (prefix[:, None] >> hi)) if rnd else valid
        digit = ((k64 >> shift) & np.uint64(RADIX - 1)).astype(np.int64)
        idx = ((rows * n_workers + wcol) * RADIX + digit)[match]
        nb = R * n_workers * RADIX
        cnt = np.bincount(idx, minlength=nb).reshape(R, n_workers, RADIX).astype(np.uint64)
        # float64 bin sums are exact here: each bin < V * 2^32 < 2^53
        mas = np.bincount(idx, weights=weights[match].astype(np.float64), minlength=nb)
        mas = mas.reshape(R, n_workers, RADIX).astype(np.uint64)
        cnt = cnt.sum(axis=1, dtype=np.uint64)  # aggregator: add workers in order (exact)
        mas = mas.sum(axis=1, dtype=np.uint64)
        metric = mas if by_mass else cnt
        acc = np.cumsum(metric[:, ::-1], axis=1, dtype=np.uint64)[:, ::-1]  # acc[d] = sum over >= d
        ok = acc >= rem[:, None]
        # chosen digit: the largest d with acc[d] >= rem
        d = np.where(ok.any(axis=1), RADIX - 1 - np.argmax(ok[:, ::-1], axis=1), 0).astype(np.int64)
        r_idx = np.arange(R)
        above_metric = acc[r_idx, d] - metric[r_idx, d]
        mass_above = np.cumsum(mas[:, ::-1], axis=1, dtype=np.uint64)[:, ::-1][r_idx, d] - mas[r_idx, d]
        rem = np.where(active, rem - above_metric, rem)
        above = np.where(active, above + mass_above, above)
        at = mas[r_idx, d]
        prefix = np.where(active, prefix | (d.astype(np.uint64) << shift), prefix)
    return prefix.astype(np.uint32), above + at


def forward_rows(x: np.ndarray, q: np.ndarray | None, prm: RowParams, n_workers: int) -> dict:
    """Run the device algorithm on R rows of V logits (float32 values; bf16 inputs are exact in it).

    x: [R, V]; q: [R, V] draft probabilities (None = one-hot at prm.draft).  Returns per-row
    ``argmax``, ``accept`` (bool), ``token`` (the row's sample), ``t`` (final key threshold), ``Z``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    R, V = x.shape
    vt = -(-V // TILE)
    split = split_vocab(vt, n_workers)
    nw = len(split)
    wid = np.zeros(vt * TILE, dtype=np.int64)
    for w, (s, c) in enumerate(split):
        wid[s * TILE : (s + c) * TILE] = w
    wid = wid[:V]
    cols = np.arange(V)

    # Phase 1: per-worker max key and lowest id holding it, merged in worker order.
    kx = order_key(x)
    gmax = kx.max(axis=1)
    argmax = np.argmax(kx == gmax[:, None], axis=1).astype(np.int64)
    xmax = x[np.arange(R), argmax]
    xmax = np.where(xmax == 0, np.float32(0), xmax).astype(np.float32)

    # Phase 2: fp32 SFPU arithmetic (m = fp32(xmax * invT) comes from the writer's soft-float).
    inv_t = np.where(prm.greedy, np.float32(1), prm.inv_t).astype(np.float32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        m = (xmax * inv_t).astype(np.float32)
        s = (x * inv_t[:, None]).astype(np.float32)
        z = (s - m[:, None]).astype(np.float32)
        e = np.exp(z.astype(np.float64)).astype(np.float32)

    # Phase 3: integers.
    keys = e.view(np.uint32)
    fx = fixed32(e)
    valid = np.ones_like(keys, dtype=bool)
    total = fx.sum(axis=1, dtype=np.uint64)

    k_act = (~prm.greedy) & (prm.top_k > 0) & (prm.top_k < V)
    tk, zk = _radix_select(keys, fx, valid, wid, nw, k_act, np.where(k_act, prm.top_k, 1), False)
    tk = np.where(k_act, tk, np.uint32(0))
    zk = np.where(k_act, zk, total)

    in_k = keys >= tk[:, None]
    p32 = fixed32(np.asarray(prm.top_p, dtype=np.float32))
    p_act = (~prm.greedy) & (p32 < TWO32)
    tp_target = np.maximum(mulhi_ceil(p32, zk), np.uint64(1))
    tp, _ = _radix_select(keys, fx, in_k, wid, nw, p_act, np.where(p_act, tp_target, 1), True)
    tp = np.where(p_act, tp, np.uint32(0))

    tm = np.asarray(prm.min_p, dtype=np.float32).view(np.uint32)
    t = np.maximum(np.maximum(tk, tp), tm)
    w = np.where(keys >= t[:, None], fx, np.uint64(0))
    Z = w.sum(axis=1, dtype=np.uint64)

    r_idx = np.arange(R)
    dx = np.clip(prm.draft, 0, V - 1)
    if q is None:
        qz = np.where(cols[None, :] == prm.draft[:, None], Z[:, None], np.uint64(0))
    else:
        qz = mulhi(fixed32(np.asarray(q, dtype=np.float32)), Z[:, None])
    qz_x = qz[r_idx, dx]
    w_x = w[r_idx, dx]
    accept = np.where(prm.greedy, prm.draft == argmax, mulhi(prm.u_accept, qz_x) < w_x)

    resid = np.where(w > qz, w - qz, np.uint64(0))
    rsum = resid.sum(axis=1, dtype=np.uint64)
    use_res = (prm.mode == MODE_RESIDUAL) & (rsum > 0)
    weights = np.where(use_res[:, None], resid, w)
    wsum = np.where(use_res, rsum, Z)
    U = mulhi(prm.u_sample, wsum)
    # worker prefix (vocabulary order), then the owning worker scans its slice in token order
    csum = np.cumsum(weights, axis=1, dtype=np.uint64)
    token = np.argmax(csum > U[:, None], axis=1).astype(np.int64)
    token = np.where(prm.greedy, argmax, token)
    return {"argmax": argmax, "accept": accept.astype(bool), "token": token, "t": t, "Z": Z, "w": w, "e": e}


def pack_params(prm: RowParams) -> np.ndarray:
    """The host-side per-row parameter records (uint32 [R, 16]) read by the device kernels.

    Word layout = ``ParamWord`` in csrc/tt/kernels/specdec_tt_algo.hpp.
    """
    R = len(prm.mode)
    out = np.zeros((R, 16), dtype=np.uint32)
    out[:, 0] = 1
    out[:, 1] = prm.greedy.astype(np.uint32)
    out[:, 2] = np.asarray(prm.inv_t, dtype=np.float32).view(np.uint32)
    out[:, 3] = prm.top_k.astype(np.uint32)
    out[:, 4] = np.asarray(prm.top_p, dtype=np.float32).view(np.uint32)
    out[:, 5] = np.asarray(prm.min_p, dtype=np.float32).view(np.uint32)
    out[:, 6] = prm.mode.astype(np.uint32)
    out[:, 7] = np.where(prm.draft < 0, 0xFFFFFFFF, prm.draft).astype(np.uint32)
    out[:, 8] = prm.u_accept.astype(np.uint32)
    out[:, 9] = prm.u_sample.astype(np.uint32)
    return out


GREEDY_TEMPERATURE = 1e-5  # the CPU kernels treat T <= 1e-5 as greedy


def row_params(B, K, num_draft, draft_tokens, temperature, top_k, top_p, min_p, u_accept, u_sample):
    """Expand per-batch-row parameters to the R = B*(K+1) device rows (uniforms: float64 [B, K+1])."""
    R = B * (K + 1)
    rep = lambda a, dt: np.repeat(np.broadcast_to(np.asarray(a, dtype=dt), (B,)), K + 1)  # noqa: E731
    temp = rep(temperature, np.float64)
    greedy = ~(temp > GREEDY_TEMPERATURE)
    with np.errstate(divide="ignore"):
        inv_t = np.where(greedy, 1.0, 1.0 / np.where(greedy, 1.0, temp)).astype(np.float32)
    j = np.tile(np.arange(K + 1), B)
    nd = rep(num_draft, np.int64)
    mode = np.where(j < nd, MODE_RESIDUAL, np.where(j == nd, MODE_PLAIN, MODE_SKIP))
    draft = np.full(R, -1, dtype=np.int64)
    if K:
        dt = np.asarray(draft_tokens, dtype=np.int64).reshape(B, K)
        draft.reshape(B, K + 1)[:, :K] = dt
    draft = np.where(mode == MODE_RESIDUAL, draft, -1)
    return RowParams(
        greedy=greedy,
        inv_t=inv_t,
        top_k=rep(top_k, np.int64),
        top_p=rep(top_p, np.float32),
        min_p=rep(min_p, np.float32),
        mode=mode,
        draft=draft,
        u_accept=u32_of(np.asarray(u_accept, dtype=np.float64).reshape(R)),
        u_sample=u32_of(np.asarray(u_sample, dtype=np.float64).reshape(R)),
    )


def assemble(B: int, K: int, num_draft, draft_tokens, rows: dict):
    """The aggregator's output step: tokens [B, K+1] padded with -1, num_accepted [B]."""
    acc = rows["accept"].reshape(B, K + 1)
    tok = rows["token"].reshape(B, K + 1)
    nd = np.broadcast_to(np.asarray(num_draft, dtype=np.int64), (B,))
    out = np.full((B, K + 1), -1, dtype=np.int64)
    n_acc = np.zeros(B, dtype=np.int32)
    dt = np.asarray(draft_tokens, dtype=np.int64).reshape(B, K) if K else np.zeros((B, 0), np.int64)
    for b in range(B):
        n = 0
        while n < nd[b] and acc[b, n]:
            n += 1
        out[b, :n] = dt[b, :n]
        out[b, n] = tok[b, n]
        n_acc[b] = n
    return out, n_acc


def verify(target_logits, draft_tokens, draft_probs, num_draft, *, temperature, top_k, top_p, min_p,
           u_accept, u_sample, n_workers=63):
    """Model of the device ``verify``: uniforms [B, K+1] are inputs.  Returns (tokens, num_accepted)."""
    tl = np.asarray(target_logits, dtype=np.float32)
    B, K1, V = tl.shape
    K = K1 - 1
    prm = row_params(B, K, num_draft, draft_tokens, temperature, top_k, top_p, min_p, u_accept, u_sample)
    q = None
    if draft_probs is not None:
        q = np.zeros((B, K1, V), dtype=np.float32)
        q[:, :K] = np.asarray(draft_probs, dtype=np.float32)
        q = q.reshape(B * K1, V)
    rows = forward_rows(tl.reshape(B * K1, V), q, prm, n_workers)
    return assemble(B, K, num_draft, draft_tokens, rows)


def sample(logits, *, temperature, top_k, top_p, min_p, u_sample, n_workers=63):
    """Model of the device ``sample`` (verify with K = 0).  Returns tokens int64 [B]."""
    lg = np.asarray(logits, dtype=np.float32)
    B, V = lg.shape
    tokens, _ = verify(lg[:, None, :], np.zeros((B, 0), np.int64), None, np.zeros(B, np.int64),
                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       u_accept=np.zeros((B, 1)), u_sample=np.asarray(u_sample, dtype=np.float64).reshape(B, 1),
                       n_workers=n_workers)
    return tokens[:, 0]
