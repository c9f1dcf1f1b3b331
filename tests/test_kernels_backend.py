"""Kernel backends by name: tt needs ttnn and a device, and says so when they are missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from specdec import tt
from specdec.backends import open_backend


def test_tt_backend_fails_clearly_without_a_device():
    reason = tt.why_unavailable()
    if reason is None:
        pytest.skip("a Tenstorrent device is present")
    with pytest.raises(RuntimeError, match="--kernels tt is unavailable") as err:
        open_backend("tt")
    assert reason in str(err.value)
    cpu = open_backend("cpu")  # a failed tt backend leaves the CPU kernels usable
    assert cpu.name == "cpu"
    tokens = cpu.sample(np.array([[0.0, 3.0, 1.0]], dtype=np.float32), temperature=0.0)
    assert tokens.tolist() == [1]


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="kernels backend must be one of cpu, tt, tt-custom; got 'gpu'"):
        open_backend("gpu")


@pytest.mark.parametrize("name", ["tt", "tt-custom"])
def test_serve_with_tt_kernels_exits_with_the_reason(tmp_path, name):
    import subprocess
    import sys

    if tt.why_unavailable() is None:
        pytest.skip("a Tenstorrent device is present")
    proc = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "serve", "--kernels", name, "--target", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"--kernels {name} is unavailable: {tt.why_unavailable()}" in proc.stderr


@pytest.fixture
def tile_model_device(monkeypatch):
    """No device exists here. The custom path's one call that runs the program on the card, ``runtime.run_rows``, runs
    its numpy tile model instead (``specdec.tt.model``, which tests/tt hold to the device kernels' integer code); the
    stock path's operations are their numpy model (``specdec.tt.ops_numpy``). Everything on the host side of
    ``runtime.verify`` / ``sample`` is the real path."""
    from specdec.tt import model, runtime
    from specdec.tt.ops_numpy import NumpyOps

    def tile_model_rows(logits_rows, q_rows, prm, B, K1, *, logits_dtype, device=None):
        rows = model.forward_rows(logits_rows, q_rows, prm, n_workers=8)
        drafts = prm.draft.reshape(B, K1)[:, : K1 - 1]
        num_draft = (prm.mode.reshape(B, K1) == model.MODE_RESIDUAL).sum(1)
        tokens, accepted = model.assemble(B, K1 - 1, num_draft, np.maximum(drafts, 0), rows)
        out = np.zeros((B, K1 + 1), np.uint32)
        out[:, :K1] = np.where(tokens < 0, 0xFFFFFFFF, tokens)
        out[:, K1] = accepted
        return out

    monkeypatch.setattr(runtime, "why_unavailable", lambda: None)
    monkeypatch.setattr(runtime, "_require", lambda: None)
    monkeypatch.setattr(runtime, "run_rows", tile_model_rows)
    monkeypatch.setattr(runtime, "device_ops", lambda device=None: NumpyOps())


@pytest.mark.parametrize("path", ["stock", "custom"])
def test_sampled_speculation_with_the_tt_backend(tiny_dirs, tile_model_device, path):
    """``--kernels tt`` failed every sampled speculative request: the drafter asked the device backend for the draft's
    probabilities q, which the device does not return. The draft now samples on the host, where its logits are.
    Greedy output equals the CPU kernels' on both paths; a seeded sampled request completes."""
    from specdec.engine import Engine, EngineConfig
    from specdec.models.loading import load_model
    from specdec.tt import TtBackend
    from specdec.types import GenerationRequest, Method, SamplingParams, SpeculationParams

    backend = TtBackend(path)
    assert backend.name == {"stock": "tt", "custom": "tt-custom"}[path]
    with pytest.raises(ValueError, match="return_probs is not supported"):  # why the draft must not sample on it
        backend.sample(np.zeros((1, 4), np.float32), temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
                       return_probs=True)  # fmt: skip
    target, draft = load_model(tiny_dirs["target"]), load_model(tiny_dirs["draft_other"])
    on_tt = Engine(target, draft, EngineConfig(method=Method.DRAFT, gamma=3, prefix_cache_bytes=0), kernels=backend)
    on_cpu = Engine(target, draft, EngineConfig(method=Method.DRAFT, gamma=3, prefix_cache_bytes=0))

    def run(engine, sampling):
        req = GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=12, sampling=sampling,
                                speculation=SpeculationParams(method=Method.DRAFT, gamma=3))  # fmt: skip
        return [t for out in engine.generate(req) for t in out.token_ids]

    assert run(on_tt, SamplingParams()) == run(on_cpu, SamplingParams())
    sampled = run(on_tt, SamplingParams(temperature=0.8, top_p=0.9, seed=4))
    assert len(sampled) == 12 and all(0 <= t < target.vocab_size for t in sampled)
    if path == "stock":  # the same uniforms, and no boundary within fp32 rounding on this seed: the same tokens
        assert sampled == run(on_cpu, SamplingParams(temperature=0.8, top_p=0.9, seed=4))


