"""``specdec loadtest``: load, faults and fuzz against a real server on loopback, bounded in time and count.

    specdec loadtest --target T --draft D --duration 60 --clients 8 --fuzz-cases 2000

The command starts ``specdec serve`` with the given models (default: the default pair) as a subprocess on 127.0.0.1 and then:
1. references: each prompt alone, greedy and target-only (every greedy output under load must be a prefix of
   its reference), timing one long request alone to size the deadlines;
2. load: ``--clients`` clients, each on its own channel, for ``--duration`` seconds. Most requests are checked
   against the reference; the rest are faults: a cancel after a random number of chunks, a deadline that
   expires mid-generation, a channel closed mid-stream; and client processes killed mid-stream;
3. the server is idle afterwards: 0 running, 0 waiting and 0 sequences holding a KV cache on /metrics;
4. fuzz: Hypothesis-generated GenerateRequests (needs ``hypothesis``, in the test extras); every answer must be
   OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message, within the timeout;
5. RSS of the server after the warm-up and at the end; then SIGTERM with streams in flight: each finishes or
   gets UNAVAILABLE, and the server exits 0.

It prints one summary (and ``--json`` writes it). Exit status 0 only when nothing went wrong. The functions
work against any address, so the tests run them against an in-process server too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.client import build_request
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

# Raw text prompts (no chat template, so they mean the same to any model).
PROMPTS = [
    "def add(a, b):",
    "The quick brown fox",
    "import numpy as np\n",
    "Speculative decoding keeps",
    "for i in range(10):",
    "Café crème, naïve",
]
FUZZ_OK = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
# A deadline is set to this fraction of a long request's time alone: under load it surely expires mid-generation.
DEADLINE_FRACTION = (0.3, 0.7)


# ---- results ------------------------------------------------------------------------------------


@dataclass
class LoadStats:
    requests: int = 0  # calls made
    served: int = 0  # completed and checked against the reference
    tokens: int = 0  # tokens of served requests
    cancels: int = 0  # streams the client cancelled after >= 1 chunk, before the summary
    deadlines: int = 0  # DEADLINE_EXCEEDED received
    deadlines_mid_generation: int = 0  # ... after >= 1 chunk had arrived
    disconnects: int = 0  # channels closed mid-stream
    killed_clients: int = 0  # client processes SIGKILLed mid-stream
    mismatches: list[str] = field(default_factory=list)  # greedy output differs from the reference
    errors: list[str] = field(default_factory=list)  # any other status, or a fault that ended the wrong way

    def add(self, other: LoadStats) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class FuzzStats:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)  # status code name -> count
    bad: list[str] = field(default_factory=list)  # a disallowed status, an empty message or an inconsistent OK


@dataclass
class Reference:
    """Greedy, target-only outputs of each prompt alone; a request for k tokens must give the first k."""

    outputs: dict[str, list[int]]
    max_new_tokens: int
    long_tokens: int  # max_new_tokens of the fault requests (cancel, deadline, disconnect)
    long_s: float  # one long request alone, seconds


# ---- references and load ------------------------------------------------------------------------


def greedy_request(prompt: str, n: int, method: str = "none") -> pb.GenerateRequest:
    return build_request(prompt, max_new_tokens=n, temperature=0.0, ignore_eos=True, method=method)


def reference(address: str, *, max_new_tokens: int, long_tokens: int, prompts: list[str] = PROMPTS,
              timeout_s: float = 600.0) -> Reference:  # fmt: skip
    """Each prompt alone (nothing else in flight), greedy and target-only."""
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SpecDecodeStub(ch)
        outputs = {p: list(stub.Generate(greedy_request(p, max_new_tokens), timeout=timeout_s).token_ids) for p in prompts}
        t0 = time.perf_counter()
        stub.Generate(greedy_request(prompts[0], long_tokens), timeout=timeout_s)
        long_s = time.perf_counter() - t0
    return Reference(outputs, max_new_tokens, long_tokens, long_s)


def run_load(address: str, ref: Reference, *, clients: int, duration_s: float, methods: tuple[str, ...],
             faults: bool = True, seed: int = 0, timeout_s: float = 600.0) -> LoadStats:  # fmt: skip
    """``clients`` threads, each on its own channel, send requests until ``duration_s`` has passed."""
    stop_at = time.monotonic() + duration_s
    per_client = [LoadStats() for _ in range(clients)]
    threads = [
        threading.Thread(target=_client_loop, args=(address, ref, methods, faults, random.Random(seed * 1000 + i),
                                                     stop_at, timeout_s, per_client[i]), daemon=True)  # fmt: skip
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + timeout_s + 30)
    total = LoadStats()
    for t, s in zip(threads, per_client):
        total.add(s)
        if t.is_alive():
            total.errors.append("a client thread hung")
    return total


def _client_loop(address: str, ref: Reference, methods: tuple[str, ...], faults: bool, rng: random.Random,
                 stop_at: float, timeout_s: float, stats: LoadStats) -> None:  # fmt: skip
    actions = ["unary", "stream"] * 7 + (["cancel", "deadline", "disconnect"] if faults else [])
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SpecDecodeStub(ch)
        while time.monotonic() < stop_at:
            prompt = rng.choice(list(ref.outputs))
            method = rng.choice(methods)
            action = rng.choice(actions)
            stats.requests += 1
            try:
                if action in ("unary", "stream"):
                    _checked(stub, action, prompt, rng.randint(1, ref.max_new_tokens), method, ref, timeout_s, stats)
                elif action == "disconnect":
                    _disconnect(address, prompt, method, ref, rng, stats)
                else:
                    _fault(stub, action, prompt, method, ref, rng, timeout_s, stats)
            except grpc.RpcError as e:
                stats.errors.append(f"{action}: {e.code().name}: {e.details()}")


def _checked(stub, action: str, prompt: str, k: int, method: str, ref: Reference, timeout_s: float,
             stats: LoadStats) -> None:  # fmt: skip
    request = greedy_request(prompt, k, method)
    if action == "unary":
        r = stub.Generate(request, timeout=timeout_s)
        ids, n = list(r.token_ids), r.summary.usage.completion_tokens
    else:
        ids, n = [], None
        for m in stub.GenerateStream(request, timeout=timeout_s):
            if m.HasField("chunk"):
                ids.extend(m.chunk.token_ids)
            else:
                n = m.summary.usage.completion_tokens
    if ids != ref.outputs[prompt][:k] or n != k:
        stats.mismatches.append(f"{action} {method} {prompt!r} k={k}: got {ids} ({n} counted), want {ref.outputs[prompt][:k]}")
    else:
        stats.served += 1
        stats.tokens += k


def _fault(stub, action: str, prompt: str, method: str, ref: Reference, rng: random.Random, timeout_s: float,
           stats: LoadStats) -> None:  # fmt: skip
    """A cancel after 1-4 chunks, or a deadline below the request's time alone."""
    if action == "deadline":
        timeout = ref.long_s * rng.uniform(*DEADLINE_FRACTION)
    else:
        timeout, cancel_after = timeout_s, rng.randint(1, 4)
    call = stub.GenerateStream(greedy_request(prompt, ref.long_tokens, method), timeout=timeout)
    chunks = 0
    try:
        for m in call:
            if m.HasField("summary"):
                stats.served += 1  # it finished first: a plain success (outputs of faults are not checked)
                return
            chunks += 1
            if action == "cancel" and chunks == cancel_after:
                call.cancel()
    except grpc.RpcError as e:
        code = e.code()
        if action == "cancel" and code == grpc.StatusCode.CANCELLED:
            stats.cancels += 1
        elif action == "deadline" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
            stats.deadlines += 1
            stats.deadlines_mid_generation += chunks > 0
        else:
            stats.errors.append(f"{action} after {chunks} chunks: {code.name}: {e.details()}")


