"""On a Tenstorrent device: the tt-metal program against the CPU kernels and the tile model.

Marked ``tt_device``: deselected by default and skipped, with the reason, where ttnn, a device or the
SFPI toolchain (needed by tt-metal's JIT to compile the kernels) is missing.  Run on a Wormhole card
with the command in docs/tenstorrent.md.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.tt_device


def _skip_reason() -> str | None:
    if importlib.util.find_spec("ttnn") is None:
        return "ttnn is not installed"
    from specdec.tt import runtime

    reason = runtime.why_unavailable()
    if reason:
        return reason
    if importlib.util.find_spec("specdec._kernels") is None:
        return "the CPU kernels (specdec._kernels) are not built in this interpreter: pip install -e ."
    return None


REASON = _skip_reason()
needs_device = pytest.mark.skipif(REASON is not None, reason=f"needs a Tenstorrent device and the SFPI toolchain: {REASON}")


@needs_device
@pytest.mark.parametrize("B,K,V,with_q", [(1, 0, 32000, False), (8, 4, 128256, True), (8, 4, 128256, False),
                                          (32, 8, 151936, True), (3, 2, 1000, True)])
def test_device_verify_matches_cpu_kernels(B, K, V, with_q):
    from specdec import kernels
    from specdec.tt import model, runtime
    from specdec.tt.hw_report import inputs

    rng = np.random.default_rng(B * 1000 + K)
    tl, draft, q, nd, prm = inputs(rng, B, K, V, with_q)
    dev_tok, dev_n = runtime.verify(tl, draft, q, nd, **prm)
    cpu_tok, cpu_n = kernels.verify(tl, draft, q, nd, **prm)
    U = kernels.uniforms(prm["seed"], prm["offset"], 2 * (K + 1), stream=kernels.STREAM_VERIFY)
    mod_tok, mod_n = model.verify(tl, draft, q, nd, temperature=prm["temperature"], top_k=prm["top_k"],
                                  top_p=prm["top_p"], min_p=prm["min_p"], u_accept=U[:, 0::2], u_sample=U[:, 1::2])
    # the model is exact given e; the device's exp may differ by a few ulp, so allow rare boundary cases
    dev_vs_model = ((dev_tok != mod_tok).any(1) | (dev_n != mod_n)).mean()
    dev_vs_cpu = ((dev_tok != np.asarray(cpu_tok)).any(1) | (dev_n != np.asarray(cpu_n))).mean()
    assert dev_vs_model <= 0.01 and dev_vs_cpu <= 0.01, (dev_vs_model, dev_vs_cpu)


@needs_device
def test_device_sample_matches_cpu_kernels():
    from specdec import kernels
    from specdec.tt import runtime

    rng = np.random.default_rng(3)
    lg = (rng.standard_normal((16, 128256)) * 3).astype(np.float32)
    prm = dict(temperature=0.7, top_k=0, top_p=0.95, min_p=0.0, seed=np.arange(16, dtype=np.uint64), offset=1)
    assert (runtime.sample(lg, **prm) == np.asarray(kernels.sample(lg, **prm))).mean() >= 0.99


@needs_device
def test_device_greedy_is_exact():
    from specdec import kernels
    from specdec.tt import runtime

    rng = np.random.default_rng(4)
    lg = (rng.standard_normal((32, 151936)) * 3).astype(np.float32)
    lg[:, 7] = lg.max(1)  # ties resolve to the lowest id
    prm = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0)
    np.testing.assert_array_equal(runtime.sample(lg, **prm), np.asarray(kernels.sample(lg, **prm)))
