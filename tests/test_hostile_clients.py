"""Clients that try to stall everyone: SIGTERM during a Benchmark, a Benchmark past the limits or cancelled midway,
a prompt too large to tokenize, γ beyond the server's bound, streams nobody reads, and a stop string that completes
only in the final flush. Each test has a control that shows it would notice the failure it guards against."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fixtures import ControlledEngine, ServerThread, load_engine, test_config, wait_until
from test_server_lifecycle import _spawn
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from specdec.engine.scheduler import Handle
from specdec.loadtest.hostile import SMALL_WINDOW
from specdec.serving.wire import Limits, parse_request
from specdec.types import FinishReason, GenerationRequest, Method
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc



def gen(n: int = 8, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="def add(a, b):", max_new_tokens=n, ignore_eos=True, **kw)


def bench_request(prompts: int = 20, tokens: int = 64, **kw) -> pb.BenchmarkRequest:
    return pb.BenchmarkRequest(prompts=["def add(a, b):"] * prompts, max_new_tokens=tokens, warmup=0,
                               no_chat_template=True, **kw)  # fmt: skip


# ---- shutdown ----------------------------------------------------------------------------------


def _start_benchmark(address: str):
    """A long Benchmark, running (its first progress message arrived), and a Generate queued behind it."""
    ch = grpc.insecure_channel(address)
    stub = pb_grpc.SpecDecodeStub(ch)
    call = stub.Benchmark(bench_request(), timeout=300)
    it = iter(call)
    first = next(it)
    assert first.HasField("progress") and first.progress.done < first.progress.total  # running, far from done
    queued = stub.Generate.future(gen(4), timeout=300)
    time.sleep(0.3)
    assert not queued.done()  # held behind the benchmark
    return ch, it, queued


def test_sigterm_during_a_benchmark_exits_zero_within_grace_plus_a_step(tiny_dirs, tmp_path):
    proc, address = _spawn(tiny_dirs, tmp_path, "--grace", "2")
    try:
        ch, it, queued = _start_benchmark(address)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        with pytest.raises(grpc.RpcError) as e:
            list(it)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            queued.result()
        ch.close()
        assert proc.returncode == 0, err[-3000:]
        assert "terminate called" not in err
        assert elapsed < 2 + 5, f"exit took {elapsed:.1f} s"  # the grace, one step, the stop and the exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_second_signal_exits_at_once_and_not_by_abort(tiny_dirs, tmp_path):
    proc, address = _spawn(tiny_dirs, tmp_path, "--grace", "60")
    try:
        ch, it, queued = _start_benchmark(address)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # the control: the first signal alone waits for the grace
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 1.0
        assert proc.returncode == 1, err[-3000:]  # not -6 (SIGABRT)
        assert "terminate called" not in err
        ch.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---- the Benchmark RPC as a limited citizen ---------------------------------------------------------


@pytest.fixture
def slow_limited(tiny_dirs):
    """Steps of >= 20 ms, max_new_tokens <= 16, prompts <= 50 tokens, benchmarks cut off after 3 s."""
    engine = ControlledEngine(load_engine(tiny_dirs), delay=0.02)
    s = ServerThread(test_config(limits=Limits(max_new_tokens=16, max_prompt_tokens=50), max_benchmark_s=3.0),
                     engine=engine)  # fmt: skip
    yield s
    s.close()


def test_benchmark_is_refused_over_the_request_limits(slow_limited):
    stub = slow_limited.stub()
    cases = [
        (bench_request(1, 200), "max_new_tokens must be <= 16 (limit max_new_tokens), got 200"),
        (pb.BenchmarkRequest(prompts=["def add(a, b): " * 60], max_new_tokens=8, warmup=0, no_chat_template=True),
         "prompts[0] must be at most 50 tokens (limit max_prompt_tokens)"),
        (bench_request(1, 8, gamma=9), "gamma must be <= 8 on this server (limit max_gamma), got 9"),
    ]
    for req, expected in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Benchmark(req, timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in e.value.details()
    # The control: within the limits the same server runs it.
    msgs = list(stub.Benchmark(bench_request(1, 8, gamma=8), timeout=60))
    assert msgs[-1].HasField("report")


def test_benchmark_is_cut_off_at_max_benchmark_seconds_and_the_engine_is_free(slow_limited):
    stub = slow_limited.stub()
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Benchmark(bench_request(40, 16), timeout=120))  # 40 x 2 x 16 steps of 20 ms: about 26 s
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_benchmark_seconds" in e.value.details()
    assert time.monotonic() - t0 < 3.0 + 2.0
    assert stub.Generate(gen(4), timeout=30).summary.usage.completion_tokens == 4


def test_generate_is_served_within_2s_of_a_benchmark_cancel(slow_limited):
    stub = slow_limited.stub()
    call = stub.Benchmark(bench_request(40, 16), timeout=120)
    it = iter(call)
    first = next(it)
    assert first.progress.done < first.progress.total
    queued = stub.Generate.future(gen(4), timeout=60)
    time.sleep(0.5)
    assert not queued.done()  # the control: the benchmark holds the engine
    t0 = time.monotonic()
    call.cancel()
    assert queued.result(timeout=60).summary.usage.completion_tokens == 4
    assert time.monotonic() - t0 <= 2.0


def test_benchmark_rpc_can_be_switched_off(tiny_dirs):
    s = ServerThread(test_config(benchmark_rpc=False), engine=load_engine(tiny_dirs))
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(s.stub().Benchmark(bench_request(1, 4), timeout=30))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--no-benchmark-rpc" in e.value.details()
        assert s.stub().Generate(gen(2), timeout=30).summary.usage.completion_tokens == 2
    finally:
        s.close()


# ---- a prompt too large to tokenize ---------------------------------------------------------------


def _longest_gap_while(stub, action) -> tuple[float, object]:
    """The longest gap between chunks of a running stream while ``action`` runs on another thread."""
    stream = stub.GenerateStream(gen(400), timeout=120)
    it = iter(stream)
    next(it)
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=action()))
    gaps, last = [], time.monotonic()
    worker.start()
    for _ in it:
        now = time.monotonic()
        gaps.append(now - last)
        last = now
        if not worker.is_alive():
            break
    worker.join(60)
    stream.cancel()
    return max(gaps), box.get("result")


def _rejected(stub, text: str) -> str:
    try:
        stub.Generate(pb.GenerateRequest(text=text, max_new_tokens=2), timeout=120)
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"
    return "OK"


@pytest.fixture
def paced_server(tiny_dirs):
    """Steps of about 10 ms, so that a stream's chunks come evenly; a 5 MiB message limit."""
    engine = ControlledEngine(load_engine(tiny_dirs), delay=0.01)
    s = ServerThread(test_config(limits=Limits(max_prompt_tokens=8192), max_message_bytes=5 << 20), engine=engine)
    s.engine = engine
    yield s
    s.close()