def _disconnect(address: str, prompt: str, method: str, ref: Reference, rng: random.Random, stats: LoadStats) -> None:
    """A channel of its own, closed under a stream after 1-3 chunks (the server sees the connection go)."""
    ch = grpc.insecure_channel(address)
    close_after, chunks = rng.randint(1, 3), 0
    try:
        for m in pb_grpc.SpecDecodeStub(ch).GenerateStream(greedy_request(prompt, ref.long_tokens, method), timeout=600):
            if m.HasField("summary"):
                stats.served += 1
                return
            chunks += 1
            if chunks == close_after:
                ch.close()
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED:
            stats.disconnects += 1
        else:
            stats.errors.append(f"disconnect after {chunks} chunks: {e.code().name}: {e.details()}")
    finally:
        ch.close()


# A client process that starts a long stream, says so after its first chunk, then waits to be killed.
_KILLED_CLIENT = """
import sys, grpc
from specdec.v1 import specdec_pb2 as pb, specdec_pb2_grpc as pb_grpc
ch = grpc.insecure_channel(sys.argv[1])
req = pb.GenerateRequest(text=sys.argv[2], max_new_tokens=int(sys.argv[3]), ignore_eos=True)
for m in pb_grpc.SpecDecodeStub(ch).GenerateStream(req, timeout=600):
    print("streaming", flush=True)
    sys.stdin.readline()
"""


