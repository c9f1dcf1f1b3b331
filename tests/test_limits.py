"""Each configurable limit holds (INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the limit), the request just
inside it passes, and the server keeps serving afterwards."""

from __future__ import annotations

import threading

import grpc
import pytest
from server_fixtures import ControlledEngine, ServerThread, load_engine, test_config, wait_until

from specdec.serving.wire import Limits
from specdec.v1 import specdec_pb2 as pb

LIMITS = Limits(max_prompt_tokens=6, max_new_tokens=8, max_stop_strings=2, max_stop_length=4)
MAX_BYTES = 16 << 10


@pytest.fixture(scope="module")
def limited(tiny_dirs):
    engine = ControlledEngine(load_engine(tiny_dirs))
    s = ServerThread(test_config(limits=LIMITS, max_message_bytes=MAX_BYTES, max_concurrent_streams=2, max_queue=1,
                                 max_running=1), engine=engine)  # fmt: skip
    s.engine = engine
    assert s.wait_ready()
    yield s
    engine.gate.set()
    s.close()


def req(**kw) -> pb.GenerateRequest:
    if not any(k in kw for k in ("text", "token_ids")):
        kw["token_ids"] = pb.TokenIds(ids=[5, 6, 7])
    kw.setdefault("max_new_tokens", 2)
    return pb.GenerateRequest(**kw)


def rejected(server, r, code) -> str:
    with pytest.raises(grpc.RpcError) as e:
        server.stub().Generate(r, timeout=30)
    assert e.value.code() == code, e.value.details()
    return e.value.details()


def still_serving(server) -> None:
    assert wait_until(server.idle, 10)
    assert server.stub().Generate(req(), timeout=30).summary.usage.completion_tokens == 2


def test_max_message_bytes(limited):
    details = rejected(limited, req(text="x" * (MAX_BYTES + 100)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert str(MAX_BYTES) in details  # gRPC's own message names the limit in bytes: "larger than max (N vs. M)"
    # just under the size limit the message arrives (and is then judged by the prompt limit instead)
    details = rejected(limited, req(text="x" * (MAX_BYTES - 200)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "max_prompt_tokens" in details
    still_serving(limited)


def test_max_prompt_tokens_for_token_ids_and_for_text(limited):
    details = rejected(limited, req(token_ids=pb.TokenIds(ids=[5] * 7)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "prompt must be at most 6 tokens (limit max_prompt_tokens), got 7"
    # a text prompt is judged once tokenized, on the server's tokenizing thread
    details = rejected(limited, req(text="hello world " * 20), grpc.StatusCode.INVALID_ARGUMENT)
    assert "prompt must be at most 6 tokens (limit max_prompt_tokens)" in details
    ok = limited.stub().Generate(req(token_ids=pb.TokenIds(ids=[5] * 6)), timeout=30)
    assert ok.summary.usage.prompt_tokens == 6
    still_serving(limited)


def test_max_new_tokens_limit(limited):
    details = rejected(limited, req(max_new_tokens=9), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "max_new_tokens must be <= 8 (limit max_new_tokens), got 9"
    r = limited.stub().Generate(req(max_new_tokens=8, ignore_eos=True), timeout=30)
    assert r.summary.usage.completion_tokens == 8
    still_serving(limited)


def test_max_stop_strings_and_length(limited):
    details = rejected(limited, req(stop=["ab", "cd", "ef"]), grpc.StatusCode.INVALID_ARGUMENT)
    assert "stop must hold at most 2 strings, got 3 (limit max_stop_strings)" == details
    details = rejected(limited, req(stop=["ab", "abcde"]), grpc.StatusCode.INVALID_ARGUMENT)
    assert "stop[1] must be at most 4 characters, got 5 (limit max_stop_length)" == details
    limited.stub().Generate(req(stop=["abcd", "efgh"]), timeout=30)
    still_serving(limited)


def _hold(server, n: int):
    """Start n streams while the engine is held at its gate; returns (threads, results)."""
    results: list = [None] * n

    def run(i):
        try:
            results[i] = list(server.stub().GenerateStream(req(max_new_tokens=2), timeout=60))
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    calls = server.engine.step_calls
    threads[0].start()
    # the first is running (held in its first step) before the next arrives, so the next one queues behind it
    assert wait_until(lambda: server.engine.step_calls > calls and server.scheduler.running == 1, 30)
    for t in threads[1:]:
        t.start()
    return threads, results


def test_max_concurrent_streams_and_max_queue(limited):
    eng = limited.engine
    eng.gate.clear()
    try:
        threads, results = _hold(limited, 2)  # one running (held at the gate), one waiting in the queue (max_queue 1)
        ok = wait_until(lambda: limited.server._generate_calls == 2 and limited.scheduler.waiting == 1, 30)
        assert ok, (limited.server._generate_calls, limited.scheduler.waiting, limited.scheduler.running, results)
        details = rejected(limited, req(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert details.startswith("max_concurrent_streams: 2 Generate/GenerateStream calls are in flight")
    finally:
        eng.gate.set()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, list) and r[-1].summary.usage.completion_tokens == 2 for r in results), results
    still_serving(limited)


def test_max_queue_when_streams_allow_it(tiny_dirs):
    engine = ControlledEngine(load_engine(tiny_dirs, draft=None))
    s = ServerThread(test_config(metrics_port=None, max_concurrent_streams=10, max_queue=1, max_running=1),
                     engine=engine)  # fmt: skip
    s.engine = engine
    try:
        assert s.wait_ready()
        engine.gate.clear()
        threads, results = _hold(s, 2)
        assert wait_until(lambda: s.scheduler.waiting == 1 and s.scheduler.running == 1, 30)
        details = rejected(s, req(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "max_queue 1" in details
        engine.gate.set()
        for t in threads:
            t.join(60)
        assert all(isinstance(r, list) for r in results), results
        still_serving(s)
    finally:
        engine.gate.set()
        s.close()


def test_defaults_are_the_documented_ones():
    from specdec.cli import build_parser
    from specdec.serving.server import ServerConfig

    d, c = Limits(), ServerConfig()
    assert (d.max_prompt_tokens, d.max_new_tokens, d.max_stop_strings, d.max_stop_length) == (8192, None, 16, 256)
    assert (c.max_message_bytes, c.max_concurrent_streams, c.max_queue) == (4 << 20, 128, 64)
    a = build_parser("serve").parse_args(["serve"])
    assert (a.max_prompt_tokens, a.max_new_tokens_limit, a.max_stop_strings, a.max_stop_length) == (8192, None, 16, 256)
    assert (a.max_message_bytes, a.max_concurrent_streams, a.max_queue) == (4 << 20, 128, 64)
