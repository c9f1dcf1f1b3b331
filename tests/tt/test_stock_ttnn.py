"""The stock path's ttnn binding (``specdec.tt.ops_ttnn``) without a device.

* Against a stand-in ttnn module whose functions do what ttnn documents (numpy underneath) and refuse any function
  or keyword the binding's ``CALLS`` table does not list: the whole algorithm through ``TtnnOps`` gives the numpy
  model's results, so the binding's plumbing (argument order, the tuples that sort/topk return, index casts) is right.
* Against the installed ttnn 0.81.1 (the tt job): every function in ``CALLS`` exists and documents each keyword
  the binding passes.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from specdec.tt import stock
from specdec.tt.ops_numpy import NumpyOps
from specdec.tt.ops_ttnn import CALLS, TtnnOps


class _Result(np.ndarray):
    def float(self):
        return self

    def numpy(self):
        return np.asarray(self)


def _fake_ttnn(used: set[str]):
    """A ttnn stand-in: each function in CALLS, with ttnn's documented semantics, checking its keywords."""
    ref = NumpyOps(1, 1)
    impl = {
        "from_torch": lambda t, **kw: np.asarray(t, np.float32),
        "to_torch": lambda t: np.asarray(t).view(_Result),
        "add": ref.add, "multiply": ref.mul, "subtract": ref.sub, "maximum": ref.maximum, "minimum": ref.minimum,
        "exp": lambda a, **kw: ref.exp(a), "relu": ref.relu, "ge": ref.ge, "lt": ref.lt, "le": ref.le, "eq": ref.eq,
        "ne": ref.ne, "where": ref.where,
        "max": lambda a, **kw: ref.row_max(a), "min": lambda a, **kw: ref.row_min(a),
        "sum": lambda a, **kw: ref.row_sum(a),
        "sort": lambda a, **kw: (ref.sort_desc(a), None),
        "topk": lambda a, **kw: (ref.topk(a, kw["k"]), None),
        "cumsum": lambda a, **kw: ref.cumsum(a),
        "gather": lambda a, **kw: ref.gather(a, kw["index"]),
        "typecast": lambda a, dtype: np.asarray(a).astype(np.uint32),
    }  # fmt: skip
    assert set(impl) == set(CALLS)

    def checked(name):
        def call(*args, **kw):
            extra = set(kw) - set(CALLS[name])
            assert not extra, f"ttnn.{name} called with {extra}, not in ops_ttnn.CALLS"
            if name in ("max", "min", "sum", "sort", "cumsum", "gather", "topk"):
                assert kw.get("dim") == -1
            used.add(name)
            return impl[name](*args, **kw)

        return call

    fake = SimpleNamespace(**{name: checked(name) for name in CALLS})
    fake.WormholeComputeKernelConfig = lambda **kw: kw
    fake.MathFidelity = SimpleNamespace(HiFi4="HiFi4")
    fake.float32, fake.uint32, fake.TILE_LAYOUT, fake.DRAM_MEMORY_CONFIG = "float32", "uint32", "TILE", "DRAM"
    return fake


def test_the_binding_runs_the_algorithm_as_the_numpy_model():
    kernels = pytest.importorskip("specdec.kernels", reason="the C++ kernels (specdec._kernels) are not built")
    rng = np.random.default_rng(8)
    used: set[str] = set()
    ops = TtnnOps(device=None, ttnn=_fake_ttnn(used), torch=SimpleNamespace(from_numpy=lambda a: a))
    for top_k, top_p, dense in [(0, 1.0, True), (20, 1.0, False), (0, 0.8, True), (100, 0.9, False)]:
        B, K, V = 6, 3, 300
        tl = (rng.standard_normal((B, K + 1, V)) * 2).astype(np.float32)
        q = None
        if dense:
            _, q = kernels.sample(tl[:, :K].reshape(B * K, V), temperature=1.5, seed=1, offset=0, return_probs=True)
            q = np.asarray(q, np.float32).reshape(B, K, V)
        draft = rng.integers(0, V, (B, K)).astype(np.int64)
        prm = dict(temperature=np.where(np.arange(B) == 0, 0.0, 0.9), top_k=top_k, top_p=top_p,
                   min_p=np.where(np.arange(B) == 1, 0.05, 0.0))  # fmt: skip
        U = rng.random((B, 2 * (K + 1)))
        nd = np.full(B, K, np.int32)
        via_ttnn = stock.verify(ops, tl, draft, q, nd, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **prm)
        via_model = stock.verify(NumpyOps(), tl, draft, q, nd, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **prm)
        np.testing.assert_array_equal(via_ttnn[0], via_model[0])
        np.testing.assert_array_equal(via_ttnn[1], via_model[1])
    assert used == set(CALLS)  # the table lists exactly what the binding calls


def _ttnn():
    from conftest_tt import use_mock_cluster

    use_mock_cluster()
    return pytest.importorskip("ttnn", reason="ttnn is not installed (the tt job installs ttnn==0.81.1 in Python 3.12)")


def test_every_ttnn_call_exists_and_documents_its_keywords():
    ttnn = _ttnn()
    missing = []
    for name, keywords in CALLS.items():
        fn = getattr(ttnn, name, None)
        if fn is None:
            missing.append(f"ttnn.{name} does not exist")
            continue
        doc = fn.__doc__ or ""
        for kw in keywords:
            if not re.search(rf"\b{kw}\b", doc):
                missing.append(f"ttnn.{name} does not document {kw!r}")
    assert not missing, missing
    for attr in ("WormholeComputeKernelConfig", "MathFidelity", "float32", "uint32", "TILE_LAYOUT", "DRAM_MEMORY_CONFIG"):
        assert hasattr(ttnn, attr), attr
    assert hasattr(ttnn.MathFidelity, "HiFi4")
    cfg_doc = ttnn.WormholeComputeKernelConfig.__init__.__doc__ or ""
    for kw in ("math_fidelity", "math_approx_mode", "fp32_dest_acc_en"):
        assert kw in cfg_doc, kw


def test_the_check_catches_a_misspelt_keyword():
    """Control: a keyword no ttnn function documents is reported."""
    ttnn = _ttnn()
    assert not re.search(r"\bdescending_order\b", ttnn.sort.__doc__ or "")
    assert re.search(r"\bdescending\b", ttnn.sort.__doc__ or "")
