"""The stock-ttnn verification path (``specdec.tt.stock``) run on the numpy model of its operations, against the exact
C++ kernels (numpy + specdec.kernels: runs in the main suite and in `make test-tt`).

What must hold (docs/tenstorrent.md): greedy rows give the CPU kernels' tokens exactly, ties included; sampled rows
give them draw for draw with the same Philox uniforms except where a uniform falls within fp32 rounding of a
boundary (none on these seeds); speculative output follows the target's processed distribution (χ², with a control
whose residual ignores the draft and must be rejected).
"""

from __future__ import annotations

import numpy as np
import pytest

from specdec.tt import model, stock
from specdec.tt.ops_numpy import NumpyOps

kernels = pytest.importorskip("specdec.kernels", reason="the C++ kernels (specdec._kernels) are not built")


def _case(rng, B, K, V, dense, ties=False):
    tl = (rng.standard_normal((B, K + 1, V)) * rng.uniform(0.5, 4)).astype(np.float32)
    if ties:  # bf16 steps at a coarse scale: many exact ties, at the max and at top-k / top-p boundaries
        tl = np.round(tl * 2) / 2
    prm = dict(temperature=np.where(rng.random(B) < 0.25, 0.0, rng.uniform(0.3, 1.5, B)),
               top_k=np.where(rng.random(B) < 0.5, 0, rng.integers(1, V + 1, B)),
               top_p=np.where(rng.random(B) < 0.5, 1.0, rng.uniform(0.3, 1.0, B)),
               min_p=np.where(rng.random(B) < 0.7, 0.0, rng.uniform(0.0, 0.3, B)))  # fmt: skip
    seed = rng.integers(0, 2**63, B).astype(np.uint64)
    offset = rng.integers(0, 1000, B).astype(np.uint64)
    nd = rng.integers(0, K + 1, B).astype(np.int32)
    q = None
    if dense and K:
        noisy = tl[:, :K].reshape(B * K, V) + rng.standard_normal((B * K, V)).astype(np.float32)
        _, q = kernels.sample(noisy, temperature=1.0, seed=5, offset=0, return_probs=True)
        q = np.asarray(q, np.float32).reshape(B, K, V)
        draft = np.array([[rng.choice(V, p=q[b, j] / q[b, j].sum()) for j in range(K)] for b in range(B)], np.int64)
    else:
        draft = np.where(rng.random((B, K)) < 0.5, tl[:, :K].argmax(-1), rng.integers(0, V, (B, K))).astype(np.int64)
    return tl, draft.reshape(B, K), q, nd, prm, seed, offset


def _both(ops, tl, draft, q, nd, prm, seed, offset, swap_uniforms=False):
    B, K1, _ = tl.shape
    U = kernels.uniforms(seed, offset, 2 * K1, stream=kernels.STREAM_VERIFY).reshape(B, 2 * K1)
    ua, us = (U[:, 1::2], U[:, 0::2]) if swap_uniforms else (U[:, 0::2], U[:, 1::2])
    cpu = kernels.verify(tl, draft, q, nd, seed=seed, offset=offset, **prm)
    dev = stock.verify(ops, tl, draft, q, nd, u_accept=ua, u_sample=us, **prm)
    differ = (np.asarray(cpu[0]) != dev[0]).any(1) | (np.asarray(cpu[1]) != dev[1])
    return differ, prm["temperature"] == 0.0


def _sweep(ops, seed, n_cases, **kw):
    rng = np.random.default_rng(seed)
    differ, greedy = [], []
    for _ in range(n_cases):
        B, K, V = int(rng.integers(1, 6)), int(rng.integers(0, 5)), int(rng.integers(2, 700))
        d, g = _both(ops, *_case(rng, B, K, V, dense=rng.random() < 0.5, ties=rng.random() < 0.4), **kw)
        differ.append(d)
        greedy.append(g)
    return np.concatenate(differ), np.concatenate(greedy)


def test_verify_matches_the_cpu_kernels_draw_for_draw():
    """~400 rows: greedy, top-k (through topk and through the full sort), top-p, min-p, dense and one-hot drafts, K 0..4,
    V not a multiple of 32, batches not a multiple of 32 rows, logits with heavy ties."""
    differ, greedy = _sweep(NumpyOps(), 1, 130)
    assert differ.size > 350
    assert differ[greedy].sum() == 0
    assert differ.mean() <= 0.01, differ.mean()


