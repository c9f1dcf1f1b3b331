"""Fused sampling and speculative-verification kernels on the CPU (C++, ``specdec._kernels``).

Two kernels and a report of their distributions, one processing of the logits, one random-number contract.

Shapes
------
``sample(logits[B, V], ...) -> tokens int64[B]``  (``, probs float32[B, V]`` with ``return_probs``)

``verify(target_logits[B, K+1, V], draft_tokens int64[B, K], draft_probs float32[B, K, V] | None,
num_draft int32[B], ...) -> (tokens int64[B, K+1], num_accepted int32[B])``

``logprobs(logits[N, V], tokens int64[N], ..., top_n) -> (logprob float32[N], top_ids int64[N, top_n],
top_logprobs float32[N, top_n])``

Inputs are numpy arrays or torch CPU tensors (anything with ``__dlpack__`` goes through torch). Logits
may be float32 or bfloat16 (torch.bfloat16, or numpy's ml_dtypes bfloat16); draft_probs is float32.
Contiguous inputs are read in place (zero-copy); non-contiguous ones are copied first. Outputs are
torch tensors when the logits are a torch tensor, numpy arrays otherwise. The GIL is released while
a kernel runs.

Sampling parameters, per row
----------------------------
``temperature, top_k, top_p, min_p, seed, offset`` are each a Python scalar (applied to every row) or
a 1-D array of length B. ``temperature`` 0 is greedy (temperatures at or below 1e-5 are treated as
greedy too, to keep 1/T finite); ``top_k`` 0, ``top_p`` 1.0 and ``min_p`` 0 switch their filter off.
``seed`` and ``offset`` are unsigned 64-bit: a request's seed and its step counter. A row's output
depends only on its own inputs, parameters, seed and offset: never on the batch size, the other rows
or the number of threads.

Processing (the same in ``sample`` and in ``verify``)
------------------------------------------------------
Greedy rows: p is one-hot at argmax(logits), ties to the lowest token id.
Other rows, with float32 arithmetic where it says fl32::

    s_i = fl32(l_i * fl32(1 / T))            temperature
    m   = max_i s_i,  e_i = exp(s_i - m)
    top-k:  keep s_i >= (k-th largest s)     ties at the boundary are all kept
    top-p:  keep tokens whose strictly-larger mass, sum_{s_j > s_i} e_j, is < top_p * sum_{kept} e_j
            (on the top-k survivors; the same set as transformers' TopPLogitsWarper, ties kept together)
    min-p:  keep e_i >= min_p                (p_i >= min_p * max p, as MinPLogitsWarper)
    p_i = fl32(e_i * fl32(1 / Z)) on the kept set, 0 elsewhere;  Z = sum_{kept} e_i

in transformers' order (temperature, top-k, top-p, min-p). ``sample(..., return_probs=True)``
returns exactly this p; the engine passes it to ``verify`` as the draft's q.

Drawing a token from weights w with a uniform u is the inverse CDF in token-id order: the first token
whose running sum exceeds ``u * sum(w)`` (sums in float64; equal to a float64 numpy cumsum except when
u falls within rounding distance of a boundary).

The acceptance rule (Leviathan et al. 2023; Chen et al. 2023)
-------------------------------------------------------------
For row b with n = num_draft[b] and each draft position j < n, with x = draft_tokens[b, j],
p = processed target_logits[b, j], q = draft_probs[b, j] (one-hot at x when draft_probs is None):

* accept x iff ``u[2j] * q(x) < p(x)``  (that is, with probability min(1, p(x)/q(x)));
* at the first rejection emit a token drawn with ``u[2j+1]`` from normalize(max(p - q, 0)) and stop;
  if p - q has no positive mass, draw from p (with the same ``u[2j+1]``);
* if all n drafts are accepted, emit a bonus token drawn with ``u[2n+1]`` from p at position n.

Greedy rows accept x only when x == argmax p (lowest id on ties), emit argmax p at the first
rejection or as the bonus, and use no uniforms. A row emits num_accepted + 1 tokens; ``tokens`` is
padded with -1 after them. ``logprobs`` reports the processed distribution at any position (an emitted token's
position j holds the distribution it was drawn from, whichever path drew it: accept, residual or bonus).

Random numbers (the contract a device port must reproduce)
-----------------------------------------------------------
Every uniform comes from Philox4x32-10 (Salmon et al. 2011, Random123's ``philox4x32`` with 10 rounds)::

    (x0, x1, x2, x3) = philox4x32_10(counter = (index, stream, lo32(offset), hi32(offset)),
                                     key     = (lo32(seed), hi32(seed)))
    u = ((x1 << 32 | x0) >> 11) * 2**-53          # float64 in [0, 1), 53 random bits

* ``sample`` uses stream 0 (``STREAM_SAMPLE``), index 0: one uniform per row.
* ``verify`` uses stream 1 (``STREAM_VERIFY``): index 2j for the accept test at draft position j,
  index 2j+1 for the residual sample at position j or for the bonus token when j == num_draft.

The streams keep draft sampling and verification independent even when a caller passes the same
(seed, offset) to both, which exactness requires. Calls that must be independent of each other (two
draft positions, two steps) must use different offsets. ``uniforms(seed, offset, count, stream=...)``
returns these numbers, so a port or a reference implementation can consume exactly the same ones.

Errors
------
Bad input raises ``TypeError`` (dtype, type) or ``ValueError`` (shape, range, NaN/Inf) naming the
argument and, where it applies, the row. Rows with NaN or Inf logits raise ``NonFiniteLogitsError``
(a ValueError) whose ``rows`` attribute lists them, so a caller can fail those requests alone and
rerun the others: a bad row never changes another row's result. ``verify`` checks every position up
to num_draft[b] of each row, including positions after a rejection.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from specdec import _kernels as _k

try:  # torch is a dependency of the project, but the kernels work on numpy alone.
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = [
    "sample",
    "verify",
    "logprobs",
    "uniforms",
    "philox4x32_10",
    "num_threads",
    "set_num_threads",
    "NonFiniteLogitsError",
    "STREAM_SAMPLE",
    "STREAM_VERIFY",
    "GREEDY_TEMPERATURE",
]

STREAM_SAMPLE: int = _k.STREAM_SAMPLE
STREAM_VERIFY: int = _k.STREAM_VERIFY
GREEDY_TEMPERATURE: float = _k.GREEDY_TEMPERATURE
_F32, _BF16 = 0, 1
_U64_MAX = (1 << 64) - 1


class NonFiniteLogitsError(ValueError):
    """Logits with NaN or Inf. ``rows`` lists the offending batch rows (and ``positions`` for verify)."""

    def __init__(self, msg: str, rows: list[int], positions: list[int] | None = None):
        super().__init__(msg)
        self.rows = rows
        self.positions = positions


def num_threads() -> int:
    """Threads the kernels use (the caller included)."""
    return _k.num_threads()


def set_num_threads(n: int) -> None:
    """Sets the kernels' thread count; n <= 0 restores the default (SPECDEC_NUM_THREADS or all cores)."""
    _k.set_num_threads(int(n))


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """The raw generator: four 32-bit words for a 4-word counter and a 2-word key (for ports and tests)."""
    c = [int(v) & 0xFFFFFFFF for v in counter]
    k = [int(v) & 0xFFFFFFFF for v in key]
    return _k.philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1])


