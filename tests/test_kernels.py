"""specdec.kernels: statistical exactness, reference agreement, filters, reproducibility, bad input, edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import test_kernels_ref as ref
from specdec import kernels as K

P_THRESHOLD = 1e-3
N_TRIALS = 100_000


# --------------------------------------------------------------------------------------------------
# statistics helpers


def chi2_pvalue(tokens: np.ndarray, p: np.ndarray) -> float:
    """Pearson chi-square goodness of fit of observed tokens to p (bins with expected < 5 merged).

    Tokens outside p's support make the p-value 0.
    """
    V = len(p)
    counts = np.bincount(tokens, minlength=V).astype(np.float64)
    n = counts.sum()
    if counts[p <= 0].sum() > 0:
        return 0.0
    exp = p * n
    big = exp >= 5
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if (~big & (p > 0)).any():
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    obs_b, exp_b = np.array(obs_b), np.array(exp_b)
    if len(obs_b) < 2:
        return 1.0
    stat = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    df = len(obs_b) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def binom_pvalue(k: int, n: int, a: float) -> float:
    z = abs(k - n * a) / math.sqrt(n * a * (1 - a))
    return math.erfc(z / math.sqrt(2))


def positions_ok(tokens, nacc, p_all, n) -> list[float]:
    """p-values of the emitted token at each position j <= n, over rows that reached j."""
    pv = []
    for j in range(n + 1):
        reached = nacc >= j
        pv.append(chi2_pvalue(tokens[reached, j], p_all[j]))
    return pv


def test_chi2_helper_rejects_a_wrong_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.2])
    assert chi2_pvalue(rng.choice(3, size=50_000, p=p), p) > P_THRESHOLD
    assert chi2_pvalue(rng.choice(3, size=50_000, p=[0.49, 0.31, 0.2]), p) < P_THRESHOLD


# --------------------------------------------------------------------------------------------------
# statistical exactness

CONFIGS = [
    # (V, K, filters, draft_probs given)
    (6, 1, dict(temperature=1.0), True),
    (8, 2, dict(temperature=0.7), True),
    (11, 3, dict(temperature=1.3, top_k=7), True),
    (16, 4, dict(temperature=1.0, top_p=0.8), True),
    (12, 4, dict(temperature=0.9, min_p=0.05), True),
    (16, 3, dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.02), True),
    (8, 4, dict(temperature=1.0), False),
    (10, 2, dict(temperature=0.6, top_k=5, top_p=0.95), False),
]


def _setup(V, Kd, filters, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((Kd + 1, V)) * 1.5).astype(np.float32)
    params = (filters.get("temperature", 1.0), filters.get("top_k", 0), filters.get("top_p", 1.0), filters.get("min_p", 0.0))
    p_all = np.stack([ref.process(logits[j], *params) for j in range(Kd + 1)])
    # A draft distribution q per position: a different random softmax, processed the same way.
    q_logits = (rng.standard_normal((Kd, V)) * 1.5).astype(np.float32)
    q_all = np.stack([ref.process(q_logits[j], *params) for j in range(Kd)]).astype(np.float32)
    return rng, logits, p_all, q_all


@pytest.mark.parametrize("V,Kd,filters,with_q", CONFIGS)
def test_emitted_tokens_follow_target_distribution(V, Kd, filters, with_q):
    rng, logits, p_all, q_all = _setup(V, Kd, filters, seed=V * 100 + Kd)
    N = N_TRIALS
    if with_q:
        drafts = np.stack([rng.choice(V, size=N, p=q_all[j] / q_all[j].sum()) for j in range(Kd)], axis=1)
        q_in = np.broadcast_to(q_all, (N, Kd, V))
    else:
        # A deterministic draft (n-gram / greedy draft): the same fixed proposal in every row.
        fixed = rng.integers(0, V, size=Kd)
        drafts = np.broadcast_to(fixed, (N, Kd)).copy()
        q_in = None
    target = np.broadcast_to(logits, (N, Kd + 1, V))  # non-contiguous view: the kernel copies it
    seeds = np.arange(N, dtype=np.uint64) + np.uint64(12345)
    tokens, nacc = K.verify(target, drafts, q_in, np.full(N, Kd), seed=seeds, offset=7, **filters)
    assert tokens.shape == (N, Kd + 1) and nacc.shape == (N,)

    pv = positions_ok(tokens, nacc, p_all, Kd)
    assert min(pv) > P_THRESHOLD, f"p-values per position {pv}"

    # Acceptance rate at position 0 is sum(min(p, q)).
    q0 = q_all[0].astype(np.float64) if with_q else np.eye(V)[drafts[0, 0]]
    alpha = float(np.minimum(p_all[0], q0).sum())
    accepted0 = int((nacc >= 1).sum())
    if 0 < alpha < 1:
        assert binom_pvalue(accepted0, N, alpha) > P_THRESHOLD, (accepted0 / N, alpha)
    else:
        assert accepted0 == (N if alpha >= 1 else 0)

    # Negative control: the same uniforms through a wrong rule (accept w.p. min(1, q/p)) fail the test.
    u = K.uniforms(seeds, np.full(N, 7, dtype=np.uint64), 2 * Kd + 2, stream=K.STREAM_VERIFY)
    q64 = q_all.astype(np.float64) if with_q else None
    if with_q:
        bad_tokens, bad_nacc = ref.verify_batch_vec(p_all, q64, drafts, Kd, u, wrong_rule=True)
        assert min(positions_ok(bad_tokens, bad_nacc, p_all, Kd)) < P_THRESHOLD
        # and the right rule in numpy, with the same uniforms, gives the kernel's tokens exactly.
        ok_tokens, ok_nacc = ref.verify_batch_vec(p_all, q64, drafts, Kd, u)
    else:
        qh = np.eye(V)[fixed]
        bad_tokens, bad_nacc = ref.verify_batch_vec(p_all, qh, drafts, Kd, u, wrong_rule=True)
        assert min(positions_ok(bad_tokens, bad_nacc, p_all, Kd)) < P_THRESHOLD
        ok_tokens, ok_nacc = ref.verify_batch_vec(p_all, qh, drafts, Kd, u)
    mismatch = int((ok_tokens != tokens).any(axis=1).sum())
    assert mismatch <= N // 20_000, f"{mismatch} rows differ from the numpy reference"
    np.testing.assert_array_equal(ok_nacc, nacc)


def test_negative_control_kernel_given_the_wrong_q():
    """Drafts sampled from q but verified against a claimed q' != q: the output is biased and the test
    notices. Verifying the same drafts as one-hot (draft_probs=None) stays exact (q = delta_x is a valid
    proposal for any way x was chosen), only with a lower acceptance rate."""
    V, Kd = 8, 1
    rng, logits, p_all, q_all = _setup(V, Kd, dict(temperature=1.0), seed=5)
    N = N_TRIALS
    drafts = rng.choice(V, size=(N, 1), p=q_all[0] / q_all[0].sum())
    target = np.ascontiguousarray(np.broadcast_to(logits, (N, Kd + 1, V)))
    seeds = np.arange(N, dtype=np.uint64)
    wrong_q = np.full((N, Kd, V), 1.0 / V, np.float32)
    tokens, nacc = K.verify(target, drafts, wrong_q, np.full(N, Kd), seed=seeds, offset=0)
    assert positions_ok(tokens, nacc, p_all, Kd)[0] < P_THRESHOLD
    tokens, nacc = K.verify(target, drafts, None, np.full(N, Kd), seed=seeds, offset=0)
    assert positions_ok(tokens, nacc, p_all, Kd)[0] > P_THRESHOLD
    tokens_q, nacc_q = K.verify(target, drafts, np.broadcast_to(q_all, (N, Kd, V)), np.full(N, Kd), seed=seeds, offset=0)
    assert (nacc_q >= 1).mean() > (nacc >= 1).mean()


@pytest.mark.parametrize(
    "V,filters",
    [(7, dict(temperature=1.0)), (13, dict(temperature=0.5, top_k=4)), (16, dict(temperature=1.2, top_p=0.7, min_p=0.03))],
)
def test_sample_follows_processed_distribution(V, filters):
    rng = np.random.default_rng(V)
    logits = (rng.standard_normal(V) * 2).astype(np.float32)
    p = ref.process(logits, filters.get("temperature", 1.0), filters.get("top_k", 0), filters.get("top_p", 1.0), filters.get("min_p", 0.0))
    N = N_TRIALS
    toks = K.sample(np.broadcast_to(logits, (N, V)), seed=99, offset=np.arange(N, dtype=np.uint64), **filters)
    assert chi2_pvalue(toks, p) > P_THRESHOLD
    # A biased sampler (the distribution before filtering/temperature) fails the same test.
    if filters != dict(temperature=1.0):
        raw = ref.process(logits, 1.0, 0, 1.0, 0.0)
        assert chi2_pvalue(toks, raw) < P_THRESHOLD


def test_identical_draft_and_target_accept_everything():
    rng = np.random.default_rng(3)
    B, Kd, V = 64, 4, 50
    logits = rng.standard_normal((B, Kd + 1, V)).astype(np.float32)
    params = dict(temperature=0.8, top_k=20, top_p=0.9)
    q = np.empty((B, Kd, V), np.float32)
    drafts = np.empty((B, Kd), np.int64)
    for j in range(Kd):
        drafts[:, j], q[:, j] = K.sample(logits[:, j], seed=np.arange(B, dtype=np.uint64), offset=j, return_probs=True, **params)
    tokens, nacc = K.verify(logits, drafts, q, np.full(B, Kd), seed=np.arange(B, dtype=np.uint64), offset=100, **params)
    np.testing.assert_array_equal(nacc, Kd)
    np.testing.assert_array_equal(tokens[:, :Kd], drafts)


# --------------------------------------------------------------------------------------------------
# reference agreement


def _random_params(rng, B, V, greedy_frac=0.25):
    params = []
    for _ in range(B):
        if rng.random() < greedy_frac:
            params.append((0.0, 0, 1.0, 0.0))
        else:
            params.append(
                (
                    float(rng.uniform(0.3, 2.0)),
                    int(rng.choice([0, 1, 3, V // 2, V + 5])),
                    float(rng.choice([1.0, 0.5, 0.9, 0.99])),
                    float(rng.choice([0.0, 0.0, 0.05, 0.3])),
                )
            )
    return params


def _cols(params):
    t, k, p, m = (np.array(c) for c in zip(*params))
    return dict(temperature=t, top_k=k.astype(np.int64), top_p=p, min_p=m)


@pytest.mark.parametrize("V", [1, 2, 37, 1000, 9000])
def test_sample_matches_numpy_reference(V):
    rng = np.random.default_rng(V + 1)
    B = 64
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    params = _random_params(rng, B, V)
    seeds = rng.integers(0, 2**63, size=B, dtype=np.uint64)
    offs = rng.integers(0, 2**40, size=B, dtype=np.uint64)
    toks, probs = K.sample(logits, seed=seeds, offset=offs, return_probs=True, **_cols(params))
    u0 = K.uniforms(seeds, offs, 1, stream=K.STREAM_SAMPLE)[:, 0]
    np.testing.assert_array_equal(toks, ref.sample(logits, params, u0))
    for b in range(B):
        np.testing.assert_allclose(probs[b], ref.process(logits[b], *params[b]), rtol=2e-6, atol=1e-9)
        assert probs[b, toks[b]] > 0


@pytest.mark.parametrize("V,with_q", [(5, True), (64, False), (700, True), (20000, False), (20000, True)])
def test_verify_matches_numpy_reference(V, with_q):
    rng = np.random.default_rng(V + 7)
    B, Kd = 24, 4
    logits = (rng.standard_normal((B, Kd + 1, V)) * 2).astype(np.float32)
    params = _random_params(rng, B, V)
    nd = rng.integers(0, Kd + 1, size=B).astype(np.int32)
    seeds = rng.integers(0, 2**63, size=B, dtype=np.uint64)
    offs = rng.integers(0, 2**40, size=B, dtype=np.uint64)
    # Drafts: mostly the target's own likely tokens so that acceptance runs deep.
    drafts = np.where(rng.random((B, Kd)) < 0.7, logits[:, :Kd].argmax(-1), rng.integers(0, V, (B, Kd)))
    q = None
    if with_q:
        ql = logits[:, :Kd] + rng.standard_normal((B, Kd, V)).astype(np.float32) * 0.5
        q = np.stack([np.stack([ref.process(ql[b, j], *params[b]) for j in range(Kd)]) for b in range(B)]).astype(np.float32)
    tokens, nacc = K.verify(logits, drafts, q, nd, seed=seeds, offset=offs, **_cols(params))
    u = K.uniforms(seeds, offs, 2 * Kd + 2, stream=K.STREAM_VERIFY)
    for b in range(B):
        rt, rn = ref.verify_row(logits[b], drafts[b], None if q is None else q[b], int(nd[b]), params[b], u[b])
        assert (list(tokens[b]), int(nacc[b])) == (rt, rn), f"row {b} params {params[b]}"
        n_out = rn + 1
        assert np.all(tokens[b, n_out:] == -1)
        # logprobs of the emitted tokens: the reference's processed distribution (greedy rows at temperature 1)
        lp, ids, top = K.logprobs(logits[b, :n_out], tokens[b, :n_out], top_n=3, **_cols([params[b]] * n_out))
        t, k, p, m = params[b]
        for j in range(n_out):
            want = ref.process(logits[b, j], t if t > K.GREEDY_TEMPERATURE else 1.0, k, p, m)
            assert lp[j] == pytest.approx(math.log(want[tokens[b, j]]), abs=1e-4), f"row {b} position {j}"
            kept = np.flatnonzero(want > 0)
            order = kept[np.lexsort((kept, -want[kept]))][:3]  # most likely first, ties to the lower id
            assert ids[j, : len(order)].tolist() == order.tolist() and (ids[j, len(order) :] == -1).all()


def test_greedy_ties_go_to_lowest_id():
    V = 10000
    logits = np.zeros((3, 3, V), np.float32)
    logits[:, :, 17] = 5.0
    logits[:, :, 4000] = 5.0
    logits[:, :, 9999] = 5.0
    assert list(K.sample(logits[:, 0], temperature=0.0)) == [17, 17, 17]
    drafts = np.array([[17, 17], [4000, 17], [17, 9999]])
    tokens, nacc = K.verify(logits, drafts, None, np.array([2, 2, 2]), temperature=0.0)
    assert tokens.tolist() == [[17, 17, 17], [17, -1, -1], [17, 17, -1]]
    assert nacc.tolist() == [2, 0, 1]
    t, p = K.sample(logits[:, 0], temperature=0.0, return_probs=True)
    assert p[:, 17].tolist() == [1.0, 1.0, 1.0] and p.sum() == 3.0


# --------------------------------------------------------------------------------------------------
# filter semantics against transformers


def _warped_support(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> np.ndarray:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.clone()
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return torch.isfinite(scores).numpy()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1.0, 5, 1.0, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.7, 40, 0.95, 0.0),
        (1.0, 0, 0.5, 0.05),
        (1.5, 100, 0.8, 0.02),
        (0.9, 3, 0.3, 0.5),
        (1.0, 0, 0.999, 0.0),
    ],
)
def test_filters_match_transformers_warpers(temperature, top_k, top_p, min_p):
    g = torch.Generator().manual_seed(int(top_k * 1000 + top_p * 100 + min_p * 10))
    for V, scale in [(50, 1.0), (5000, 3.0)]:
        logits = torch.randn((32, V), generator=g) * scale
        want = _warped_support(logits, temperature, top_k, top_p, min_p)
        _, probs = K.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, return_probs=True)
        got = (probs > 0).numpy()
        # transformers works in float32 (softmax, cumsum); the kernel sums in float64. A token may only
        # differ when it sits on the boundary: kept by the float64 rule at a threshold 1e-5 looser and
        # dropped at one 1e-5 tighter.
        diff = np.argwhere(got != want)
        assert len(diff) <= 2, f"{len(diff)} tokens differ from transformers"
        for b, i in diff:
            row = logits[b].numpy()
            loose = ref.process(row, temperature, top_k, min(1.0, top_p * (1 + 1e-5)), min_p * (1 - 1e-5))
            tight = ref.process(row, temperature, top_k, top_p * (1 - 1e-5), min_p * (1 + 1e-5))
            assert loose[i] > 0 and tight[i] == 0, f"row {b} token {i} differs from transformers and is not borderline"
        assert (got == want).mean() > 0.99999


def test_a_negative_zero_logit_ties_with_zero_at_a_threshold():
    """A filter threshold of exactly 0 keeps the tokens whose scaled logit is -0 with their +0 ties (s >= tau), in the
    vectorised sums and in the reported probabilities alike: the mask once read the sign bit of s - tau, and -0 - +0
    is -0, so the sampler dropped the -0 tokens while the accept test's p(x) kept them."""
    V = 64
    logits = np.full((2, V), -3.0, np.float32)
    logits[:, 8:40:2], logits[:, 9:41:2] = 0.0, -0.0  # 32 tied zeros, half of them negative, inside the vector body
    logits[:, :4] = 2.0
    for kwargs in (dict(top_p=0.75), dict(top_k=20)):  # both put the threshold on the zeros
        _, probs = K.sample(logits, temperature=1.0, seed=0, return_probs=True, **kwargs)
        probs = np.asarray(probs)
        assert (probs[:, 8:40] > 0).all() and np.ptp(probs[:, 8:40]) == 0, kwargs
        assert probs[:, :4].min() > 0 and (probs[:, 40:] == 0).all()
        assert abs(probs.sum(1) - 1).max() < 1e-5
        # what the sampler draws from: every -0 token comes up as often as its +0 twin
        toks = np.asarray(K.sample(np.repeat(logits[:1], 4000, 0), temperature=1.0, seed=np.arange(4000, dtype=np.uint64),
                                   **kwargs))  # fmt: skip
        counts = np.bincount(toks, minlength=V)
        assert counts[9:41:2].sum() > 0.6 * counts[8:40:2].sum(), kwargs


