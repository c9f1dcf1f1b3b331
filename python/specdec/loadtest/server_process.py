"""``specdec serve`` as a subprocess on loopback, its health and /metrics, its memory, and SIGTERM under load."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.loadtest.load import PROMPTS, Reference, greedy_request
from specdec.v1 import specdec_pb2_grpc as pb_grpc


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    address: str
    metrics_url: str
    log_path: Path
    startup_s: float  # from the process's start to its first SERVING health answer (models loaded)


def spawn_server(target: str | None, draft: str | None, extra: list[str], workdir: Path,
                 timeout_s: float = 600.0) -> ServerProcess:  # fmt: skip
    """``specdec serve`` on 127.0.0.1 (ports picked by the OS; no target: the default pair); returns once SERVING."""
    port_file, out, log = workdir / "port", workdir / "serve.out", workdir / "serve.log"
    cmd = [sys.executable, "-m", "specdec.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
           "--port-file", str(port_file), "--log-level", "warning", *extra]  # fmt: skip
    cmd += ["--target", target] if target else []
    cmd += ["--draft", draft] if draft else []
    # Files, not pipes: a full pipe would block the server.
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out.open("w"), stderr=log.open("w"), cwd=workdir)
    end = t0 + timeout_s
    while not (port_file.exists() and "metrics on" in out.read_text()):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"specdec serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    address = f"127.0.0.1:{int(port_file.read_text())}"
    metrics_port = int(re.search(r"metrics on :(\d+)", out.read_text()).group(1))
    # One channel for every probe: a new connection per probe costs the loading server time it would otherwise
    # spend loading, and startup_s is what this measures.
    with grpc.insecure_channel(address) as channel:
        while health(address, channel, timeout_s=1.0) != "SERVING":
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                raise RuntimeError(f"specdec serve never became SERVING: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    return ServerProcess(proc, address, f"http://127.0.0.1:{metrics_port}/metrics", log, time.monotonic() - t0)


def health(address: str, channel: grpc.Channel | None = None, timeout_s: float = 5.0) -> str:
    """The server's health status name, or the gRPC error code's name; over ``channel`` if given."""
    try:
        if channel is not None:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        else:
            with grpc.insecure_channel(address) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except grpc.RpcError as e:
        return e.code().name


def scrape(url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+) ([-+0-9.eEinfa]+)$", text, re.M)} | {
        f"{m[1]}{{{m[2]}}}": float(m[3]) for m in re.finditer(r'^([a-z_]+)\{([^}]*)\} ([-+0-9.eEinfa]+)$', text, re.M)
    }


def wait_idle(read: Callable[[], dict[str, float]], timeout_s: float = 30.0) -> dict[str, float]:
    """Poll ``read`` until every count in it is 0; return the last reading."""
    end = time.monotonic() + timeout_s
    while True:
        counts = read()
        if not any(counts.values()) or time.monotonic() > end:
            return counts
        time.sleep(0.05)


def idle_counts(url: str) -> dict[str, float]:
    m = scrape(url)
    return {k: m.get(k, math.nan) for k in ("specdec_requests_running", "specdec_requests_waiting",
                                            "specdec_sequences_holding_cache")}  # fmt: skip


def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def sigterm_under_load(server: ServerProcess, ref: Reference, streams: int, timeout_s: float = 120.0) -> dict:
    """Open ``streams`` streams (half short, half long), SIGTERM once each has a chunk; outcomes and exit."""
    outcomes: list[str | None] = [None] * streams
    started = [threading.Event() for _ in range(streams)]
    finished_before_signal = [False] * streams
    signalled = threading.Event()

    def stream(i: int) -> None:
        n = ref.max_new_tokens if i % 2 == 0 else ref.long_tokens
        try:
            with grpc.insecure_channel(server.address) as ch:
                request = greedy_request(PROMPTS[i % len(PROMPTS)], n)
                for m in pb_grpc.SpecDecodeStub(ch).GenerateStream(request, timeout=timeout_s):
                    started[i].set()
                    if m.HasField("summary"):
                        finished_before_signal[i] = not signalled.is_set()
                        outcomes[i] = "finished" if m.summary.usage.completion_tokens == n else "short"
        except grpc.RpcError as e:
            outcomes[i] = e.code().name
        finally:
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for e in started:
        e.wait(timeout_s)
    signalled.set()
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout_s)
    try:
        code = server.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        code = None
    return {
        "streams": streams,
        "in_flight_at_signal": streams - sum(finished_before_signal),
        "outcomes": dict(Counter(str(o) for o in outcomes)),
        "hung": sum(t.is_alive() for t in threads),
        "exit_code": code,
        "exit_s": time.monotonic() - t0,
    }
