"""A plain numpy reference for specdec.kernels (helpers only; the tests are in test_kernels*.py), written from the contract in the docstring of specdec.kernels.sampling.

It consumes the same uniforms (``kernels.uniforms``) and follows the same processing, so the C++
kernels must agree with it token for token (greedy exactly; sampling except when a uniform falls
within rounding distance of a CDF boundary, which the fixed seeds in the tests never hit).
"""

from __future__ import annotations

import numpy as np

GREEDY_T = 1e-5


def process(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The processed distribution p (float64) of one row of logits (float32)."""
    l = np.asarray(logits, dtype=np.float32)
    V = l.shape[0]
    if temperature <= GREEDY_T:
        p = np.zeros(V)
        p[int(np.argmax(l))] = 1.0  # argmax returns the lowest id on ties
        return p
    s = (l * np.float32(1.0 / temperature)).astype(np.float32)
    m = s.max()
    e = np.exp((s - m).astype(np.float32).astype(np.float64))
    keep = np.ones(V, dtype=bool)
    if 0 < top_k < V:
        kth = np.sort(s)[::-1][top_k - 1]
        keep &= s >= kth
    if top_p < 1.0:
        ek = np.where(keep, e, 0.0)
        # strictly-larger mass G_i = sum of e_j with s_j > s_i (ties count together)
        order = np.argsort(-s, kind="stable")
        ss, es = s[order], ek[order]
        csum = np.concatenate([[0.0], np.cumsum(es)])
        first = np.searchsorted(-ss, -ss, side="left")  # first position of each value's tie group
        g = np.empty(V)
        g[order] = csum[first]
        keep &= g < top_p * ek.sum()
    if min_p > 0.0:
        keep &= e >= np.float32(min_p)
    p = np.where(keep, e, 0.0)
    return p / p.sum()


def draw(w: np.ndarray, u: float) -> int:
    """Inverse CDF in token-id order: the first token whose running sum exceeds u * sum(w)."""
    c = np.cumsum(w)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    if i >= len(w):
        i = int(np.flatnonzero(w > 0)[-1])
    return i


def sample(logits, params, u0):
    """params: (temperature, top_k, top_p, min_p) per row; u0: uniform 0 of the sample stream per row."""
    out = []
    for b in range(logits.shape[0]):
        p = process(logits[b], *params[b])
        out.append(draw(p, u0[b]) if params[b][0] > GREEDY_T else int(np.argmax(p)))
    return np.array(out, dtype=np.int64)


def verify_row(target_logits, draft_tokens, draft_probs, n, params, u, wrong_rule=False):
    """One row of verify. u: the row's uniforms of the verify stream (index 2j accept, 2j+1 sample).

    wrong_rule=True accepts with probability min(1, q(x)/p(x)) instead: the negative control.
    """
    K1 = target_logits.shape[0]
    greedy = params[0] <= GREEDY_T
    toks = [-1] * K1
    for j in range(n + 1):
        p = process(target_logits[j], *params)
        if j == n:
            toks[j] = int(np.argmax(p)) if greedy else draw(p, u[2 * j + 1])
            return toks, n
        x = int(draft_tokens[j])
        if greedy:
            if x == int(np.argmax(p)):
                toks[j] = x
                continue
            toks[j] = int(np.argmax(p))
            return toks, j
        if draft_probs is not None:
            q = draft_probs[j].astype(np.float64)
        else:
            q = np.zeros(len(p))
            q[x] = 1.0
        if wrong_rule:
            accept = u[2 * j] * p[x] < q[x]
        else:
            accept = u[2 * j] * q[x] < p[x]
        if accept:
            toks[j] = x
            continue
        r = np.maximum(p - q, 0.0)
        toks[j] = draw(r, u[2 * j + 1]) if r.sum() > 0 else draw(p, u[2 * j + 1])
        return toks, j
    raise AssertionError("unreachable")


def verify_batch_vec(p, q, draft_tokens, n, u, wrong_rule=False):
    """Vectorised verify for B rows that share p [K+1, V] and q [K, V] (float64); u [B, 2K+2] uniforms.

    draft_tokens [B, K]; n is the common num_draft. With wrong_rule the accept test is
    u * p(x) < q(x) (accept with probability min(1, q/p)): the negative control.
    """
    B = draft_tokens.shape[0]
    K1, V = p.shape
    tokens = np.full((B, K1), -1, dtype=np.int64)
    nacc = np.full(B, n, dtype=np.int32)
    alive = np.ones(B, dtype=bool)
    for j in range(n):
        x = draft_tokens[:, j]
        px, qx = p[j][x], q[j][x]
        acc = (u[:, 2 * j] * px < qx) if wrong_rule else (u[:, 2 * j] * qx < px)
        acc &= alive
        tokens[acc, j] = x[acc]
        rej = alive & ~acc
        if rej.any():
            r = np.maximum(p[j] - q[j], 0.0)
            w = r if r.sum() > 0 else p[j]
            c = np.cumsum(w)
            idx = np.searchsorted(c, u[rej, 2 * j + 1] * c[-1], side="right")
            tokens[rej, j] = np.minimum(idx, np.flatnonzero(w > 0)[-1])
            nacc[rej] = j
        alive &= acc
    if alive.any():
        c = np.cumsum(p[n])
        idx = np.searchsorted(c, u[alive, 2 * n + 1] * c[-1], side="right")
        tokens[alive, n] = np.minimum(idx, np.flatnonzero(p[n] > 0)[-1])
    return tokens, nacc
