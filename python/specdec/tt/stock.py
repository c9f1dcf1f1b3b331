"""Speculative verification and sampling composed of stock ttnn operations: the default tt path.

The same contract as ``specdec.kernels.sampling.verify`` / ``sample`` (shapes, per-row parameters, the Philox
uniforms), computed by a short sequence of operations that tt-metal ships and tests upstream (elementwise
arithmetic and compares, row reductions, ``sort``/``topk``, ``cumsum``, ``gather``) instead of a custom kernel.
The algorithm is written once against an ``Ops`` object: ``specdec.tt.ops_ttnn.TtnnOps`` runs it on a device,
``specdec.tt.ops_numpy.NumpyOps`` is the numpy model of those operations that the tests run against the CPU
kernels.

Per row r of the R = B*(K+1) target positions (row r = b*(K+1) + j), everything V-wide stays on the device:

    greedy  a = lowest id holding max(l)                 (max, eq, where(iota), min: the tie rule by construction)
    scaled  s = fl32(l * fl32(1/T)),  m = fl32(max(l) * fl32(1/T)) = max(s),  e = exp(s - m)
    top-k   t_k = the k-th largest s (sorted candidates, gather)          keep s >= t_k: ties kept, as the CPU
    top-p   Z_k = sum(e over s >= t_k); c = cumsum(exp(sorted s - m)); n = count(c < top_p * Z_k);
            t_p = sorted s at min(n, k - 1)                              keep s >= t_p: the CPU's rule that a token
            stays iff the mass strictly above it is < top_p * Z_k, ties kept together
    min-p   keep e >= min_p
    w = e on the kept set, 0 elsewhere;  Z = sum(w);  w_x = w at the row's draft token (gather)
    residual  r = relu(w - q * Z) (a dense draft q; a one-hot draft zeroes w at x); r = w when r sums to 0 or the
            row has no draft (the bonus row, and every row of ``sample``)
    draw    c_r = cumsum(r), U = fl32(u_sample) * c_r[last];  token = min(count(c_r <= U), count(c_r < c_r[last]))

and the host reads back four numbers a row (a, w_x, Z, token). The accept test ``u_accept * q(x) < p(x)`` is
``u_accept * q(x) * Z < w_x`` in float64 on the host with the full 53-bit uniform: q(x) is the host's own draft
probability, so no V-wide data comes back. The host assembles the output as the CPU kernels do (drafts up to the
first rejection, then that row's token).

Where this differs from the CPU kernels (and from the custom kernel), all below fp32 resolution:
  * exp, the row sums and the cumulative sums are the device's fp32 ones (``cumsum`` accumulates with Kahan
    compensation), where the CPU sums in float64; a top-p boundary moves only when top_p * Z_k falls within
    rounding of a cumulative sum;
  * the draw uses the uniform at fp32 precision against fp32 cumulative sums, so each token's probability is
    resolved to about 2^-24 of its row's mass (the CPU: float64 sums and 53-bit uniforms; the custom kernel: 2^-32
    fixed point); a token lighter than that can be drawn with a probability off by up to that amount.
Speculation stays exact at that resolution: the accept test and the residual use the same w and Z, so an emitted
token's law is the row's w / Z whatever the draft proposed (tests/tt/test_stock.py checks it with χ² tests and a
control that breaks the residual).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from specdec.tt import model as _model

PAD_LOGIT = -1e30  # a padding column's logit: exp(s - m) is 0 and it is never the max of a row with a real logit
NO_THRESHOLD = -3e38  # a filter that is off keeps s >= NO_THRESHOLD: every finite s
# Rows whose filters are all top-k of at most this take ttnn.topk's k largest instead of a full sort: the cumulative
# sums then span k columns, not V. ttnn documents topk as multi-core for k <= 64 on power-of-two widths up to 32768
# and single-core otherwise, so which is faster at V = 128256 is for a hardware run to measure (tt-report.json).
TOPK_MAX = 64


class Ops(Protocol):
    """The device operations the algorithm uses. Tensors are float32 [R, N] or per-row columns [R, 1]; a binary
    operation or a comparison of a matrix with a column broadcasts the column along the row; comparisons return
    1.0 / 0.0."""

    row_multiple: int  # R and N are padded to multiples of these before ``put``
    col_multiple: int

    def put(self, a: np.ndarray) -> Any: ...
    def get(self, t: Any) -> np.ndarray: ...
    def iota(self, rows: int, n: int) -> Any: ...  # [rows, n]: each row 0.0 .. n-1
    def add(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def maximum(self, a: Any, b: Any) -> Any: ...
    def minimum(self, a: Any, b: Any) -> Any: ...
    def exp(self, a: Any) -> Any: ...
    def relu(self, a: Any) -> Any: ...
    def ge(self, a: Any, b: Any) -> Any: ...
    def lt(self, a: Any, b: Any) -> Any: ...
    def le(self, a: Any, b: Any) -> Any: ...
    def eq(self, a: Any, b: Any) -> Any: ...
    def ne(self, a: Any, b: Any) -> Any: ...
    def where(self, c: Any, a: Any, b: float) -> Any: ...  # c and a of one shape, b a scalar
    def row_max(self, a: Any) -> Any: ...
    def row_min(self, a: Any) -> Any: ...
    def row_sum(self, a: Any) -> Any: ...
    def sort_desc(self, a: Any) -> Any: ...  # values only, each row descending
    def topk(self, a: Any, k: int) -> Any: ...  # [R, k]: each row's k largest values, descending
    def cumsum(self, a: Any) -> Any: ...
    def gather(self, a: Any, idx: Any) -> Any: ...  # [R, 1]: a[r, idx[r]], idx a float column of integers


@dataclass
class RowResults:
    """What the device returns per row (length R)."""

    argmax: np.ndarray  # int64: lowest id holding the row's max logit (-1 when the batch has no greedy row)
    w_x: np.ndarray  # float32: the kept weight of the row's draft token (0 when the batch has no draft)
    Z: np.ndarray  # float32: the row's kept mass (0 when the batch has no draft: no accept test needs it)
    token: np.ndarray  # int64: the row's draw from its residual (or from w); argmax on greedy rows


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad(a: np.ndarray, rows: int, cols: int, fill: float) -> np.ndarray:
    """``a`` in the top-left corner of a [rows, cols] float32 array of ``fill`` (padding rows are all ``fill``: their
    results are computed and dropped)."""
    out = np.full((rows, cols), fill, np.float32)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def rows(ops: Ops, logits: np.ndarray, q: np.ndarray | None, prm: "_model.RowParams", u_sample: np.ndarray) -> RowResults:
    """Run the algorithm on R rows: logits float32 [R, V]; q float32 [R, V], each row's draft distribution (used on
    the rows with a draft only), or None for one-hot drafts; per-row parameters ``prm``
    (``specdec.tt.model.row_params``; its 32-bit uniforms are unused here); u_sample float64 [R]."""
    R, V = logits.shape
    Rp, Vp = _ceil(R, ops.row_multiple), _ceil(V, ops.col_multiple)
    sampled = ~prm.greedy
    has_k = sampled & (prm.top_k > 0) & (prm.top_k < V)
    has_p = sampled & (prm.top_p < 1.0)
    has_min_p = sampled & (prm.min_p > 0.0)
    residual = prm.mode == _model.MODE_RESIDUAL

    def col(v, fill: float = 0.0) -> Any:
        c = np.full((Rp, 1), fill, np.float32)
        c[:R, 0] = v
        return ops.put(c)

    L = ops.put(_pad(logits, Rp, Vp, PAD_LOGIT))
    lmax = ops.row_max(L)
    out = {}
    if prm.greedy.any():
        out["argmax"] = ops.row_min(ops.where(ops.eq(L, lmax), ops.iota(Rp, Vp), float(1 << 24)))
    if sampled.any():
        inv_t = col(prm.inv_t, 1.0)
        s = ops.mul(L, inv_t)
        m = ops.mul(lmax, inv_t)  # = max(s): rounding is monotone
        e = ops.exp(ops.sub(s, m))
        keep = None
        if (has_k | has_p).any():
            keep = ops.ge(s, _threshold(ops, s, e, m, prm, has_k, has_p, col, Vp))
        if has_min_p.any():
            mp = ops.ge(e, col(np.where(has_min_p, prm.min_p, 0.0)))
            keep = mp if keep is None else ops.mul(keep, mp)
        w = e if keep is None else ops.mul(e, keep)
        if not residual.any():  # every row draws from w (``sample``, or verify with no drafts)
            r = w
        else:
            x = np.where(residual, prm.draft, -1)
            out["Z"] = Z = ops.row_sum(w)
            out["w_x"] = ops.gather(w, col(np.maximum(x, 0)))
            if q is not None:  # max(p - q, 0) scaled by Z; rows without a draft subtract nothing
                qp = _pad(q, Rp, Vp, 0.0)
                qp[: R][~residual] = 0.0
                r = or_w_when_empty(ops, ops.relu(ops.sub(w, ops.mul(ops.put(qp), Z))), w)
            else:  # a one-hot draft: w without the draft token (x = -1 on rows without one matches no column)
                r = or_w_when_empty(ops, ops.mul(w, ops.ne(ops.iota(Rp, Vp), col(x, -1.0))), w)
        c = ops.cumsum(r)
        last = ops.gather(c, col(np.full(R, Vp - 1)))
        U = ops.mul(col(u_sample.astype(np.float32)), last)
        out["token"] = ops.minimum(ops.row_sum(ops.le(c, U)), ops.row_sum(ops.lt(c, last)))
    got = {k: ops.get(v)[:R, 0] for k, v in out.items()}
    am = got["argmax"].astype(np.int64) if "argmax" in got else np.full(R, -1, np.int64)
    zero = np.zeros(R, np.float32)
    token = np.where(prm.greedy, am, got["token"].astype(np.int64)) if "token" in got else am
    return RowResults(argmax=am, w_x=got.get("w_x", zero).astype(np.float32), Z=got.get("Z", zero).astype(np.float32),
                      token=token)  # fmt: skip


def or_w_when_empty(ops: Ops, r, w) -> Any:
    """r, or w on the rows where r has no mass (p == q), as the CPU kernels do: r + w * [sum r <= 0]."""
    return ops.add(r, ops.mul(w, ops.le(ops.row_sum(r), 0.0)))


def _threshold(ops: Ops, s, e, m, prm, has_k, has_p, col, Vp: int) -> Any:
    """max(t_k, t_p) per row as a column; NO_THRESHOLD where a row has neither filter."""
    if (has_p & ~has_k).any() or int(prm.top_k[has_k].max(initial=0)) > TOPK_MAX:
        cand, width = ops.sort_desc(s), Vp
    else:
        width = int(prm.top_k[has_k].max())
        cand = ops.topk(s, width)
    t_k = ops.where(col(has_k), ops.gather(cand, col(np.where(has_k, prm.top_k - 1, 0))), NO_THRESHOLD)
    if not has_p.any():
        return t_k
    Zk = ops.row_sum(ops.mul(e, ops.ge(s, t_k)))
    c = ops.cumsum(ops.exp(ops.sub(cand, m)))
    n = ops.row_sum(ops.lt(c, ops.mul(col(np.where(has_p, prm.top_p, 1.0)), Zk)))
    t_p = ops.gather(cand, ops.minimum(n, col(np.where(has_k, prm.top_k, width) - 1)))
    return ops.maximum(t_k, ops.where(col(has_p), t_p, NO_THRESHOLD))


def accept(res: RowResults, prm: "_model.RowParams", q_x: np.ndarray, u_accept: np.ndarray) -> np.ndarray:
    """Per row: the draft passes the accept test, ``u * q(x) < p(x)`` with p(x) = w_x / Z (float64, the full
    uniform), or x == argmax on a greedy row. q_x float [R] is the draft's probability of its token (1 for one-hot
    drafts); rows without a draft get False."""
    sampled_ok = np.asarray(u_accept, np.float64) * np.asarray(q_x, np.float64) * res.Z.astype(np.float64) < res.w_x
    ok = np.where(prm.greedy, prm.draft == res.argmax, sampled_ok)
    return ok & (prm.mode == _model.MODE_RESIDUAL)


def verify(ops: Ops, target_logits, draft_tokens, draft_probs, num_draft, *, temperature, top_k, top_p, min_p,
           u_accept, u_sample) -> tuple[np.ndarray, np.ndarray]:
    """``specdec.kernels.sampling.verify`` through ``ops``, the uniforms given (float64 [B, K+1] each, the CPU
    kernels' u[2j] and u[2j+1]) -> (tokens int64 [B, K+1], num_accepted int32 [B])."""
    tl = np.asarray(target_logits, dtype=np.float32)
    B, K1, V = tl.shape
    K = K1 - 1
    prm = _model.row_params(B, K, num_draft, draft_tokens, temperature, top_k, top_p, min_p,
                            np.zeros((B, K1)), np.zeros((B, K1)))  # fmt: skip
    q = None
    q_x = np.ones(B * K1)
    if draft_probs is not None:
        q = np.zeros((B, K1, V), np.float32)
        q[:, :K] = np.asarray(draft_probs, dtype=np.float32).reshape(B, K, V)
        q = q.reshape(B * K1, V)
        q_x = q[np.arange(B * K1), np.maximum(prm.draft, 0)]
    res = rows(ops, tl.reshape(B * K1, V), q, prm, np.asarray(u_sample, np.float64).reshape(-1))
    ok = accept(res, prm, q_x, np.asarray(u_accept, np.float64).reshape(-1))
    return _model.assemble(B, K, num_draft, draft_tokens, {"accept": ok, "token": res.token})


def sample(ops: Ops, logits, *, temperature, top_k, top_p, min_p, u_sample) -> np.ndarray:
    """``specdec.kernels.sampling.sample`` through ``ops``, the uniforms given (float64 [B]) -> tokens int64 [B]."""
    lg = np.asarray(logits, dtype=np.float32)
    B = lg.shape[0]
    tokens, _ = verify(ops, lg[:, None, :], np.zeros((B, 0), np.int64), None, np.zeros(B, np.int64),
                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, u_accept=np.zeros((B, 1)),
                       u_sample=np.asarray(u_sample, np.float64).reshape(B, 1))  # fmt: skip
    return tokens[:, 0]