def test_swapped_uniforms_are_caught():
    """Control: accept and sample uniforms exchanged must disagree with the CPU kernels on many rows."""
    differ, greedy = _sweep(NumpyOps(), 1, 130, swap_uniforms=True)
    assert differ[~greedy].mean() > 0.2


def test_padding_and_the_topk_route_change_nothing(monkeypatch):
    """The same rows unpadded (row and column multiples of 1) and padded to tiles, and with top-k rows forced through the
    full sort instead of ttnn.topk, give identical results."""
    rng = np.random.default_rng(2)
    cases = [_case(rng, 5, 3, 333, dense=i % 2 == 0, ties=i % 3 == 0) for i in range(12)]
    for c in cases:
        c[4]["top_p"] = np.ones(5)  # top-k alone: the topk route applies
        c[4]["top_k"] = np.array([3, 0, 64, 17, 1])

    def run(ops):
        out = []
        for tl, draft, q, nd, prm, seed, offset in cases:
            U = kernels.uniforms(seed, offset, 2 * 4, stream=kernels.STREAM_VERIFY).reshape(5, 8)
            out.append(stock.verify(ops, tl, draft, q, nd, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **prm))
        return out

    padded, unpadded = run(NumpyOps(32, 32)), run(NumpyOps(1, 1))
    monkeypatch.setattr(stock, "TOPK_MAX", 0)
    sorted_route = run(NumpyOps())
    for a, b, c in zip(padded, unpadded, sorted_route):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[0], c[0])
        np.testing.assert_array_equal(a[1], c[1])


def test_greedy_takes_the_lowest_id_among_tied_maxima():
    tl = np.zeros((3, 1, 70), np.float32)
    tl[0, 0, [5, 9, 64]] = 2.0
    tl[1, 0, [69, 33]] = 1.0
    tl[2, 0, :] = -1.0
    tokens, _ = stock.verify(NumpyOps(), tl, np.zeros((3, 0), np.int64), None, np.zeros(3, np.int32), temperature=0.0,
                             top_k=0, top_p=1.0, min_p=0.0, u_accept=np.zeros((3, 1)), u_sample=np.zeros((3, 1)))  # fmt: skip
    assert tokens[:, 0].tolist() == [5, 33, 0]


def test_sample_matches_the_cpu_kernels():
    rng = np.random.default_rng(3)
    B, V = 64, 1000
    lg = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    prm = dict(temperature=np.where(np.arange(B) % 4 == 0, 0.0, 0.9), top_k=np.where(np.arange(B) % 3 == 0, 40, 0),
               top_p=np.where(np.arange(B) % 2 == 0, 0.8, 1.0), min_p=np.where(np.arange(B) % 5 == 0, 0.02, 0.0))  # fmt: skip
    seed, offset = np.arange(B, dtype=np.uint64), np.full(B, 9, np.uint64)
    u = kernels.uniforms(seed, offset, 1, stream=kernels.STREAM_SAMPLE).reshape(B)
    cpu = np.asarray(kernels.sample(lg, seed=seed, offset=offset, **prm))
    np.testing.assert_array_equal(stock.sample(NumpyOps(), lg, u_sample=u, **prm), cpu)


def _first_token_counts(ops, draws):
    """First emitted token of a verify with a dense draft that disagrees with the target, one seed per draw."""
    rng = np.random.default_rng(4)
    V, K = 12, 2
    target = (rng.standard_normal((1, K + 1, V)) * 1.5).astype(np.float32)
    draft_logits = (rng.standard_normal((K, V)) * 1.5).astype(np.float32)
    prm = dict(temperature=0.9, top_k=9, top_p=0.95, min_p=0.0)
    _, q = kernels.sample(draft_logits, temperature=1.0, seed=0, offset=0, return_probs=True)
    q = np.asarray(q, np.float32)
    seeds = np.arange(draws, dtype=np.uint64)
    qdraw = kernels.uniforms(seeds, np.zeros(draws, np.uint64), K, stream=kernels.STREAM_SAMPLE).reshape(draws, K)
    drafts = np.stack([np.searchsorted(np.cumsum(q[j], dtype=np.float64), qdraw[:, j] * q[j].sum(), side="right")
                       for j in range(K)], 1).clip(0, V - 1)  # fmt: skip
    U = kernels.uniforms(seeds, np.ones(draws, np.uint64), 2 * (K + 1), stream=kernels.STREAM_VERIFY)
    U = U.reshape(draws, 2 * (K + 1))
    tl = np.repeat(target, draws, 0)
    tokens, _ = stock.verify(ops, tl, drafts, np.repeat(q[None], draws, 0), np.full(draws, K, np.int32),
                             u_accept=U[:, 0::2], u_sample=U[:, 1::2], **prm)  # fmt: skip
    _, p = kernels.sample(target[0, :1], seed=0, offset=0, return_probs=True, **prm)
    return np.bincount(tokens[:, 0], minlength=V), np.asarray(p, np.float64)[0]


