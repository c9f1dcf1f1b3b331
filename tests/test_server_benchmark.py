"""The Benchmark RPC: progress messages, then a report whose numbers agree with its own JSON."""

from __future__ import annotations

import json

import grpc
import pytest
from server_fixtures import server  # noqa: F401 - fixture

from specdec.v1 import specdec_pb2 as pb

PROMPTS = ["def add(a, b):", "Café crème", "漢字とかな"]


def test_benchmark_streams_progress_then_a_consistent_report(server):
    req = pb.BenchmarkRequest(prompts=PROMPTS, max_new_tokens=6, warmup=1, no_chat_template=True)
    msgs = list(server.stub().Benchmark(req, timeout=120))
    progress = [m.progress for m in msgs if m.HasField("progress")]
    assert msgs[-1].HasField("report") and all(m.HasField("progress") for m in msgs[:-1])
    total = len(PROMPTS) * 2  # baseline and speculative per prompt
    assert progress[-1].done == total and all(p.total == total for p in progress)
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert {p.phase for p in progress} >= {"warmup", "measure"}

    r = msgs[-1].report
    report = json.loads(r.json)
    base, spec = report["baseline"]["decode_tokens_per_s"], report["speculative"]["decode_tokens_per_s"]
    assert r.baseline_decode_tokens_per_s == pytest.approx(base)
    assert r.speculative_decode_tokens_per_s == pytest.approx(spec)
    assert r.speedup == pytest.approx(spec / base)
    assert r.acceptance_rate == pytest.approx(report["speculative"]["acceptance_rate"])
    assert r.identical_outputs is True and report["identical_outputs"] is True  # greedy: exact
    assert len(report["per_prompt"]) == len(PROMPTS) - 1
    assert report["config"]["max_new_tokens"] == 6
    assert r.markdown.startswith("# specdec benchmark")
    assert not r.HasField("speedup_vs_hf")
    # the engine is free again and serves requests
    g = server.stub().Generate(pb.GenerateRequest(text="x", max_new_tokens=2), timeout=30)
    assert g.summary.usage.completion_tokens == 2


@pytest.mark.parametrize(
    "req,expected",
    [
        (pb.BenchmarkRequest(prompts=["a"], max_new_tokens=1), "max_new_tokens must be >= 2"),
        (pb.BenchmarkRequest(prompts=["a"], method=pb.METHOD_NONE), "'none' is the baseline"),
        (pb.BenchmarkRequest(prompts=["a", ""]), "prompts[1] must not be empty"),
        (pb.BenchmarkRequest(prompts=["a"], gamma=2, gamma_max=3), "gamma (fixed γ) and gamma_max (adaptive γ) are exclusive"),
        (pb.BenchmarkRequest(prompts=["a", "b"], warmup=2), "warmup must be in [0, 2)"),
        (pb.BenchmarkRequest(prompts=["a"], sampling=pb.SamplingOptions(top_p=2.0)), "sampling.top_p must be in (0, 1]"),
    ],
)
def test_benchmark_bad_options_are_invalid_argument(server, req, expected):
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub().Benchmark(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in e.value.details()