def test_tt_cost_model_counts_the_kernels_loops():
    """bench/tt_cost_model.py: per real row, 21 passes over a 64-tile slice for a filtered verify with drafts (20
    without drafts), 5 without filters (no search); 20 or 4 sync rounds per tile-row; padding rows cost nothing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "tt_cost_model.py"
    spec = importlib.util.spec_from_file_location("tt_cost_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    one = mod.estimate(1, 4, 128256, (8, 8), 10.0)
    assert (one["workers"], one["slice_tiles"], one["padding_rows"], one["sync_rounds"]) == (63, 64, 27, 20)
    assert one["worker_element_visits"] == 5 * 21 * 64 * 32
    assert mod.estimate(8, 4, 128256, (8, 8), 10.0)["worker_element_visits"] == 8 * one["worker_element_visits"]
    assert mod.estimate(32, 0, 128256, (8, 8), 10.0)["worker_element_visits"] == 32 * 20 * 64 * 32
    plain = mod.estimate(1, 4, 128256, (8, 8), 10.0, filtered=False)
    assert plain["sync_rounds"] == 4 and plain["worker_element_visits"] == 5 * 5 * 64 * 32
    # the stock path, counted by running it: greedy is max, eq, where(iota), min; sampling sorts only for top-p
    greedy = mod.stock_operations(1, 4, 2048, "greedy")
    assert greedy["full_width_by_op"] == {"eq": 1, "row_max": 1, "row_min": 1, "where": 1}
    sampled = mod.stock_operations(1, 4, 2048, "sampled")
    assert "sort_desc" not in sampled["full_width_by_op"] and sampled["full_width_by_op"]["cumsum"] == 1
    top_p = mod.stock_operations(1, 4, 2048, "sampled, top-p 0.9")
    assert top_p["full_width_by_op"]["sort_desc"] == 1 and top_p["full_width_by_op"]["cumsum"] == 2
    assert top_p["bytes_down"] == 3 * 32 * 4  # w_x, Z and the token, one float a row of the padded tile-row


def test_hardware_report_on_the_tile_model(tile_model_device, tmp_path):
    """specdec.tt.hw_report, as scripts/tt_validate_hw.sh runs it, with the tile model for the card and small shapes:
    every section is filled, the emulated device agrees with the CPU kernels, and its samples pass the χ²."""
    from specdec.tt import hw_report

    report = hw_report.build_report(agreement_cases=[(3, 2, 1000, True), (4, 0, 500, False)], timing_shapes=[(2, 2, 300)],
                                    chi2_draws=2000, repeats=2)  # fmt: skip
    assert report["versions"]["python"] and "error" in report["versions"]["device"]  # no card to open here
    assert set(report["paths"]) == {"stock", "custom"}
    for section in report["paths"].values():
        assert all(a["rows_differing"] == 0 and a["greedy_rows_differing"] == 0 for a in section["agreement"])
        assert section["chi_square"]["outside_support"] == 0 and section["chi_square"]["p_value"] > 1e-3
        assert section["timings"][0]["device_s"] > 0 and section["timings"][0]["cpu_kernels_s"] > 0
    json.dumps(report)  # pasteable


def test_hardware_report_records_a_failing_path(tile_model_device, monkeypatch):
    """A path that raises (a kernel that does not compile, say) is an error in its own section; the other still runs."""
    from specdec.tt import hw_report, runtime

    def broken(*args, **kwargs):
        raise RuntimeError("JIT build failed")

    monkeypatch.setattr(runtime, "run_rows", broken)
    report = hw_report.build_report(agreement_cases=[(2, 1, 300, True)], timing_shapes=[(1, 1, 300)], chi2_draws=500,
                                    repeats=1)  # fmt: skip
    assert report["paths"]["custom"] == {"error": "RuntimeError: JIT build failed"}
    assert report["paths"]["stock"]["agreement"][0]["rows_differing"] == 0


def test_hardware_report_chi_square_rejects_a_wrong_sampler(monkeypatch):
    """The report's χ² control: a device that sampled at temperature 1.0 instead of the row's 0.8 is rejected."""
    from specdec import kernels
    from specdec.tt import hw_report, runtime

    def hot(logits, path, **prm):
        return np.asarray(kernels.sample(logits, **{**prm, "temperature": 1.0}))

    monkeypatch.setattr(runtime, "sample", hot)
    result = hw_report.chi_square(4000)
    assert result["p_value"] < 1e-3