def kill_clients(address: str, ref: Reference, count: int, timeout_s: float = 120.0) -> LoadStats:
    """``count`` client processes, each SIGKILLed once its stream is running (the kernel closes its socket)."""
    stats = LoadStats()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                                   os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, address, PROMPTS[0], str(ref.long_tokens)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)  # fmt: skip
             for _ in range(count)]
    for p in procs:
        stats.requests += 1
        line = _readline(p, timeout_s)
        if line.strip() == "streaming":
            stats.killed_clients += 1
        else:
            stats.errors.append(f"killed client: no stream started ({(line or p.stderr.read())[-300:]!r})")
        p.kill()
        p.communicate()
    return stats


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    return box[0] if box else ""


# ---- fuzz ---------------------------------------------------------------------------------------


FUZZ_FIELDS = ("request_id", "prompt", "sampling", "max_new_tokens", "stop", "stop_token_ids", "speculation")


def request_strategy(vocab_size: int, context_length: int, max_message_bytes: int):
    """GenerateRequests with hostile values: NaN/Inf, huge and negative counts, ids outside the vocabulary, long
    stop lists, empty and oversized prompts; in-vocabulary id prompts are often invalid UTF-8 (byte-level tokens).

    Each request makes 0, a few or all of its fields hostile and the rest plausible, so that valid requests
    (which generate) and single bad fields are both common. Valid max_new_tokens are 1..8: generation stays fast."""
    from hypothesis import strategies as st

    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.0, -0.0, 1.0, 1e-45, -1.0, 1e300, math.nan, math.inf, -math.inf]))  # fmt: skip
    i32 = st.integers(-(2**31), 2**31 - 1)
    in_vocab = st.integers(0, vocab_size - 1)
    token = st.one_of(in_vocab, st.integers(-3, vocab_size + 3), i32)
    short_text = st.text(min_size=1, max_size=40)

    def prompt(r: pb.GenerateRequest, draw, hostile: bool) -> None:
        kinds = ["none", "empty", "long", "oversized", "bad_ids", "long_ids", "messages"] if hostile else ["text", "ids"]
        kind = draw(st.sampled_from(kinds))
        if kind in ("text", "empty", "long", "oversized"):
            r.text = draw({"text": short_text, "empty": st.just(""),
                           "long": st.integers(context_length, 4 * context_length).map(lambda n: "ab " * n),
                           "oversized": st.integers(1, 4096).map(lambda n: "x" * (max_message_bytes + n))}[kind])  # fmt: skip
        elif kind in ("ids", "bad_ids", "long_ids"):
            r.token_ids.SetInParent()
            ids = {"ids": st.lists(in_vocab, min_size=1, max_size=12), "bad_ids": st.lists(token, max_size=12),
                   # A short drawn list tiled to about the context length: Hypothesis draws at most ~8k elements.
                   "long_ids": st.tuples(st.lists(in_vocab, min_size=1, max_size=8), st.integers(-8, 8)).map(
                       lambda t: (t[0] * (context_length // len(t[0]) + 2))[: context_length + t[1]])}[kind]  # fmt: skip
            r.token_ids.ids.extend(draw(ids))
        elif kind == "messages":  # the tiny and chat-less models refuse; chat models check the roles
            r.messages.SetInParent()
            roles = st.sampled_from(["user", "system", "assistant", "tool", "bot", ""])
            for role, content in draw(st.lists(st.tuples(roles, st.text(max_size=20)), max_size=3)):
                r.messages.messages.add(role=role, content=content)

    def sampling(r: pb.GenerateRequest, draw, hostile: bool) -> None:
        plausible = {"temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "min_p": st.floats(0, 0.5),
                     "top_k": st.integers(0, 50)}  # fmt: skip
        for name in ("temperature", "top_p", "min_p", "top_k"):
            if draw(st.booleans()):
                setattr(r.sampling, name, draw((i32 if name == "top_k" else floats) if hostile else plausible[name]))
        if draw(st.booleans()):
            r.sampling.seed = draw(st.integers(0, 2**64 - 1))

    def speculation(r: pb.GenerateRequest, draw, hostile: bool) -> None:
        if hostile:
            r.speculation.method = draw(st.sampled_from([0, 1, 2, 3, 7, -1]))
            r.speculation.disable = draw(st.booleans())
            for name in ("gamma", "gamma_max"):
                if draw(st.booleans()):
                    setattr(r.speculation, name, draw(st.one_of(st.integers(-2, 40), i32)))
            return
        r.speculation.method = draw(st.sampled_from([0, 1, 2, 3]))
        which = draw(st.sampled_from(["", "gamma", "gamma_max"]))
        if which:
            setattr(r.speculation, which, draw(st.integers(0 if which == "gamma" else 1, 8)))

    @st.composite
    def requests(draw) -> pb.GenerateRequest:
        n = draw(st.sampled_from([0, 0, 1, 1, 2, 3, len(FUZZ_FIELDS)]))
        hostile = draw(st.sets(st.sampled_from(FUZZ_FIELDS), min_size=n, max_size=n))
        r = pb.GenerateRequest()
        if "request_id" in hostile:
            r.request_id = draw(st.text(max_size=140))
        prompt(r, draw, "prompt" in hostile)
        sampling(r, draw, "sampling" in hostile)
        huge = st.one_of(st.integers(context_length + 1, 2**31 - 1), st.just(-(2**31)), st.integers(-3, 0))
        r.max_new_tokens = draw(huge if "max_new_tokens" in hostile else st.integers(1, 8))
        if "stop" in hostile:
            r.stop.extend(draw(st.one_of(st.lists(st.text(max_size=300), max_size=20),
                                         st.integers(17, 5000).map(lambda n: [f"s{i}" for i in range(n)]))))  # fmt: skip
        else:
            r.stop.extend(draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)))
        r.stop_token_ids.extend(draw(st.lists(token, max_size=70) if "stop_token_ids" in hostile
                                     else st.lists(in_vocab, max_size=4)))  # fmt: skip
        r.ignore_eos, r.logprobs = draw(st.booleans()), draw(st.booleans())
        speculation(r, draw, "speculation" in hostile)
        return r

    return requests()


def run_fuzz(address: str, cases: int, *, vocab_size: int, context_length: int, max_message_bytes: int,
             seed: int = 0, concurrency: int = 8, timeout_s: float = 120.0,
             progress: Callable[[int], None] | None = None) -> FuzzStats:  # fmt: skip
    """Send ``cases`` generated requests, ``concurrency`` at a time (Generate or GenerateStream); count outcomes."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    stats = FuzzStats()
    lock = threading.Lock()
    strategy = request_strategy(vocab_size, context_length, max_message_bytes)
    ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    stub = pb_grpc.SpecDecodeStub(ch)

    def one(r: pb.GenerateRequest, streamed: bool) -> None:
        outcome, problem = _fuzz_call(stub, r, streamed, timeout_s)
        with lock:
            stats.cases += 1
            stats.outcomes[outcome] += 1
            if problem:
                stats.bad.append(f"{problem}; request {_brief(r)}")

    @settings(max_examples=math.ceil(cases / concurrency), deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.lists(st.tuples(strategy, st.booleans()), min_size=concurrency, max_size=concurrency))
    def batch(items) -> None:
        items = items[: cases - stats.cases]
        threads = [threading.Thread(target=one, args=item, daemon=True) for item in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s + 30)
        if progress:
            progress(stats.cases)

    try:
        hypothesis.seed(seed)(batch)()
    finally:
        ch.close()
    return stats


def _fuzz_call(stub, r: pb.GenerateRequest, streamed: bool, timeout_s: float) -> tuple[str, str | None]:
    """(outcome, problem or None): OK must be consistent, an error must be an allowed code with a message."""
    try:
        if streamed:
            msgs = list(stub.GenerateStream(r, timeout=timeout_s))
            summary = msgs[-1].summary if msgs and msgs[-1].HasField("summary") else None
            n = sum(len(m.chunk.token_ids) for m in msgs if m.HasField("chunk"))
        else:
            resp = stub.Generate(r, timeout=timeout_s)
            summary, n = resp.summary, len(resp.token_ids)
    except grpc.RpcError as e:
        code = e.code().name
        if code not in FUZZ_OK:
            return code, f"{code}: {e.details()}"
        return code, None if e.details() else f"{code} without a message"
    if summary is None:
        return "OK", "a stream ended without a summary"
    if not 1 <= n == summary.usage.completion_tokens <= r.max_new_tokens:
        return "OK", f"OK with {n} tokens, {summary.usage.completion_tokens} counted, max_new_tokens {r.max_new_tokens}"
    return "OK", None


def _brief(r: pb.GenerateRequest) -> str:
    text = str(r).replace("\n", " ")
    return text if len(text) <= 400 else text[:400] + f"... ({r.ByteSize()} bytes)"


# ---- server process -----------------------------------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    address: str
    metrics_url: str
    log_path: Path


def spawn_server(target: str | None, draft: str | None, extra: list[str], workdir: Path,
                 timeout_s: float = 600.0) -> ServerProcess:  # fmt: skip
    """``specdec serve`` on 127.0.0.1 (ports picked by the OS; no target: the default pair); returns once SERVING."""
    port_file, out, log = workdir / "port", workdir / "serve.out", workdir / "serve.log"
    cmd = [sys.executable, "-m", "specdec.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
           "--port-file", str(port_file), "--log-level", "warning", *extra]  # fmt: skip
    cmd += ["--target", target] if target else []
    cmd += ["--draft", draft] if draft else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                                   os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    # Files, not pipes: a full pipe would block the server.
    proc = subprocess.Popen(cmd, stdout=out.open("w"), stderr=log.open("w"), env=env, cwd=workdir)
    end = time.monotonic() + timeout_s
    while not (port_file.exists() and "metrics on" in out.read_text()):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"specdec serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    address = f"127.0.0.1:{int(port_file.read_text())}"
    metrics_port = int(re.search(r"metrics on :(\d+)", out.read_text()).group(1))
    while health(address) != "SERVING":
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"specdec serve never became SERVING: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return ServerProcess(proc, address, f"http://127.0.0.1:{metrics_port}/metrics", log)


def health(address: str) -> str:
    try:
        with grpc.insecure_channel(address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
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


# ---- the command --------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="target model: directory, .gguf or hub id (default: the default pair, as serve)")
    p.add_argument("--draft", help="draft model (with --target; without one the server uses the n-gram drafter)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for specdec serve (repeatable), e.g. --serve-arg=--dtype=bfloat16")  # fmt: skip
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the first RSS reading (default 5)")
    p.add_argument("--clients", type=int, default=8, help="concurrent gRPC clients (default 8)")
    p.add_argument("--killed-clients", type=int, default=2, help="client processes killed mid-stream (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="largest checked request (default 16)")
    p.add_argument("--long-tokens", type=int, default=64, help="tokens asked by fault requests (default 64)")
    p.add_argument("--fuzz-cases", type=int, default=2000, help="fuzzed requests (default 2000; 0 skips)")
    p.add_argument("--fuzz-concurrency", type=int, default=8)
    p.add_argument("--max-message-bytes", type=int, default=1 << 20, help="the server's limit (default 1 MiB)")
    p.add_argument("--grace", type=float, default=2.0, help="the server's shutdown grace (default 2 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="write the summary as JSON")


def run(args: argparse.Namespace) -> dict:
    say = lambda msg: print(f"[loadtest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    workdir = Path(tempfile.mkdtemp(prefix="specdec-loadtest-"))
    serve_args = ["--max-message-bytes", str(args.max_message_bytes), "--grace", str(args.grace), *args.serve_arg]
    say(f"starting specdec serve ({workdir / 'serve.log'})")
    server = spawn_server(args.target, args.draft, serve_args, workdir)
    summary: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}}
    try:
        with grpc.insecure_channel(server.address) as ch:
            info = pb_grpc.SpecDecodeStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        methods = ("none", "ngram") + (("draft",) if info.draft else ())
        say(f"serving {info.target} / {info.draft or 'no draft'} at {server.address}; references")
        ref = reference(server.address, max_new_tokens=args.max_new_tokens, long_tokens=args.long_tokens)
        say(f"warm-up load {args.warmup:.0f} s")
        warm = run_load(server.address, ref, clients=args.clients, duration_s=args.warmup, methods=methods, seed=args.seed + 1)
        rss_start = rss_bytes(server.proc.pid)
        say(f"load {args.duration:.0f} s with {args.clients} clients, {args.killed_clients} killed client processes")
        killer = LoadStats()
        kt = threading.Thread(target=lambda: killer.add(kill_clients(server.address, ref, args.killed_clients)), daemon=True)
        kt.start()
        load = run_load(server.address, ref, clients=args.clients, duration_s=args.duration, methods=methods, seed=args.seed)
        kt.join(300)
        load.add(killer)
        idle_after_load = wait_idle(lambda: idle_counts(server.metrics_url))
        say(f"fuzz: {args.fuzz_cases} cases")
        fuzz = FuzzStats()
        if args.fuzz_cases:
            fuzz = run_fuzz(server.address, args.fuzz_cases, vocab_size=info.vocab_size, context_length=info.context_length,
                            max_message_bytes=args.max_message_bytes, seed=args.seed, concurrency=args.fuzz_concurrency,
                            progress=lambda n: n % 200 < args.fuzz_concurrency and say(f"fuzz {n}/{args.fuzz_cases}"))  # fmt: skip
        idle_after_fuzz = wait_idle(lambda: idle_counts(server.metrics_url))
        healthy = health(server.address) == "SERVING"
        rss_end = rss_bytes(server.proc.pid)
        served = scrape(server.metrics_url)
        say("SIGTERM under load")
        term = sigterm_under_load(server, ref, args.clients)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    load.add(warm)
    summary.update(
        models={"target": info.target, "draft": info.draft},
        load={k: v for k, v in asdict(load).items() if k not in ("mismatches", "errors")}
        | {"mismatches": len(load.mismatches), "errors": len(load.errors), "examples": (load.mismatches + load.errors)[:10]},
        server_counts={k.removeprefix("specdec_"): v for k, v in served.items()
                       if k.startswith("specdec_requests_") and "_created" not in k},  # fmt: skip
        idle_after_load=idle_after_load,
        idle_after_fuzz=idle_after_fuzz,
        fuzz={"cases": fuzz.cases, "outcomes": dict(fuzz.outcomes), "bad": len(fuzz.bad), "examples": fuzz.bad[:10]},
        healthy_after_fuzz=healthy,
        rss_bytes={"after_warmup": rss_start, "end": rss_end, "growth": rss_end / rss_start - 1},
        sigterm=term,
    )
    summary["server_log"] = str(server.log_path)
    summary["ok"] = bool(
        not load.errors and not load.mismatches and not fuzz.bad and healthy and not any(idle_after_load.values())
        and not any(idle_after_fuzz.values()) and term["exit_code"] == 0 and not term["hung"]
        and set(term["outcomes"]) <= {"finished", "UNAVAILABLE"} and summary["rss_bytes"]["growth"] < 0.10
    )  # fmt: skip
    if summary["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)  # the server's log is kept only when something failed
    return summary


def format_summary(s: dict) -> str:
    ld, fz, rss, term = s["load"], s["fuzz"], s["rss_bytes"], s["sigterm"]
    lines = [
        f"models: {s['models']['target']} / {s['models']['draft'] or '(n-gram)'}",
        f"load: {ld['requests']} requests, {ld['served']} served and checked ({ld['tokens']} tokens), "
        f"{ld['mismatches']} mismatches, {ld['errors']} errors",
        f"faults: {ld['cancels']} cancels, {ld['deadlines']} deadline expiries ({ld['deadlines_mid_generation']} "
        f"mid-generation), {ld['disconnects']} channels closed, {ld['killed_clients']} client processes killed",
        "server counts: " + ", ".join(f"{k} {v:g}" for k, v in sorted(s["server_counts"].items())),
        f"idle after load: {s['idle_after_load']}; after fuzz: {s['idle_after_fuzz']}",
        f"fuzz: {fz['cases']} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(fz["outcomes"].items()))
        + f"; {fz['bad']} bad; healthy afterwards: {s['healthy_after_fuzz']}",
        f"RSS: {rss['after_warmup'] / 2**20:.1f} MiB after warm-up, {rss['end'] / 2**20:.1f} MiB at the end "
        f"({rss['growth']:+.1%})",
        f"SIGTERM with {term['in_flight_at_signal']}/{term['streams']} streams in flight: {term['outcomes']}, "
        f"{term['hung']} hung, exit code {term['exit_code']} after {term['exit_s']:.1f} s",
        *(f"  example: {e}" for e in ld["examples"] + fz["examples"]),
        "result: " + ("OK" if s["ok"] else f"FAILED (server log: {s['server_log']})"),
    ]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    if args.draft and not args.target:
        print("specdec loadtest: --draft needs --target", file=sys.stderr)
        return 2
    if args.clients < 1 or args.duration <= 0 or args.max_new_tokens < 1 or args.long_tokens < 1:
        print("specdec loadtest: --clients, --duration, --max-new-tokens and --long-tokens must be positive", file=sys.stderr)
        return 2
    summary = run(args)
    print(format_summary(summary))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec loadtest", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