def test_a_4mib_prompt_is_refused_without_stalling_running_streams(paced_server):
    stub = paced_server.stub()
    text = "x" * (4 << 20)
    gap, result = _longest_gap_while(stub, lambda: _rejected(stub, text))
    assert result.startswith("INVALID_ARGUMENT") and "limit max_prompt_tokens" in result
    assert "characters" in result  # refused by its length, before tokenizing
    assert gap <= 0.5, f"a running stream stalled {gap:.2f} s"


def test_a_long_prompt_within_the_character_bound_is_tokenized_off_the_engine_thread(paced_server):
    """A text the character bound lets through (a tokenizer whose longest token seems huge) is tokenized on the
    server's tokenizing thread: the running stream keeps its pace while it is, then the limit refuses it."""
    stub = paced_server.stub()
    paced_server.server._prompts.max_token_chars = 1 << 30
    gap, result = _longest_gap_while(stub, lambda: _rejected(stub, "x " * (1 << 20)))
    assert result.startswith("INVALID_ARGUMENT") and "tokens (limit max_prompt_tokens), got" in result
    assert gap <= 0.5, f"a running stream stalled {gap:.2f} s"


def test_control_the_same_prompt_tokenized_on_the_engine_thread_stalls_a_stream(paced_server):
    """The measurement sees a stall when it happens: the same text handed to the scheduler untokenized (so the
    engine's worker tokenizes it, with no limit) holds up the running stream."""
    stub = paced_server.stub()
    parsed = parse_request(pb.GenerateRequest(text="x " * (1 << 21), max_new_tokens=2), Limits())
    parsed = replace(parsed, max_prompt_tokens=None)

    def on_the_engine_thread():
        handle = Handle(paced_server.loop, "control", None)
        paced_server.scheduler.submit(handle, parsed)
        assert wait_until(lambda: handle.done, 120)
        return "submitted"

    gap, result = _longest_gap_while(stub, on_the_engine_thread)
    assert result == "submitted"
    assert gap > 0.5


# ---- γ beyond the server's bound --------------------------------------------------------------------


