"""Reliability: load, faults and fuzz against a real grpc.aio server on 127.0.0.1 with the tiny models.

Each test is bounded in count and time. The default suite runs short versions; the ``slow`` marker runs the
long ones (60 s of load, 2,000+ fuzz cases; ``SPECDEC_FUZZ_CASES`` overrides the count). After every test the
scheduler is back to nothing queued, running or unfinished and no sequence holds a KV cache
(``Scheduler.snapshot``). The same functions drive ``specdec loadtest`` (``specdec.loadtest``).

Oversized messages: ``test_limits.py::test_max_message_bytes`` and
``test_server.py::test_oversized_message_is_resource_exhausted_and_server_continues`` check RESOURCE_EXHAUSTED
and that the server continues; the fuzz below sends oversized prompts too.
"""

from __future__ import annotations

import json
import os

import pytest
from server_fixtures import ControlledEngine, ServerThread, load_engine, test_config, wait_until

from specdec import loadtest
from specdec.types import Method

MAX_MESSAGE_BYTES = 64 << 10
METHODS = ("none", "ngram", "draft")


@pytest.fixture(scope="module")
def srv(tiny_dirs):
    s = ServerThread(test_config(max_message_bytes=MAX_MESSAGE_BYTES), engine=load_engine(tiny_dirs))
    assert s.wait_ready()
    yield s
    s.close()


@pytest.fixture(scope="module")
def ref(srv) -> loadtest.Reference:
    return loadtest.reference(srv.address, max_new_tokens=16, long_tokens=96)


@pytest.fixture(scope="module")
def slow_srv(tiny_dirs):
    """Steps of >= 10 ms: a fault request (96 tokens) surely is mid-generation when its cancel or deadline lands,
    so the server's counts must match the client's exactly."""
    s = ServerThread(test_config(), engine=ControlledEngine(load_engine(tiny_dirs), delay=0.01))
    assert s.wait_ready()
    yield s
    s.close()


@pytest.fixture(scope="module")
def slow_ref(slow_srv) -> loadtest.Reference:
    return loadtest.reference(slow_srv.address, max_new_tokens=8, long_tokens=96)


def assert_clean(srv) -> None:
    """Nothing queued, running or unfinished, no KV cache held (a cancel is applied before the next step)."""
    assert wait_until(lambda: not any(srv.scheduler.snapshot().values()), 15), srv.scheduler.snapshot()


def served(srv, reason: str) -> float:
    return srv.server.metrics.registry.get_sample_value("specdec_requests_total", {"finish_reason": reason}) or 0.0


@pytest.mark.parametrize("clients,seconds", [(6, 6.0), pytest.param(8, 60.0, marks=pytest.mark.slow)])
def test_load_zero_errors_outputs_match_reference_rss_bounded(srv, ref, clients, seconds):
    warm = loadtest.run_load(srv.address, ref, clients=clients, duration_s=2.0, methods=METHODS, faults=False, seed=1)
    rss_start = loadtest.rss_bytes()
    load = loadtest.run_load(srv.address, ref, clients=clients, duration_s=seconds, methods=METHODS, faults=False)
    rss_end = loadtest.rss_bytes()
    for stats in (warm, load):
        assert stats.errors == [] and stats.mismatches == []
        assert stats.served == stats.requests
    assert load.served >= 5 * clients  # the clients really ran concurrently, many requests each
    assert srv.scheduler.steps > 0
    assert rss_end < 1.10 * rss_start, (rss_start, rss_end)
    assert_clean(srv)


@pytest.mark.parametrize("clients,seconds", [(6, 5.0), pytest.param(8, 60.0, marks=pytest.mark.slow)])
def test_faults_cancel_deadline_disconnect_leave_nothing_behind(slow_srv, slow_ref, clients, seconds):
    before = served(slow_srv, "cancelled") + served(slow_srv, "deadline")
    stats = loadtest.run_load(slow_srv.address, slow_ref, clients=clients, duration_s=seconds, methods=METHODS, seed=7)
    assert stats.errors == [] and stats.mismatches == []
    assert stats.cancels >= 1 and stats.deadlines_mid_generation >= 1 and stats.disconnects >= 1, stats
    assert_clean(slow_srv)
    # The server ended each of them early (as cancelled or, when its own clock saw the deadline first, as deadline).
    after = served(slow_srv, "cancelled") + served(slow_srv, "deadline")
    assert after - before == stats.cancels + stats.deadlines + stats.disconnects, stats
    # and it still answers correctly
    r = slow_srv.stub().Generate(loadtest.greedy_request(loadtest.PROMPTS[0], 8), timeout=30)
    assert list(r.token_ids) == slow_ref.outputs[loadtest.PROMPTS[0]]


def test_killed_client_processes_free_their_requests(slow_srv, slow_ref):
    before = served(slow_srv, "cancelled")
    stats = loadtest.kill_clients(slow_srv.address, slow_ref, 2)
    assert stats.errors == [] and stats.killed_clients == 2
    assert_clean(slow_srv)
    assert served(slow_srv, "cancelled") == before + 2