# --------------------------------------------------------------------------------------------------
# reproducibility and batch independence


def test_same_seed_same_tokens_and_batch_independence():
    rng = np.random.default_rng(11)
    B, Kd, V = 32, 4, 50000
    logits = (rng.standard_normal((B, Kd + 1, V)) * 2).astype(np.float32)
    drafts = logits[:, :Kd].argmax(-1)
    drafts[::3, 1] = 7
    seeds = rng.integers(0, 2**63, size=B, dtype=np.uint64)
    cols = _cols(_random_params(rng, B, V, greedy_frac=0.1))
    nd = np.full(B, Kd, np.int32)
    a = K.verify(logits, drafts, None, nd, seed=seeds, offset=3, **cols)
    b = K.verify(logits, drafts, None, nd, seed=seeds, offset=3, **cols)
    np.testing.assert_array_equal(a[0], b[0])
    c = K.verify(logits, drafts, None, nd, seed=seeds, offset=4, **cols)
    assert (a[0] != c[0]).any()  # a new offset is a new draw
    s_all = K.sample(logits[:, 0], seed=seeds, offset=3, **cols)
    for r in (0, 5, 31):
        one = {k: v[r : r + 1] for k, v in cols.items()}
        t1, n1 = K.verify(logits[r : r + 1], drafts[r : r + 1], None, nd[r : r + 1], seed=seeds[r : r + 1], offset=3, **one)
        np.testing.assert_array_equal(t1[0], a[0][r])
        assert n1[0] == a[1][r]
        assert K.sample(logits[r : r + 1, 0], seed=seeds[r : r + 1], offset=3, **one)[0] == s_all[r]


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(12)
    B, Kd, V = 6, 3, 40000
    logits = (rng.standard_normal((B, Kd + 1, V)) * 2).astype(np.float32)
    drafts = logits[:, :Kd].argmax(-1)
    q = np.abs(rng.standard_normal((B, Kd, V))).astype(np.float32)
    q /= q.sum(-1, keepdims=True)
    cols = dict(temperature=np.array([1.0, 0.7, 0.0, 1.2, 0.9, 1.0]), top_p=np.array([1.0, 0.9, 1.0, 0.95, 1.0, 0.8]),
                top_k=np.array([0, 0, 0, 0, 200, 0]), min_p=np.array([0.0, 0.0, 0.0, 0.01, 0.0, 0.0]))
    seeds = np.arange(B, dtype=np.uint64)
    outs = []
    before = K.num_threads()
    try:
        for nt in (1, 2, 3):
            K.set_num_threads(nt)
            outs.append((K.verify(logits, drafts, q, np.full(B, Kd), seed=seeds, offset=1, **cols),
                         K.sample(logits[:, 0], seed=seeds, offset=1, return_probs=True, **cols),
                         [K.verify(logits[r : r + 1], drafts[r : r + 1], q[r : r + 1], [Kd], seed=seeds[r : r + 1], offset=1,
                                   **{k: v[r : r + 1] for k, v in cols.items()})[0] for r in range(B)]))
    finally:
        K.set_num_threads(before)
    for o in outs[1:]:
        for x, y in zip(outs[0][0], o[0]):
            np.testing.assert_array_equal(x, y)
        for x, y in zip(outs[0][1], o[1]):
            np.testing.assert_array_equal(x, y)
        for x, y in zip(outs[0][2], o[2]):
            np.testing.assert_array_equal(x, y)
    for r in range(B):
        np.testing.assert_array_equal(outs[0][2][r][0], outs[0][0][0][r])