def test_gamma_above_max_gamma_is_refused_naming_the_limit(server_default_gamma):
    stub = server_default_gamma.stub()
    for spec, expected in [
        (pb.SpeculationOptions(gamma=9), "speculation.gamma must be <= 8 on this server (limit max_gamma), got 9"),
        (pb.SpeculationOptions(gamma_max=32), "speculation.gamma_max must be <= 8 on this server (limit max_gamma), got 32"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(gen(2, speculation=spec), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in e.value.details()
    for spec in (pb.SpeculationOptions(gamma=8), pb.SpeculationOptions(gamma_max=8)):  # the control: at the bound
        assert stub.Generate(gen(2, speculation=spec), timeout=30).summary.usage.completion_tokens == 2


@pytest.fixture
def server_default_gamma(tiny_dirs):
    s = ServerThread(test_config(), engine=load_engine(tiny_dirs, gamma_max=8))
    yield s
    s.close()


# ---- streams nobody reads -----------------------------------------------------------------------------


def _unread_streams(address: str, n: int, tokens: int):
    """``n`` streams on small-window channels that read nothing."""
    channels = [grpc.insecure_channel(address, options=SMALL_WINDOW) for _ in range(n)]
    calls = [pb_grpc.SpecDecodeStub(ch).GenerateStream(gen(tokens), timeout=120) for ch in channels]
    return channels, calls


@pytest.mark.parametrize("max_unread,blocked", [(4, False), (10_000, True)], ids=["back-pressure", "control-off"])
def test_an_unread_stream_gives_its_slot_to_a_fresh_generate(tiny_dirs, max_unread, blocked):
    engine = ControlledEngine(load_engine(tiny_dirs), delay=0.01)
    s = ServerThread(test_config(max_running=1, max_unread=max_unread), engine=engine)
    try:
        channels, calls = _unread_streams(s.address, 1, 480)
        assert wait_until(lambda: s.server.scheduler.running == 1, 10)  # the unread stream has the only slot
        time.sleep(1.0)  # its chunks fill the client's window, then the server's buffer
        t0 = time.monotonic()
        try:
            r = s.stub().Generate(gen(4), timeout=2)
            served = r.summary.usage.completion_tokens == 4
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            served = False
        assert served != blocked
        if not blocked:
            assert time.monotonic() - t0 < 1.0  # one step of the waiting request's, not the unread stream's 480
            assert s.server.scheduler.snapshot()["unread"] == 1
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
    finally:
        s.close()


def test_a_stream_left_unread_past_the_timeout_is_cancelled_and_freed(tiny_dirs):
    engine = ControlledEngine(load_engine(tiny_dirs), delay=0.01)
    s = ServerThread(test_config(max_running=1, max_unread=4, unread_timeout_s=1.0), engine=engine)
    try:
        channels, calls = _unread_streams(s.address, 1, 480)
        assert wait_until(lambda: s.server.scheduler.snapshot()["unread"] == 1, 10)
        freed = lambda snap: snap["running"] == snap["unread"] == snap["holding_cache"] == 0  # noqa: E731
        assert wait_until(lambda: freed(s.server.scheduler.snapshot()), 10)
        for ch in channels:
            ch.close()
    finally:
        s.close()


# ---- stop strings and finish reasons ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stop_engine(tiny_dirs):
    return load_engine(tiny_dirs, draft=None, method=Method.NONE)


def _byte_ids(tokenizer, data: bytes) -> list[int]:
    chars = bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(chars[b]) for b in data]


TEXT = st.text(alphabet=st.sampled_from(list("ab é漢🚀")), min_size=1, max_size=6)


def _finish(engine, raw: bytes, stops: list[str]):
    """Feed ``raw`` one byte token at a time, as engine steps emit them, with max_new_tokens = its length."""
    ids = _byte_ids(engine.tokenizer, raw)
    seq = engine.start(GenerationRequest(prompt_ids=[1], max_new_tokens=len(ids), stop=stops, ignore_eos=True))
    for tok in ids:
        if engine._emit(seq, [tok], None, None).finished:
            break
    assert seq.finished
    return seq


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, cut=st.integers(0, 3), data=st.data())
def test_matched_stop_comes_only_with_stop_sequence(stop_engine, text, cut, data):
    """Each token is one byte of ``text``'s UTF-8, less ``cut`` bytes at the end (an incomplete character, flushed as
    U+FFFD when max_new_tokens ends the request); the stop strings are pieces of what the text decodes to."""
    raw = text.encode()
    raw = raw[: max(1, len(raw) - cut)]
    decoded = raw.decode("utf-8", errors="replace")
    i = data.draw(st.integers(0, len(decoded) - 1))
    stops = [decoded[i : i + data.draw(st.integers(1, 3))]] + data.draw(st.lists(TEXT, max_size=2))
    seq = _finish(stop_engine, raw, stops)
    assert (seq.matched_stop is not None) == (seq.finish_reason == FinishReason.STOP_SEQUENCE)
    if seq.matched_stop is not None:
        assert seq.matched_stop in stops and seq.matched_stop not in seq.text


def test_a_stop_completed_by_the_final_flush_is_a_stop_sequence(stop_engine):
    """The case the property above must cover: "a" then half an emoji, cut off by max_new_tokens; the stop
    "a\ufffd" is found only when the incomplete character is flushed as U+FFFD."""
    seq = _finish(stop_engine, "a🚀".encode()[:3], ["a\ufffd"])
    assert seq.matched_stop == "a\ufffd" and seq.finish_reason == FinishReason.STOP_SEQUENCE and seq.text == ""


# ---- smaller things ---------------------------------------------------------------------------------


def test_reflection_is_served_as_v1_too(tiny_dirs):
    from grpc_reflection.v1alpha import reflection_pb2

    srv = ServerThread(test_config(metrics_port=None), engine=load_engine(tiny_dirs, draft=None))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            for version in ("v1", "v1alpha"):
                call = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)  # fmt: skip
                reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol="specdec.v1.SpecDecode")]  # fmt: skip
                listed, described = list(call(iter(reqs), timeout=10))
                assert "specdec.v1.SpecDecode" in {s.name for s in listed.list_services_response.service}
                assert described.file_descriptor_response.file_descriptor_proto
            with pytest.raises(grpc.RpcError) as e:  # the control: a version nobody serves
                list(ch.stream_stream("/grpc.reflection.v2.ServerReflection/ServerReflectionInfo")(iter([b""]), timeout=10))
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.close()