def _chi2_p(counts, p):
    from scipy.stats import chisquare

    keep = p > 0
    assert counts[~keep].sum() == 0, "a token outside the processed support was emitted"
    return chisquare(counts[keep], p[keep] / p[keep].sum() * counts.sum()).pvalue


def test_speculative_first_token_follows_the_target_distribution(monkeypatch):
    """χ² of 6,000 first tokens against the CPU kernels' processed target distribution (temperature 0.9, top-k 9,
    top-p 0.95); the control draws the residual from p itself, ignoring q, and must be rejected."""
    counts, p = _first_token_counts(NumpyOps(), 6000)
    assert _chi2_p(counts, p) > 1e-3
    monkeypatch.setattr(stock, "or_w_when_empty", lambda ops, r, w: w)
    bad, _ = _first_token_counts(NumpyOps(), 6000)
    assert _chi2_p(bad, p) < 1e-6


def test_row_params_modes_drive_the_residual():
    """Rows after num_draft are skipped and the row at num_draft draws from p (no q subtracted): with num_draft 0 the
    first token is a plain sample whatever q holds, equal to the CPU kernels'."""
    rng = np.random.default_rng(5)
    tl = (rng.standard_normal((4, 3, 50)) * 2).astype(np.float32)
    tl[..., 7] += 12.0  # the plain draw is token 7 on nearly every row, unless q were wrongly subtracted
    q = np.zeros((4, 2, 50), np.float32)
    q[..., 7] = 1.0  # all mass on one token: subtracting it would change the plain row's draw
    draft = np.full((4, 2), 7, np.int64)
    seed, offset = np.arange(4, dtype=np.uint64), np.zeros(4, np.uint64)
    prm = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    U = kernels.uniforms(seed, offset, 6, stream=kernels.STREAM_VERIFY).reshape(4, 6)
    nd = np.zeros(4, np.int32)
    got = stock.verify(NumpyOps(), tl, draft, q, nd, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **prm)
    want = kernels.verify(tl, draft, q, nd, seed=seed, offset=offset, **prm)
    np.testing.assert_array_equal(got[0], np.asarray(want[0]))
    assert (got[0][:, 0] == 7).sum() >= 3


class _DyadicOps(NumpyOps):
    """exp(x) = 2^x on integer x: every weight, sum and cumulative sum is exact, so a rule's boundary (a cumulative
    mass equal to top_p * Z_k, a uniform landing on a cumulative sum) can be hit on purpose."""

    def exp(self, a):
        return np.exp2(np.asarray(a, np.float32)).astype(np.float32)


def _definition(e, k, top_p, min_p, u):
    """The CPU kernels' documented rules on exact weights e (Fractions): the kept weights w, their mass and the
    inverse-CDF draw with u."""
    from fractions import Fraction

    order = sorted(e, reverse=True)
    t_k = order[k - 1] if 0 < k < len(e) else Fraction(-1)
    zk = sum(x for x in e if x >= t_k)
    kept = [x >= t_k and (top_p >= 1 or sum(y for y in e if y > x and y >= t_k) < Fraction(top_p) * zk)
            and x >= Fraction(min_p) for x in e]  # fmt: skip
    w = [x if keep else Fraction(0) for x, keep in zip(e, kept)]
    z, target, run = sum(w), Fraction(u) * sum(w), Fraction(0)
    for i, x in enumerate(w):
        run += x
        if run > target:
            return w, z, i
    raise AssertionError("no token drawn")


def _dyadic_row(rng):
    """Weights 1 (the max) plus a random split of 1 into powers of two, shuffled: Z = 2, every partial sum exact."""
    pieces = [1.0]
    for _ in range(int(rng.integers(1, 10))):
        i = int(rng.integers(len(pieces)))
        if pieces[i] > 2.0**-5:
            pieces[i:i + 1] = [pieces[i] / 2, pieces[i] / 2]
    e = np.array([1.0] + pieces)
    rng.shuffle(e)
    return np.log2(e).astype(np.float32)