def test_uniforms_contract():
    # Random123's known-answer vectors for philox4x32_10.
    assert K.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    f = 0xFFFFFFFF
    assert K.philox4x32_10((f, f, f, f), (f, f)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    seed, off = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    u = K.uniforms(seed, off, 5, stream=K.STREAM_VERIFY)
    for i in range(5):
        w = K.philox4x32_10((i, K.STREAM_VERIFY, off & f, off >> 32), (seed & f, seed >> 32))
        assert u[0, i] == ((w[1] << 32 | w[0]) >> 11) * 2.0**-53
    us = K.uniforms(np.array([1, 2], np.uint64), np.array([0, 0], np.uint64), 1000)
    assert us.shape == (2, 1000) and 0 <= us.min() and us.max() < 1
    assert abs(us.mean() - 0.5) < 0.03 and not np.array_equal(us[0], us[1])
    assert not np.array_equal(K.uniforms(1, 0, 4, stream=K.STREAM_SAMPLE), K.uniforms(1, 0, 4, stream=K.STREAM_VERIFY))
    # sample consumes uniform 0 of the sample stream: with p uniform over V tokens, token = floor(u*V).
    V = 1000
    seeds = np.arange(50, dtype=np.uint64)
    toks = K.sample(np.zeros((50, V), np.float32), temperature=1.0, seed=seeds, offset=9)
    u0 = K.uniforms(seeds, np.full(50, 9, np.uint64), 1)[:, 0]
    np.testing.assert_array_equal(toks, np.floor(u0 * V).astype(np.int64))


# --------------------------------------------------------------------------------------------------
# edge cases


def test_k0_emits_one_token_from_p():
    rng = np.random.default_rng(2)
    B, V = 8, 300
    logits = rng.standard_normal((B, 1, V)).astype(np.float32)
    seeds = np.arange(B, dtype=np.uint64)
    tokens, nacc = K.verify(logits, np.zeros((B, 0), np.int64), None, np.zeros(B, np.int32), seed=seeds, offset=5)
    assert tokens.shape == (B, 1) and (nacc == 0).all()
    u = K.uniforms(seeds, np.full(B, 5, np.uint64), 2, stream=K.STREAM_VERIFY)
    assert tokens[:, 0].tolist() == [ref.draw(ref.process(logits[b, 0], 1.0, 0, 1.0, 0.0), u[b, 1]) for b in range(B)]
    tokens, nacc = K.verify(logits, np.zeros((B, 0), np.int64), np.zeros((B, 0, V), np.float32), np.zeros(B, np.int32), temperature=0.0)
    assert tokens[:, 0].tolist() == logits[:, 0].argmax(-1).tolist()


def test_v1_and_top_k_beyond_v():
    one = np.zeros((3, 1), np.float32)
    assert K.sample(one, temperature=1.0, top_k=5, top_p=0.5, min_p=0.5).tolist() == [0, 0, 0]
    tokens, nacc = K.verify(np.zeros((2, 3, 1), np.float32), np.zeros((2, 2), np.int64), np.ones((2, 2, 1), np.float32), [2, 1])
    assert tokens.tolist() == [[0, 0, 0], [0, 0, -1]] and nacc.tolist() == [2, 1]
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((16, 20)).astype(np.float32)
    a = K.sample(logits, top_k=20, seed=1, return_probs=True)
    b = K.sample(logits, top_k=10**9, seed=1, return_probs=True)
    c = K.sample(logits, top_k=0, seed=1, return_probs=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a, c):
        np.testing.assert_array_equal(x, y)


def test_bf16_input_equals_float32_of_the_same_values():
    rng = np.random.default_rng(6)
    B, Kd, V = 5, 3, 33000
    t32 = torch.from_numpy((rng.standard_normal((B, Kd + 1, V)) * 2).astype(np.float32))
    tb = t32.bfloat16()
    tf = tb.float()
    drafts = torch.from_numpy(tf[:, :Kd].argmax(-1).numpy())
    kw = dict(temperature=torch.tensor([0.0, 1.0, 0.8, 1.0, 0.5]), top_p=0.9, seed=np.arange(B, dtype=np.uint64), offset=2)
    a = K.verify(tb, drafts, None, torch.full((B,), Kd), **kw)
    b = K.verify(tf, drafts, None, torch.full((B,), Kd), **kw)
    assert isinstance(a[0], torch.Tensor) and a[0].dtype == torch.int64 and a[1].dtype == torch.int32
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)
    sa = K.sample(tb[:, 0], return_probs=True, **kw)
    sb = K.sample(tf[:, 0], return_probs=True, **kw)
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_non_contiguous_inputs_are_copied_not_misread():
    rng = np.random.default_rng(8)
    big = rng.standard_normal((4, 3, 200)).astype(np.float32)
    view = big[:, :, ::2]  # strided
    cont = np.ascontiguousarray(view)
    drafts = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
    a = K.verify(view, drafts, None, [2, 2, 1, 0], seed=3)
    b = K.verify(cont, drafts, None, [2, 2, 1, 0], seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    tv = torch.from_numpy(big).transpose(0, 1)[0]  # [4, 200] non-contiguous
    assert not tv.is_contiguous()
    np.testing.assert_array_equal(K.sample(tv, seed=1).numpy(), K.sample(tv.contiguous(), seed=1).numpy())


def test_returns_numpy_for_numpy_and_torch_for_torch():
    x = np.zeros((2, 4), np.float32)
    assert isinstance(K.sample(x), np.ndarray)
    t, p = K.sample(torch.zeros(2, 4), return_probs=True)
    assert isinstance(t, torch.Tensor) and isinstance(p, torch.Tensor) and p.dtype == torch.float32


def test_gil_is_released_during_kernels():
    import threading
    import time

    B, V = 32, 128256
    logits = np.random.default_rng(0).standard_normal((B, 5, V)).astype(np.float32)
    drafts = np.zeros((B, 4), np.int64)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    th = threading.Thread(target=ticker)
    th.start()
    t0 = time.perf_counter()
    for _ in range(5):
        K.verify(logits, drafts, None, np.full(B, 4), temperature=0.0)
    t1 = time.perf_counter()
    stop.set()
    th.join()
    inside = [t for t in ticks if t0 < t < t1]
    assert len(inside) >= 3, f"the Python thread ran {len(inside)} times during {1e3 * (t1 - t0):.1f} ms of kernels"


# --------------------------------------------------------------------------------------------------
# bad input


def _ok_verify_args(B=3, Kd=2, V=10):
    rng = np.random.default_rng(0)
    return dict(
        target_logits=rng.standard_normal((B, Kd + 1, V)).astype(np.float32),
        draft_tokens=np.ones((B, Kd), np.int64),
        draft_probs=np.full((B, Kd, V), 1.0 / V, np.float32),
        num_draft=np.full(B, Kd, np.int32),
    )


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_logits_name_the_row(value):
    x = np.random.default_rng(0).standard_normal((4, 5000)).astype(np.float32)
    x[2, 4321] = value
    with pytest.raises(K.NonFiniteLogitsError, match=r"logits.*row 2") as ei:
        K.sample(x, temperature=0.7, top_k=3)
    assert ei.value.rows == [2]
    with pytest.raises(ValueError, match="row 2"):
        K.sample(x, temperature=0.0)
    args = _ok_verify_args(B=4, Kd=3, V=5000)
    args["target_logits"][1, 3, 17] = value  # last position: reached only when all drafts are accepted
    args["target_logits"][3, 0, 0] = value
    with pytest.raises(K.NonFiniteLogitsError, match=r"target_logits.*row 1 position 3") as ei:
        K.verify(**args, temperature=np.array([1.0, 0.0, 1.0, 1.0]))
    assert ei.value.rows == [1, 3] and ei.value.positions == [3, 0]
    # positions past num_draft are padding and are not read
    args["num_draft"] = np.array([3, 2, 3, 3], np.int32)
    args["target_logits"][3, 0, 0] = 0.0
    K.verify(**args)


def test_bad_row_does_not_change_other_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 3000)).astype(np.float32)
    drafts = x[:, :2].argmax(-1)
    good = K.verify(x, drafts, None, np.full(6, 2), seed=np.arange(6, dtype=np.uint64))
    x[4, 1, 5] = np.nan
    with pytest.raises(K.NonFiniteLogitsError) as ei:
        K.verify(x, drafts, None, np.full(6, 2), seed=np.arange(6, dtype=np.uint64))
    keep = [r for r in range(6) if r not in ei.value.rows]
    again = K.verify(x[keep], drafts[keep], None, np.full(5, 2), seed=np.arange(6, dtype=np.uint64)[keep])
    np.testing.assert_array_equal(again[0], good[0][keep])


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(temperature=-0.1), ValueError, r"temperature\[0\]"),
        (dict(temperature=np.array([1.0, np.nan, 1.0])), ValueError, r"temperature\[1\].*row 1"),
        (dict(top_p=0.0), ValueError, r"top_p\[0\]"),
        (dict(top_p=np.array([1.0, 1.0, 1.5])), ValueError, r"top_p\[2\].*row 2"),
        (dict(top_k=-1), ValueError, r"top_k\[0\]"),
        (dict(top_k=1.5), TypeError, "top_k"),
        (dict(min_p=1.0), ValueError, r"min_p\[0\]"),
        (dict(min_p=np.array([0.0, -0.1, 0.0])), ValueError, r"min_p\[1\]"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=np.array([1, -2, 3])), ValueError, r"seed\[1\]"),
        (dict(offset=2**64), ValueError, "offset"),
        (dict(temperature=np.ones(4)), ValueError, "temperature.*length 3"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(temperature="hot"), TypeError, "temperature"),
    ],
)
def test_bad_parameters(kw, exc, pattern):
    args = _ok_verify_args()
    with pytest.raises(exc, match=pattern):
        K.verify(**args, **kw)
    with pytest.raises(exc, match=pattern):
        K.sample(args["target_logits"][:, 0], **kw)


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(num_draft=np.array([2, 3, 2])), ValueError, r"num_draft\[1\].*row 1"),
        (dict(num_draft=np.array([2, -1, 2])), ValueError, r"num_draft\[1\]"),
        (dict(num_draft=np.array([2, 2])), ValueError, "num_draft.*shape"),
        (dict(num_draft=np.array([2.0, 2.0, 2.0])), TypeError, "num_draft"),
        (dict(draft_tokens=np.ones((3, 3), np.int64)), ValueError, "draft_tokens.*shape"),
        (dict(draft_tokens=np.array([[1, 2], [3, 10], [0, 0]])), ValueError, r"draft_tokens\[1, 1\].*row 1"),
        (dict(draft_tokens=np.array([[1, 2], [3, -1], [0, 0]])), ValueError, r"draft_tokens\[1, 1\]"),
        (dict(draft_tokens=np.ones((3, 2), np.float32)), TypeError, "draft_tokens"),
        (dict(draft_probs=np.ones((3, 2, 11), np.float32)), ValueError, "draft_probs.*shape"),
        (dict(draft_probs=np.ones((3, 2, 10), np.float64)), TypeError, "draft_probs.*float32"),
        (dict(draft_probs=torch.ones((3, 2, 10), dtype=torch.bfloat16)), TypeError, "draft_probs"),
        (dict(target_logits=np.ones((3, 3, 10), np.float64)), TypeError, "target_logits.*float32 or bfloat16"),
        (dict(target_logits=np.ones((3, 3, 10), np.float16)), TypeError, "target_logits"),
        (dict(target_logits=np.ones((3, 10), np.float32)), ValueError, "target_logits.*3 dimensions"),
        (dict(target_logits=np.ones((3, 4, 10), np.float32)), ValueError, "draft_tokens.*shape"),
        (dict(target_logits=[[[1.0]]]), TypeError, "target_logits"),
        (dict(target_logits=np.ones((3, 3, 0), np.float32)), ValueError, "target_logits.*vocabulary"),
    ],
)
def test_bad_verify_inputs(change, exc, pattern):
    args = _ok_verify_args()
    args.update(change)
    with pytest.raises(exc, match=pattern):
        K.verify(**args)


