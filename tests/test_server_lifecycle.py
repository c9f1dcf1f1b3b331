"""Health while loading, serving and shutting down; reflection; graceful shutdown in-process and by signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_fixtures import ControlledEngine, ServerThread, load_engine, test_config, wait_until

from specdec.serving.server import SERVICE_NAME
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def request(n: int = 8, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="def add(a, b):", max_new_tokens=n, ignore_eos=True, **kw)


def test_health_not_serving_while_loading_then_serving_then_not_serving_in_drain(tiny_dirs):
    release = threading.Event()
    engine_box = {}

    def loader():
        assert release.wait(30)
        engine_box["e"] = ControlledEngine(load_engine(tiny_dirs))
        return engine_box["e"]

    srv = ServerThread(test_config(), loader=loader)
    try:
        for name in ("", SERVICE_NAME):
            assert health(srv.address, name) == NOT_SERVING
        stub = srv.stub()
        for call in (lambda: stub.Generate(request(), timeout=5),
                     lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()

        release.set()
        assert srv.wait_ready(30)
        for name in ("", SERVICE_NAME):
            assert health(srv.address, name) == SERVING
        assert stub.Generate(request(), timeout=30).summary.usage.completion_tokens == 8

        # an in-flight stream held at the gate while the server drains
        engine = engine_box["e"]
        engine.gate.clear()
        got: list = []
        t = threading.Thread(target=lambda: got.extend(stub.GenerateStream(request(12), timeout=60)))
        t.start()
        assert wait_until(lambda: srv.scheduler.running == 1 and engine.step_calls >= 2, 10)
        done = srv.begin_shutdown(grace=20)
        assert wait_until(lambda: health(srv.address) == NOT_SERVING, 5)
        assert health(srv.address, SERVICE_NAME) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
        engine.gate.set()
        t.join(30)
        done.result(30)
        assert got and got[-1].HasField("summary")
        assert got[-1].summary.usage.completion_tokens == 12
        assert got[-1].summary.finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        release.set()
        srv.close()


def test_load_failure_is_reported_and_health_stays_not_serving(tmp_path):
    def loader():
        raise FileNotFoundError(f"no model at {tmp_path / 'missing'}")

    srv = ServerThread(test_config(metrics_port=None), loader=loader)
    try:
        with pytest.raises(FileNotFoundError):
            srv.wait_ready(10)
        assert health(srv.address) == NOT_SERVING
    finally:
        srv.close()


def test_reflection_lists_the_services_and_describes_the_api(tiny_dirs):
    srv = ServerThread(test_config(metrics_port=None), engine=load_engine(tiny_dirs, draft=None))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]  # fmt: skip
            responses = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"specdec.v1.SpecDecode", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        assert responses[1].file_descriptor_response.file_descriptor_proto  # grpcurl can describe the API
    finally:
        srv.close()


def test_shutdown_past_grace_ends_in_flight_calls_with_unavailable(tiny_dirs):
    engine = ControlledEngine(load_engine(tiny_dirs), delay=0.05)
    srv = ServerThread(test_config(metrics_port=None), engine=engine)
    errors: list = []

    def run():
        try:
            list(srv.stub().GenerateStream(request(400), timeout=60))
        except grpc.RpcError as e:
            errors.append(e)

    try:
        t = threading.Thread(target=run)
        t.start()
        assert wait_until(lambda: engine.step_calls >= 3, 10)
        t0 = time.monotonic()
        srv.shutdown(grace=0.3)
        t.join(10)
        assert time.monotonic() - t0 < 5
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE
        seq = engine.stepped[0]
        assert seq.finished and seq.target_cache is None
    finally:
        srv.close()


# ---- the real CLI in a subprocess, stopped by a signal ------------------------------------------

# The real `specdec serve`, with each engine step slowed to 30 ms so that a stream is surely in flight when the
# signal arrives (the tiny model alone decodes faster than a test can react).
SLOW_SERVE = """
import sys, time
from specdec.engine import Engine
step = Engine.step_batch
def slow(self, seqs):
    time.sleep(0.03)
    return step(self, seqs)
Engine.step_batch = slow
from specdec.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn(tiny_dirs, tmp_path, *extra):
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", SLOW_SERVE, "serve", "--target", tiny_dirs["target"], "--draft", tiny_dirs["draft_other"],
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--port-file", str(port_file), "--method", "none",
           "--log-level", "info", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert wait_until(lambda: port_file.exists() or proc.poll() is not None, 60)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    address = f"127.0.0.1:{int(port_file.read_text())}"
    assert wait_until(lambda: _health_or_none(address) == SERVING, 60)
    return proc, address


def _health_or_none(address: str):
    try:
        return health(address)
    except grpc.RpcError:
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_drains_in_flight_stream_then_exits_zero(tiny_dirs, tmp_path, sig):
    proc, address = _spawn(tiny_dirs, tmp_path, "--grace", "30")
    try:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.SpecDecodeStub(ch)
            call = stub.GenerateStream(request(60), timeout=60)
            it = iter(call)
            first = next(it)
            assert first.HasField("chunk")
            proc.send_signal(sig)
            assert wait_until(lambda: _health_or_none(address) == NOT_SERVING, 10)
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(request(2), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(it)
        assert rest[-1].HasField("summary"), "the in-flight stream did not finish"
        assert rest[-1].summary.usage.completion_tokens == 60
        assert len(first.chunk.token_ids) + sum(len(m.chunk.token_ids) for m in rest) == 60
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        assert "listening on 127.0.0.1:" in out
        assert '"msg": "stopped"' in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
