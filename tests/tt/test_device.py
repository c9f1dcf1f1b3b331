"""On a Tenstorrent device: both paths (stock ttnn operations; the custom tt-metal program) against the CPU kernels,
and each against its numpy model (``specdec.tt.ops_numpy`` for the stock path, the tile model for the custom one).

Marked ``tt_device``: deselected by default and skipped, with the reason, where ttnn, a device or the
SFPI toolchain (needed by tt-metal's JIT to compile the kernels) is missing.  Run on a Wormhole card
with the command in docs/tenstorrent.md.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

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


PATHS = ["stock", "custom"]


@needs_device
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,K,V,with_q", [(1, 0, 32000, False), (8, 4, 128256, True), (8, 4, 128256, False),
                                          (32, 8, 151936, True), (3, 2, 1000, True)])
def test_device_verify_matches_cpu_kernels(B, K, V, with_q, path):
    from specdec import kernels
    from specdec.tt import model, runtime, stock
    from specdec.tt.hw_report import inputs
    from specdec.tt.ops_numpy import NumpyOps

    rng = np.random.default_rng(B * 1000 + K)
    tl, draft, q, nd, prm = inputs(rng, B, K, V, with_q)
    dev_tok, dev_n = runtime.verify(tl, draft, q, nd, path=path, **prm)
    cpu_tok, cpu_n = kernels.verify(tl, draft, q, nd, **prm)
    U = kernels.uniforms(prm["seed"], prm["offset"], 2 * (K + 1), stream=kernels.STREAM_VERIFY)
    filters = dict(temperature=prm["temperature"], top_k=prm["top_k"], top_p=prm["top_p"], min_p=prm["min_p"])
    if path == "stock":
        mod_tok, mod_n = stock.verify(NumpyOps(), tl, draft, q, nd, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **filters)
    else:
        mod_tok, mod_n = model.verify(tl, draft, q, nd, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **filters)
    # the models are exact given e; the device's exp and sums may differ by a few ulp, so allow rare boundary cases
    dev_vs_model = ((dev_tok != mod_tok).any(1) | (dev_n != mod_n)).mean()
    dev_vs_cpu = ((dev_tok != np.asarray(cpu_tok)).any(1) | (dev_n != np.asarray(cpu_n))).mean()
    assert dev_vs_model <= 0.01 and dev_vs_cpu <= 0.01, (dev_vs_model, dev_vs_cpu)


@needs_device
@pytest.mark.parametrize("path", PATHS)
def test_device_sample_matches_cpu_kernels(path):
    from specdec import kernels
    from specdec.tt import runtime

    rng = np.random.default_rng(3)
    lg = (rng.standard_normal((16, 128256)) * 3).astype(np.float32)
    prm = dict(temperature=0.7, top_k=0, top_p=0.95, min_p=0.0, seed=np.arange(16, dtype=np.uint64), offset=1)
    assert (runtime.sample(lg, path=path, **prm) == np.asarray(kernels.sample(lg, **prm))).mean() >= 0.99


@needs_device
@pytest.mark.parametrize("path", PATHS)
def test_device_greedy_is_exact(path):
    from specdec import kernels
    from specdec.tt import runtime

    rng = np.random.default_rng(4)
    lg = (rng.standard_normal((32, 151936)) * 3).astype(np.float32)
    lg[:, 7] = lg.max(1)  # ties resolve to the lowest id
    prm = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0)
    np.testing.assert_array_equal(runtime.sample(lg, path=path, **prm), np.asarray(kernels.sample(lg, **prm)))


@needs_device
@pytest.mark.parametrize("path", PATHS)
def test_server_serves_a_sampled_speculative_request(path, tmp_path):
    """Through gRPC, an engine on the tt backend: a seeded sampled request with draft-model speculation completes
    (the draft samples on the host, the device verifies), and a greedy one equals the CPU kernels' output."""
    import sys

    pytest.importorskip("torch", reason="the server test needs torch and transformers (scripts/tt_validate_hw.sh)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from server_fixtures import ServerThread, test_config
    from tiny import bpe_tokenizer, llama, save

    from specdec.client import Client
    from specdec.engine import Engine, EngineConfig
    from specdec.tt import TtBackend

    tok = bpe_tokenizer()
    target = save(llama(len(tok), seed=1), tok, tmp_path / "target")
    draft = save(llama(len(tok), seed=2, hidden=32, layers=1), tok, tmp_path / "draft")

    def serve(kernels):
        engine = Engine.load(target, draft, dtype="float32", draft_dtype="float32", config=EngineConfig(),
                             kernels=kernels)  # fmt: skip
        return ServerThread(test_config(), engine=engine)

    outputs = {}
    for name, kernels in (("tt", TtBackend(path)), ("cpu", None)):
        srv = serve(kernels)
        try:
            client = Client(srv.address, timeout=120)
            sampled = client.generate("1 2 3", max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3, method="draft")
            greedy = client.generate("1 2 3", max_new_tokens=16, temperature=0.0, method="draft")
            outputs[name] = (list(sampled.token_ids), list(greedy.token_ids))
        finally:
            srv.close()
    assert len(outputs["tt"][0]) == 16
    assert outputs["tt"][1] == outputs["cpu"][1]