def test_bad_sample_inputs():
    with pytest.raises(TypeError, match="logits"):
        K.sample(np.ones((2, 5), np.int32))
    with pytest.raises(ValueError, match="logits.*2 dimensions"):
        K.sample(np.ones(5, np.float32))
    with pytest.raises(TypeError, match="logits"):
        K.sample("logits")
    # Padding positions past num_draft may hold anything (e.g. -1 draft tokens).
    args = _ok_verify_args()
    args["draft_tokens"][0, 1] = -1
    args["num_draft"] = np.array([1, 2, 2], np.int32)
    K.verify(**args)


def test_empty_batch():
    t = K.sample(np.zeros((0, 7), np.float32))
    assert t.shape == (0,)
    tokens, nacc = K.verify(np.zeros((0, 3, 7), np.float32), np.zeros((0, 2), np.int64), None, np.zeros(0, np.int32))
    assert tokens.shape == (0, 3) and nacc.shape == (0,)


@pytest.mark.parametrize("k", [1, 7, 100, 700, 5000])
def test_top_k_keeps_ties_at_large_v(k):
    """Top-k keeps every token tied with the k-th largest (as TopKLogitsWarper), whatever the path."""
    rng = np.random.default_rng(k)
    V = 60000
    x = rng.integers(-40, 41, size=(3, V)).astype(np.float32) / 4  # many exact ties
    x[1] = rng.standard_normal(V).astype(np.float32)
    x[2, rng.integers(0, V, 3)] = 30.0
    _, probs = K.sample(x, temperature=0.9, top_k=k, seed=1, return_probs=True)
    for b in range(3):
        kth = np.sort(x[b] * np.float32(1 / 0.9))[::-1][k - 1]
        np.testing.assert_array_equal(probs[b] > 0, (x[b] * np.float32(1 / 0.9)) >= kth)
        np.testing.assert_allclose(probs[b], ref.process(x[b], 0.9, k, 1.0, 0.0), rtol=2e-6, atol=1e-9)