# ----------------------------------------------------------------------------------------------------
# Input handling


def _is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


class _Buf:
    """A contiguous CPU buffer that stays alive while the kernel reads it."""

    __slots__ = ("obj", "ptr", "shape", "dtype_code", "torch")

    def __init__(self, obj, ptr, shape, dtype_code, is_torch):
        self.obj = obj
        self.ptr = ptr
        self.shape = tuple(int(s) for s in shape)
        self.dtype_code = dtype_code
        self.torch = is_torch


def _float_buf(x: Any, name: str, ndim: int, allow_bf16: bool) -> _Buf:
    allowed = "float32 or bfloat16" if allow_bf16 else "float32"
    if not _is_torch(x) and not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__") and torch is not None:
        x = torch.from_dlpack(x)
    if _is_torch(x):
        if x.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU tensor, got device {x.device}")
        if x.dtype == torch.float32:
            code = _F32
        elif x.dtype == torch.bfloat16 and allow_bf16:
            code = _BF16
        else:
            raise TypeError(f"{name} must be {allowed}, got {x.dtype}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
        x = x.detach()
        if x.is_conj() or x.is_neg():
            x = x.resolve_conj().resolve_neg()
        if not x.is_contiguous():
            x = x.contiguous()
        return _Buf(x, x.data_ptr(), x.shape, code, True)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch CPU tensor, got {type(x).__name__}")
    if x.dtype == np.float32:
        code = _F32
    elif allow_bf16 and x.dtype.name == "bfloat16" and x.dtype.itemsize == 2:
        code = _BF16
    else:
        raise TypeError(f"{name} must be {allowed}, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return _Buf(x, x.ctypes.data, x.shape, code, False)


def _to_numpy_small(x: Any, name: str) -> np.ndarray:
    if _is_torch(x):
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _int_array(x: Any, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    a = _to_numpy_small(x, name)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise ValueError(f"{name} values must fit in {np.dtype(dtype).name}")
    return np.ascontiguousarray(a, dtype=dtype)


def _row_param(value: Any, name: str, B: int, kind: str) -> np.ndarray:
    """A per-row parameter as a contiguous array of length B: float64, int64 or uint64."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if kind == "float":
        if isinstance(value, numbers.Real):
            a = np.full(B, float(value), dtype=np.float64)
        else:
            a = _to_numpy_small(value, name)
            if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                raise TypeError(f"{name} must be a real number or array, got dtype {a.dtype}")
            a = np.ascontiguousarray(a, dtype=np.float64)
    elif kind == "int":
        if isinstance(value, numbers.Integral):
            a = np.full(B, int(value), dtype=np.int64)
        elif isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        else:
            a = _to_numpy_small(value, name)
            if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
            if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
                raise ValueError(f"{name} is too large")
            a = np.ascontiguousarray(a, dtype=np.int64)
    else:  # uint64: seed, offset
        if isinstance(value, numbers.Integral):
            v = int(value)
            if not 0 <= v <= _U64_MAX:
                raise ValueError(f"{name} must be in [0, 2^64), got {v}")
            a = np.full(B, v, dtype=np.uint64)
        elif isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        else:
            a = _to_numpy_small(value, name)
            if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name} must be an unsigned integer array, got dtype {a.dtype}")
            if a.dtype != np.uint64 and a.size and a.min() < 0:
                row = int(np.argmax(a < 0))
                raise ValueError(f"{name}[{row}] must be in [0, 2^64), got {a[row]}")
            a = np.ascontiguousarray(a.astype(np.uint64, copy=False))
    if a.ndim != 1 or a.shape[0] != B:
        raise ValueError(f"{name} must be a scalar or a 1-D array of length {B} (the batch), got shape {a.shape}")
    return a


def _check_rows(bad: np.ndarray, name: str, values: np.ndarray, rule: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{row}] {rule}, got {values[row]!r} (row {row})")


def _params(B: int, temperature, top_k, top_p, min_p, seed, offset):
    t = _row_param(temperature, "temperature", B, "float")
    _check_rows(~np.isfinite(t) | (t < 0), "temperature", t, "must be finite and >= 0 (0 = greedy)")
    k = _row_param(top_k, "top_k", B, "int")
    _check_rows(k < 0, "top_k", k, "must be >= 0 (0 = off)")
    p = _row_param(top_p, "top_p", B, "float")
    _check_rows(~((p > 0) & (p <= 1)), "top_p", p, "must be in (0, 1] (1 = off)")
    mp = _row_param(min_p, "min_p", B, "float")
    _check_rows(~((mp >= 0) & (mp < 1)), "min_p", mp, "must be in [0, 1) (0 = off)")
    s = _row_param(seed, "seed", B, "uint64")
    o = _row_param(offset, "offset", B, "uint64")
    return t, k, p, mp, s, o


def _empty(shape, np_dtype, like_torch: bool, fill=None):
    if like_torch:
        tdt = {np.int64: torch.int64, np.int32: torch.int32, np.float32: torch.float32}[np_dtype]
        out = torch.empty(shape, dtype=tdt)
        return out, out.data_ptr()
    out = np.empty(shape, dtype=np_dtype)
    return out, out.ctypes.data


def _raise_nonfinite(name: str, status: np.ndarray, pos: np.ndarray | None = None) -> None:
    rows = [int(r) for r in np.flatnonzero(status != 0)]
    if not rows:
        return
    if pos is None:
        where = ", ".join(f"row {r}" for r in rows[:8])
        raise NonFiniteLogitsError(f"{name} contains NaN or Inf ({where})", rows)
    positions = [int(pos[r]) for r in rows]
    where = ", ".join(f"row {r} position {p}" for r, p in list(zip(rows, positions))[:8])
    raise NonFiniteLogitsError(f"{name} contains NaN or Inf ({where})", rows, positions)


# ----------------------------------------------------------------------------------------------------
# Kernels


def sample(
    logits,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=0,
    offset=0,
    return_probs: bool = False,
):
    """Samples one token per row from the processed distribution of ``logits[B, V]``.

    Returns ``tokens int64[B]``, or ``(tokens int64[B], probs float32[B, V])`` with ``return_probs``:
    probs is the processed distribution the token was drawn from (one-hot at the argmax for greedy
    rows). Uses uniform index 0 of stream ``STREAM_SAMPLE`` for (seed, offset) of each row.
    """
    buf = _float_buf(logits, "logits", 2, allow_bf16=True)
    B, V = buf.shape
    if V < 1:
        raise ValueError(f"logits must have a vocabulary of at least 1, got shape {buf.shape}")
    if V >= 1 << 31:
        raise ValueError(f"logits: vocabulary too large ({V})")
    t, k, p, mp, s, o = _params(B, temperature, top_k, top_p, min_p, seed, offset)
    tokens, tok_ptr = _empty((B,), np.int64, buf.torch)
    probs_ptr = 0
    probs = None
    if return_probs:
        probs, probs_ptr = _empty((B, V), np.float32, buf.torch)
    status = np.zeros(B, dtype=np.int32)
    if B:
        _k.sample(buf.ptr, buf.dtype_code, B, V, t.ctypes.data, k.ctypes.data, p.ctypes.data, mp.ctypes.data,
                  s.ctypes.data, o.ctypes.data, tok_ptr, probs_ptr, status.ctypes.data)
    _raise_nonfinite("logits", status)
    return (tokens, probs) if return_probs else tokens


def verify(
    target_logits,
    draft_tokens,
    draft_probs,
    num_draft,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=0,
    offset=0,
):
    """Speculative verification of K draft tokens per row against the target's logits.

    target_logits [B, K+1, V] (float32/bfloat16), draft_tokens int [B, K], draft_probs float32 [B, K, V] or
    None (one-hot drafts: greedy draft model, n-gram), num_draft int [B] in [0, K]. Each draft token is a sample
    of its row of draft_probs, so q(x) > 0; a token with q(x) = 0 could not have been drafted, and the rule's
    outcome for it is unspecified (the target's probabilities are floored near 1e-38, not zero).

    Returns ``(tokens int64[B, K+1], num_accepted int32[B])``: row b emits tokens[b, :num_accepted[b]+1]
    (the accepted drafts, then the correction or bonus token) and is padded with -1. The acceptance rule and
    the uniforms used are in the module docstring.
    """
    buf = _float_buf(target_logits, "target_logits", 3, allow_bf16=True)
    B, K1, V = buf.shape
    if K1 < 1:
        raise ValueError(f"target_logits must have K+1 >= 1 positions, got shape {buf.shape}")
    if V < 1:
        raise ValueError(f"target_logits must have a vocabulary of at least 1, got shape {buf.shape}")
    if V >= 1 << 31:
        raise ValueError(f"target_logits: vocabulary too large ({V})")
    K = K1 - 1
    dt = _int_array(draft_tokens, "draft_tokens", (B, K), np.int64)
    nd = _int_array(num_draft, "num_draft", (B,), np.int32)
    bad = (nd < 0) | (nd > K)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"num_draft[{row}] must be in [0, K={K}], got {nd[row]} (row {row})")
    if K:
        live = np.arange(K)[None, :] < nd[:, None]
        out_of_range = live & ((dt < 0) | (dt >= V))
        if out_of_range.any():
            row, pos = (int(v) for v in np.argwhere(out_of_range)[0])
            raise ValueError(
                f"draft_tokens[{row}, {pos}] must be a token id in [0, V={V}), got {dt[row, pos]} (row {row})"
            )
    qptr = 0
    qbuf = None
    if draft_probs is not None:
        qbuf = _float_buf(draft_probs, "draft_probs", 3, allow_bf16=False)
        if qbuf.shape != (B, K, V):
            raise ValueError(f"draft_probs must have shape (B, K, V) = {(B, K, V)}, got {qbuf.shape}")
        qptr = qbuf.ptr
    t, k, p, mp, s, o = _params(B, temperature, top_k, top_p, min_p, seed, offset)
    tokens, tok_ptr = _empty((B, K1), np.int64, buf.torch)
    nacc, nacc_ptr = _empty((B,), np.int32, buf.torch)
    status = np.zeros(B, dtype=np.int32)
    status_pos = np.zeros(B, dtype=np.int32)
    if B:
        _k.verify(buf.ptr, buf.dtype_code, B, K, V, dt.ctypes.data, qptr, nd.ctypes.data, t.ctypes.data,
                  k.ctypes.data, p.ctypes.data, mp.ctypes.data, s.ctypes.data, o.ctypes.data, tok_ptr, nacc_ptr,
                  status.ctypes.data, status_pos.ctypes.data)
    del qbuf  # kept alive until here on purpose
    _raise_nonfinite("target_logits", status, status_pos)
    return tokens, nacc


def logprobs(logits, tokens, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, top_n: int = 0):
    """Log-probabilities under the processed distribution that ``sample`` and ``verify`` draw from.

    logits [N, V] (float32/bfloat16), tokens int [N] in [0, V), per-row parameters as ``sample``, top_n in [0, V].
    Returns numpy ``(logprob float32[N], top_ids int64[N, top_n], top_logprobs float32[N, top_n])``: the logprob of
    tokens[r], and the top_n most likely tokens, most likely first (ties to the lower id). A greedy row
    (temperature 0) reports its distribution at temperature 1, its filters applied (its own is one-hot). Values are
    log p_i = s_i - max s - log Z in float64, the true value even below float32's exp range; a token a filter
    removes has -inf, and top lists hold only kept tokens, padded with -1 / -inf.
    """
    buf = _float_buf(logits, "logits", 2, allow_bf16=True)
    N, V = buf.shape
    if V < 1 or V >= 1 << 31:
        raise ValueError(f"logits must have a vocabulary in [1, 2^31), got shape {buf.shape}")
    if not 0 <= top_n <= V:
        raise ValueError(f"top_n must be in [0, V={V}], got {top_n}")
    tok = _int_array(tokens, "tokens", (N,), np.int64)
    if N and (tok.min() < 0 or tok.max() >= V):
        row = int(np.flatnonzero((tok < 0) | (tok >= V))[0])
        raise ValueError(f"tokens[{row}] must be a token id in [0, V={V}), got {tok[row]}")
    t, k, p, mp, _, _ = _params(N, temperature, top_k, top_p, min_p, 0, 0)
    lp = np.empty(N, dtype=np.float32)
    ids = np.empty((N, top_n), dtype=np.int64)
    top = np.empty((N, top_n), dtype=np.float32)
    status = np.zeros(N, dtype=np.int32)
    if N:
        _k.logprobs(buf.ptr, buf.dtype_code, N, V, tok.ctypes.data, t.ctypes.data, k.ctypes.data, p.ctypes.data,
                    mp.ctypes.data, int(top_n), lp.ctypes.data, ids.ctypes.data, top.ctypes.data,
                    status.ctypes.data)  # fmt: skip
    _raise_nonfinite("logits", status)
    return lp, ids, top


def uniforms(seed, offset, count: int, *, stream: int = STREAM_SAMPLE) -> np.ndarray:
    """The kernels' uniforms: float64 [B, count], entry [b, i] = uniform index i of ``stream`` for
    (seed[b], offset[b]). seed and offset are scalars (B = 1) or 1-D arrays of one length B."""
    scalar = isinstance(seed, numbers.Integral) and isinstance(offset, numbers.Integral)
    if scalar:
        B = 1
    else:
        B = len(seed) if not isinstance(seed, numbers.Integral) else len(offset)
    count = int(count)
    if count < 0 or count >= 1 << 32:
        raise ValueError(f"count must be in [0, 2^32), got {count}")
    if stream not in (STREAM_SAMPLE, STREAM_VERIFY) and not (isinstance(stream, int) and 0 <= stream < 1 << 32):
        raise ValueError(f"stream must be a 32-bit unsigned integer, got {stream!r}")
    s = _row_param(seed, "seed", B, "uint64")
    o = _row_param(offset, "offset", B, "uint64")
    out = np.empty((B, count), dtype=np.float64)
    if B and count:
        _k.uniforms(s.ctypes.data, o.ctypes.data, B, count, int(stream), out.ctypes.data)
    return out
