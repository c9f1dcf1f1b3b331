"""Bearer-token auth: missing/wrong token UNAUTHENTICATED, health open, reflection switchable; secrets never in
logs or metrics (checked in-process and on a real ``specdec serve`` process's stderr)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_fixtures import ServerThread, load_engine, test_config, wait_until

from specdec.client import Client
from specdec.serving import security
from specdec.serving.metrics import JsonFormatter, TextFormatter
from specdec.serving.security import token_matches

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cr3t-T0KEN-do-not-log-9f2c4e"
WRONG = "wrong-T0KEN-also-secret-71aa"


@pytest.fixture(scope="module")
def auth_server(tiny_dirs):
    s = ServerThread(test_config(auth_token=TOKEN), engine=load_engine(tiny_dirs))
    assert s.wait_ready()
    yield s
    s.close()


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_token_required_on_unary_and_stream_and_health_stays_open(auth_server):
    addr = auth_server.address
    for token in (None, WRONG, TOKEN[:-1], TOKEN + "x", "", "Bearer"):
        with Client(addr, token=token) as c:
            code, details = _code(lambda: c.generate("hello", max_new_tokens=2, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (token, code)
            assert "bearer token" in details
            code, _ = _code(lambda: list(c.stream("hello", max_new_tokens=2, timeout=10)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = _code(lambda: c.model_info(timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert c.health() == "SERVING"  # probes need no token
    with Client(addr, metadata=[("authorization", f"Basic {TOKEN}")]) as c:  # the wrong scheme
        assert _code(lambda: c.generate("hello", max_new_tokens=2, timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
    with Client(addr, token=TOKEN) as c:  # the right token works, so the rejections above are the token's doing
        assert c.generate("hello", max_new_tokens=2, timeout=30).summary.usage.completion_tokens == 2
        stream = list(c.stream("hello", max_new_tokens=2, timeout=30))
        assert stream[-1].summary.usage.completion_tokens == 2
    with Client(addr, metadata=[("authorization", f"bearer {TOKEN}")]) as c:  # the scheme is case-insensitive
        assert c.generate("hello", max_new_tokens=1, timeout=30).summary.usage.completion_tokens == 1


def test_token_comparison_unit():
    t = TOKEN.encode()
    assert token_matches(t, [("authorization", f"Bearer {TOKEN}")])
    assert not token_matches(t, [("authorization", f"Bearer {WRONG}")])
    assert not token_matches(t, [("authorization", "Bearer ")])
    assert not token_matches(t, [])
    assert not token_matches(t, None)


def _reflect(address: str, metadata=None):
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        return list(stub.ServerReflectionInfo(iter([req]), timeout=10, metadata=metadata))


def test_reflection_needs_the_token_and_can_be_switched_off(auth_server, tiny_dirs):
    with pytest.raises(grpc.RpcError) as e:
        _reflect(auth_server.address)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reflect(auth_server.address, [("authorization", f"Bearer {TOKEN}")])[0].list_services_response.service
    s = ServerThread(test_config(metrics_port=None, reflection=False), engine=load_engine(tiny_dirs, draft=None))
    try:
        with pytest.raises(grpc.RpcError) as e:
            _reflect(s.address)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        s.close()


def test_secrets_never_in_logs_or_metrics(auth_server, monkeypatch):
    # The earlier tests' rejections used up this window's warnings; this test must see its own.
    monkeypatch.setattr(security, "REJECT_LOG_BURST", 1 << 30)
    buf = io.StringIO()
    handlers = []
    for fmt in (JsonFormatter(), TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")):
        h = logging.StreamHandler(buf)
        h.setFormatter(fmt)
        h.setLevel(logging.DEBUG)
        handlers.append(h)
    loggers = [logging.getLogger("specdec"), logging.getLogger()]
    old = [(lg.level, lg.handlers[:]) for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.DEBUG)
            for h in handlers:
                lg.addHandler(h)
        for token in (None, WRONG, TOKEN):
            with Client(auth_server.address, token=token) as c:
                try:
                    c.generate("hello", max_new_tokens=2, timeout=30, request_id="sec-check")
                except grpc.RpcError:
                    pass
        assert wait_until(lambda: "request finished" in buf.getvalue(), 5)
    finally:
        for lg, (level, hs) in zip(loggers, old):
            lg.setLevel(level)
            lg.handlers[:] = hs
    logs = buf.getvalue()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{auth_server.server.metrics_port}/metrics", timeout=5).read().decode()
    # the capture does see the calls: a rejection and the finished request are there
    assert "unauthenticated call rejected" in logs and "sec-check" in logs
    assert 'specdec_requests_failed_total{kind="unauthenticated"}' in metrics
    for secret in (TOKEN, WRONG):
        assert secret not in logs
        assert secret not in metrics
    assert TOKEN not in repr(auth_server.server.config)


SERVE = """
import sys
from specdec.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_serve_reads_the_token_file_and_never_prints_it(tiny_dirs, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SPECDEC_AUTH_TOKEN", None)
    cmd = [sys.executable, "-c", SERVE, "serve", "--target", tiny_dirs["target"], "--method", "none", "--host",
           "127.0.0.1", "--port", "0", "--metrics-port", "0", "--port-file", str(port_file), "--log-level", "debug",
           "--auth-token-file", str(token_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert wait_until(lambda: port_file.exists() or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        address = f"127.0.0.1:{int(port_file.read_text())}"
        with Client(address) as c:
            assert wait_until(lambda: _serving(c), 60)
            assert _code(lambda: c.generate("hi", max_new_tokens=1, timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
        with Client(address, token=WRONG) as c:
            assert _code(lambda: c.generate("hi", max_new_tokens=1, timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
        from specdec.cli import main

        env_before = os.environ.get("SPECDEC_AUTH_TOKEN")
        os.environ["SPECDEC_AUTH_TOKEN"] = TOKEN  # the CLI client takes the token from the environment too
        try:
            assert main(["generate", "hi", "--address", address, "--max-new-tokens", "2", "--timeout", "30"]) == 0
        finally:
            if env_before is None:
                os.environ.pop("SPECDEC_AUTH_TOKEN")
            else:
                os.environ["SPECDEC_AUTH_TOKEN"] = env_before
        assert main(["generate", "hi", "--address", address, "--max-new-tokens", "2", "--timeout", "30"]) == 1
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert '"auth": "token"' in err and "unauthenticated call rejected" in err  # stderr was captured in full
    assert TOKEN not in out + err and WRONG not in out + err


def _serving(c: Client) -> bool:
    try:
        return c.health(timeout=2) == "SERVING"
    except grpc.RpcError:
        return False