def test_filters_and_the_draw_keep_the_cpu_rules_at_exact_boundaries():
    """With exact weights (powers of two, ties everywhere), top_p often set so that top_p * Z_k equals a cumulative mass
    and u so that u * Z equals one: the kept mass Z and the drawn token equal the rules' definition (keep a token iff
    the mass strictly above it is < top_p * Z_k; draw the first token whose running sum exceeds u * Z)."""
    from fractions import Fraction

    rng = np.random.default_rng(6)
    ops = _DyadicOps(1, 1)
    on_boundary = 0
    for _ in range(400):
        x = _dyadic_row(rng)
        V = x.size
        e = [Fraction(2) ** int(v) for v in x]
        k = int(rng.choice([0, 0, int(rng.integers(1, V + 1))]))
        cums = np.cumsum(sorted(2.0**x, reverse=True))
        top_p = float(rng.choice([1.0, cums[int(rng.integers(V))] / 2.0]))
        min_p = float(rng.choice([0.0, 0.25]))
        w, z, _ = _definition(e, k, top_p, min_p, 0.0)
        u = float(rng.integers(0, 64)) / 64
        if z.denominator == 1 and z.numerator & (z.numerator - 1) == 0:  # Z a power of two: u * Z on a running sum
            u = float(np.cumsum([float(v) for v in w])[int(rng.integers(len(w)))] / float(z)) % 1.0
        on_boundary += top_p < 1.0 and k == 0
        # a verify with one draft: row 0 (the draft's) reports Z, row 1 (the bonus row, same logits) draws from w
        prm = model.row_params(1, 1, np.ones(1, np.int64), np.zeros((1, 1), np.int64), 1.0, k, top_p, min_p,
                               np.zeros((1, 2)), np.zeros((1, 2)))  # fmt: skip
        res = stock.rows(ops, np.stack([x, x]), None, prm, np.array([0.0, u]))
        _, z_want, tok_want = _definition(e, k, top_p, min_p, u)
        assert Fraction(float(res.Z[0])) == z_want, (x, k, top_p, min_p)
        assert res.token[1] == tok_want, (x, k, top_p, min_p, u)
    assert on_boundary > 50


def test_a_uniform_that_rounds_to_one_draws_the_last_kept_token():
    """u within 2^-25 of 1 is 1.0 in float32, so u * Z is the whole mass: the draw is clamped to the last token with
    weight (as the CPU's u * Z < Z picks), never a zero-weight or padding column."""
    x = np.array([0.0, -1.0, -30.0, -2.0, -40.0, -50.0], np.float32)  # 2^-40, 2^-50 below min_p, 2^-30 too
    prm = model.row_params(1, 0, np.zeros(1, np.int64), np.zeros((1, 0), np.int64), 1.0, 0, 1.0, 1e-3,
                           np.zeros((1, 1)), np.zeros((1, 1)))  # fmt: skip
    res = stock.rows(_DyadicOps(32, 32), x[None], None, prm, np.array([1.0 - 2.0**-40]))
    assert res.token.tolist() == [3]


def test_a_residual_without_mass_draws_from_p():
    """An unnormalised draft q >= p everywhere (q = 2p) leaves max(p - q, 0) empty on rejection: both the CPU kernels and
    the stock path then draw from p."""
    rng = np.random.default_rng(7)
    B, K, V = 40, 1, 30
    tl = (rng.standard_normal((B, K + 1, V)) * 2).astype(np.float32)
    prm = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    _, p = kernels.sample(tl[:, 0], seed=0, offset=0, return_probs=True, **prm)
    q = (2 * np.asarray(p, np.float32)).reshape(B, K, V)
    draft = tl[:, :K].argmax(-1).astype(np.int64)
    seed, offset, nd = np.arange(B, dtype=np.uint64), np.zeros(B, np.uint64), np.ones(B, np.int32)
    U = kernels.uniforms(seed, offset, 2 * (K + 1), stream=kernels.STREAM_VERIFY).reshape(B, 2 * (K + 1))
    got = stock.verify(NumpyOps(), tl, draft, q, nd, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **prm)
    want = kernels.verify(tl, draft, q, nd, seed=seed, offset=offset, **prm)
    assert (np.asarray(want[1]) == 0).sum() >= 10  # about half the drafts are rejected
    np.testing.assert_array_equal(got[0], np.asarray(want[0]))
