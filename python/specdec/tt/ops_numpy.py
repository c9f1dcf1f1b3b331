"""``NumpyOps``: a numpy model of the ttnn operations ``specdec.tt.stock`` uses, for the tests and the cost script.

Each operation is the float32 one it stands for: elementwise arithmetic and comparisons in float32 (round to
nearest even), exp as numpy's float32 exp, reductions and cumulative sums as the correctly rounded float32 of the
exact sum (the device's tile reductions and Kahan-compensated ``cumsum`` come within rounding of it), sorts and
top-k by value. What the model cannot promise about the device (its exp's last bits, its summation order) moves a
result only where a value falls within rounding of a boundary; the device tests and the hardware report measure
that share.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def _f(a) -> np.ndarray | np.float32:
    return F32(a) if np.isscalar(a) else np.asarray(a, F32)


class NumpyOps:
    """The ``specdec.tt.stock.Ops`` interface on numpy arrays (float32 [R, N] and [R, 1] columns)."""

    def __init__(self, row_multiple: int = 32, col_multiple: int = 32) -> None:
        self.row_multiple = row_multiple
        self.col_multiple = col_multiple

    def put(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, dtype=F32)

    def get(self, t: np.ndarray) -> np.ndarray:
        return np.asarray(t)

    def iota(self, rows: int, n: int) -> np.ndarray:
        return np.broadcast_to(np.arange(n, dtype=F32), (rows, n))

    def add(self, a, b):
        return _f(a) + _f(b)

    def mul(self, a, b):
        return _f(a) * _f(b)

    def sub(self, a, b):
        return _f(a) - _f(b)

    def maximum(self, a, b):
        return np.maximum(_f(a), _f(b))

    def minimum(self, a, b):
        return np.minimum(_f(a), _f(b))

    def exp(self, a):
        with np.errstate(under="ignore"):
            return np.exp(_f(a))

    def relu(self, a):
        return np.maximum(_f(a), F32(0))

    def ge(self, a, b):
        return (_f(a) >= _f(b)).astype(F32)

    def lt(self, a, b):
        return (_f(a) < _f(b)).astype(F32)

    def le(self, a, b):
        return (_f(a) <= _f(b)).astype(F32)

    def eq(self, a, b):
        return (_f(a) == _f(b)).astype(F32)

    def ne(self, a, b):
        return (_f(a) != _f(b)).astype(F32)

    def where(self, c, a, b: float):
        return np.where(_f(c) != 0, _f(a), F32(b)).astype(F32)

    def row_max(self, a):
        return _f(a).max(axis=1, keepdims=True)

    def row_min(self, a):
        return _f(a).min(axis=1, keepdims=True)

    def row_sum(self, a):
        return _f(a).astype(np.float64).sum(axis=1, keepdims=True).astype(F32)

    def sort_desc(self, a):
        return -np.sort(-_f(a), axis=1)

    def topk(self, a, k: int):
        return self.sort_desc(a)[:, :k]

    def cumsum(self, a):
        return np.cumsum(_f(a).astype(np.float64), axis=1).astype(F32)

    def gather(self, a, idx):
        a = _f(a)
        i = np.asarray(idx).reshape(-1).astype(np.int64)
        return a[np.arange(a.shape[0]), i][:, None]
