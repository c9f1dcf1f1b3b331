"""The C++ example client (examples/cpp_client) built with CMake against Debian's libgrpc++-dev and run
against a live server: plaintext, and TLS with a bearer token. Marked ``cpp_client`` (deselected by default;
``pytest -m cpp_client``); skips with the reason when the toolchain or the packages are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from server_fixtures import ServerThread, load_engine, test_config

from specdec.client import Client

pytestmark = pytest.mark.cpp_client

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "examples" / "cpp_client"
TOKEN = "cpp-client-token-5e1d"
PACKAGES = "cmake g++ pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc"


def _missing() -> str | None:
    for tool in ("cmake", "c++", "pkg-config", "protoc", "grpc_cpp_plugin"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: apt-get install {PACKAGES})"
    if subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        return f"pkg-config finds no grpc++/protobuf (Debian: apt-get install {PACKAGES})"
    return None


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    build = Path(os.environ.get("SPECDEC_CPP_BUILD", SRC / "build"))  # reused between runs: rebuilds what changed
    for cmd in (["cmake", "-S", str(SRC), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build), "-j1"]):  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exe = build / "specdec_client"
    assert exe.is_file()
    return exe


def run(exe: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPECDEC_AUTH_TOKEN"}
    if token is not None:
        env["SPECDEC_AUTH_TOKEN"] = token
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, env=env)


def fields(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "") for line in out.splitlines())


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return load_engine(tiny_dirs)


def test_cpp_client_generate_and_stream_match_the_python_client(binary, engine):
    s = ServerThread(test_config(metrics_port=None), engine=engine)
    try:
        assert s.wait_ready()
        with Client(s.address) as c:
            want = c.generate("def fib(n):", max_new_tokens=12, timeout=30)
        r = run(binary, "--address", s.address, "--prompt", "def fib(n):", "--max-new-tokens", "12")
        assert r.returncode == 0, r.stderr
        f = fields(r.stdout)
        # greedy: token for token the same as the Python client's, unary and streamed
        assert f["generate.token_ids"] == " ".join(map(str, want.token_ids)) != ""
        assert f["generate.token_ids"] == f["stream.token_ids"]
        assert f["generate.completion_tokens"] == f["stream.completion_tokens"] != "0"
        assert f["generate.text"] == f["stream.text"]
        assert int(f["stream.chunks"]) >= 1
        # an out-of-range request: the status comes back by name
        bad = run(binary, "--address", s.address, "--max-new-tokens", "0")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "max_new_tokens" in bad.stderr
    finally:
        s.close()


def test_cpp_client_over_tls_with_a_bearer_token(binary, engine, tmp_path):
    from test_tls import make_pki

    pki = make_pki(tmp_path / "pki", "cpp")
    s = ServerThread(test_config(metrics_port=None, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                                 auth_token=TOKEN), engine=engine)  # fmt: skip
    try:
        assert s.wait_ready()
        args = ("--address", s.address, "--tls-ca", pki["ca"], "--max-new-tokens", "4")
        ok = run(binary, *args, token=TOKEN)
        assert ok.returncode == 0, ok.stderr
        assert fields(ok.stdout)["generate.completion_tokens"] != "0"
        no_token = run(binary, *args)
        assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
        plaintext = run(binary, "--address", s.address, "--max-new-tokens", "4", token=TOKEN)
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    finally:
        s.close()