def test_concurrent_calls_from_python_threads_agree_with_serial_calls():
    """The server may call the kernels from several threads: the pool is shared, scratch is per thread."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(21)
    jobs = []
    for i in range(12):
        B, Kd, V = int(rng.integers(1, 6)), int(rng.integers(0, 4)), int(rng.choice([50, 9000, 30000]))
        x = (rng.standard_normal((B, Kd + 1, V)) * 2).astype(np.float32)
        d = x[:, :Kd].argmax(-1) if Kd else np.zeros((B, 0), np.int64)
        kw = dict(temperature=[0.0, 1.0, 0.7][i % 3], top_k=[0, 20, 0][i % 3], top_p=[1.0, 0.9, 0.8][i % 3],
                  seed=np.arange(B, dtype=np.uint64) + i, offset=i)
        jobs.append((x, d, np.full(B, Kd), kw))
    run = lambda j: K.verify(j[0], j[1], None, j[2], **j[3])  # noqa: E731
    serial = [run(j) for j in jobs]
    with ThreadPoolExecutor(4) as ex:
        for _ in range(3):
            for got, want in zip(ex.map(run, jobs), serial):
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a, b)


def _child_verify(_):
    x = np.random.default_rng(0).standard_normal((1, 3, 50000)).astype(np.float32)
    return K.verify(x, np.zeros((1, 2), np.int64), None, [2], temperature=1.0, seed=1)[0].tolist()


def test_kernels_work_in_a_forked_child():
    """A forked child has no pool threads: the kernels must rebuild the pool, not wait on dead workers."""
    import multiprocessing

    want = _child_verify(0)  # the parent's pool exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_child_verify, (0,)).get(timeout=60) == want