@pytest.mark.parametrize("expose", [False, True])
def test_model_info_names_models_not_paths_unless_asked(tiny_dirs, expose):
    srv = ServerThread(test_config(metrics_port=None, expose_model_paths=expose), engine=load_engine(tiny_dirs))
    try:
        info = srv.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert (info.target, info.draft) == ((tiny_dirs["target"], tiny_dirs["draft_other"]) if expose else
                                             (Path(tiny_dirs["target"]).name, Path(tiny_dirs["draft_other"]).name))  # fmt: skip
        assert ("/" in info.target) == expose
    finally:
        srv.close()


def test_rejected_calls_are_logged_at_most_a_burst_per_interval(tiny_dirs, caplog, monkeypatch):
    from specdec.serving import security

    srv = ServerThread(test_config(metrics_port=None, auth_token="s3cret"), engine=load_engine(tiny_dirs, draft=None))

    def reject(n: int) -> list:
        caplog.clear()
        with caplog.at_level("WARNING", logger="specdec.security"):
            for _ in range(n):
                with pytest.raises(grpc.RpcError) as e:
                    srv.stub().Generate(gen(2), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        return [r for r in caplog.records if r.getMessage() == "unauthenticated call rejected"]

    try:
        lines = reject(30)
        assert len(lines) == security.REJECT_LOG_BURST < 30
        monkeypatch.setattr(security, "REJECT_LOG_INTERVAL_S", 0.0)  # the control: a new window logs again
        lines = reject(1)
        assert len(lines) == 1 and lines[0].fields["unlogged_before"] == 30 - security.REJECT_LOG_BURST
    finally:
        srv.close()


def test_top_k_range_fits_an_int32():
    from specdec.types import SamplingParams

    SamplingParams(top_k=(1 << 31) - 1).validate()
    with pytest.raises(ValueError, match=r"sampling.top_k must be in \[0, 2\^31 - 1\]"):
        SamplingParams(top_k=1 << 31).validate()


def test_a_request_that_ends_before_it_starts_reports_its_method_seed_and_deadline(slow_limited):
    """A Generate that arrives during a Benchmark waits unstarted (the worker is busy with the job); past its deadline
    it is logged and counted as a deadline, with the method and seed it asked for."""
    stub = slow_limited.stub()
    call = stub.Benchmark(bench_request(40, 16), timeout=120)
    it = iter(call)
    next(it)
    finished = []
    slow_limited.server.metrics.finished = finished.append  # the observer sees each completion
    req = gen(4, sampling=pb.SamplingOptions(seed=77), speculation=pb.SpeculationOptions(method=pb.METHOD_NGRAM))
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req, timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not finished  # the control: still unstarted behind the benchmark
    call.cancel()
    assert wait_until(lambda: finished, 10)
    c = finished[0]
    assert (c.method, c.seed, c.finish_reason, c.completion_tokens) == ("ngram", 77, FinishReason.DEADLINE, 0)