def test_sigterm_under_load_finishes_or_unavailable_and_exits_zero(tiny_dirs, tmp_path):
    server = loadtest.spawn_server(tiny_dirs["target"], tiny_dirs["draft_other"], ["--grace", "0.5"], tmp_path, 120)
    try:
        # half the streams ask for 4 tokens, half for 400 (~1 s here): some are surely in flight at the signal
        lengths = loadtest.Reference(outputs={}, max_new_tokens=4, long_tokens=400, long_s=0.0)
        term = loadtest.sigterm_under_load(server, lengths, 6, timeout_s=60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    assert term["hung"] == 0 and term["exit_code"] == 0, (term, server.log_path.read_text()[-2000:])
    assert term["in_flight_at_signal"] >= 1, term
    assert set(term["outcomes"]) <= {"finished", "UNAVAILABLE"}, term
    assert term["exit_s"] < 30


FUZZ_CASES = int(os.environ.get("SPECDEC_FUZZ_CASES", "0"))


@pytest.mark.parametrize("cases", [FUZZ_CASES or 200, pytest.param(max(FUZZ_CASES, 2000), marks=pytest.mark.slow)])
def test_fuzzed_requests_get_ok_or_a_client_error_and_the_server_stays_healthy(srv, ref, cases):
    stats = loadtest.run_fuzz(srv.address, cases, vocab_size=320, context_length=512, max_message_bytes=MAX_MESSAGE_BYTES,
                              seed=cases)  # fmt: skip
    print(f"fuzz: {stats.cases} cases, outcomes {dict(stats.outcomes)}")
    assert stats.bad == []
    assert stats.cases == cases and sum(stats.outcomes.values()) == cases
    # Every kind of answer the strategy aims at occurred (the fuzz reached generation, validation and the size limit).
    assert {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= set(stats.outcomes), stats.outcomes
    assert loadtest.health(srv.address) == "SERVING"
    assert_clean(srv)
    r = srv.stub().Generate(loadtest.greedy_request(loadtest.PROMPTS[1], 16), timeout=30)
    assert list(r.token_ids) == ref.outputs[loadtest.PROMPTS[1]]


def test_fuzz_counts_a_disallowed_status_as_bad(tiny_dirs):
    """The fuzz check itself: a server whose engine fails every step answers INTERNAL, and that is caught."""

    class Broken:
        def __init__(self, engine):
            self._engine = engine

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def step_batch(self, seqs):
            raise RuntimeError("injected")

    s = ServerThread(test_config(metrics_port=None), engine=Broken(load_engine(tiny_dirs, draft=None, method=Method.NONE)))
    try:
        stats = loadtest.run_fuzz(s.address, 40, vocab_size=320, context_length=512, max_message_bytes=4 << 20)
        assert stats.outcomes["INTERNAL"] > 0 and len(stats.bad) == stats.outcomes["INTERNAL"]
        assert all("INTERNAL" in b for b in stats.bad)
    finally:
        s.close()


def test_loadtest_command_with_the_tiny_models(tiny_dirs, tmp_path):
    """``specdec loadtest``, short: it serves, loads, faults, fuzzes, stops the server and reports true counts.
    Every prompt starts with the same 157 tokens, so the load runs through the prefix cache and its outputs are
    still checked against each prompt's reference."""
    from specdec.cli import main

    out = tmp_path / "summary.json"
    prefix = tmp_path / "prefix.txt"
    prefix.write_text("rule: be brief. " * 12)
    code = main(["loadtest", "--target", tiny_dirs["target"], "--draft", tiny_dirs["draft_other"],
                 "--serve-arg=--draft-dtype=float32", "--duration", "3", "--warmup", "1", "--clients", "4",
                 "--killed-clients", "1", "--fuzz-cases", "40", "--prompt-prefix-file", str(prefix),
                 "--json", str(out)])  # fmt: skip
    s = json.loads(out.read_text())
    assert code == 0 and s["ok"] is True, s
    ld = s["load"]
    assert ld["errors"] == 0 and ld["mismatches"] == 0 and ld["served"] > 0 and ld["killed_clients"] == 1
    # Faults reached the server (exact counts: test_faults_...; here a fast server may finish a request first).
    assert s["server_counts"]['requests_total{finish_reason="cancelled"}'] >= 1
    assert s["fuzz"]["cases"] == 40 and sum(s["fuzz"]["outcomes"].values()) == 40 and s["fuzz"]["bad"] == 0
    assert s["rss_bytes"]["after_warmup"] > 0 and s["rss_bytes"]["end"] > 0
    assert s["sigterm"]["exit_code"] == 0 and s["sigterm"]["hung"] == 0
    assert s["prefix_cache"]["hit_tokens_total"] >= 128 and s["prefix_cache"]["bytes"] > 0
