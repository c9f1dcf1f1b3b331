"""Load with faults: references each prompt alone, then many clients checked against them, with cancels,
expiring deadlines, closed channels and killed client processes."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

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


def kill_clients(address: str, ref: Reference, count: int, timeout_s: float = 120.0) -> LoadStats:
    """``count`` client processes, each SIGKILLed once its stream is running (the kernel closes its socket)."""
    stats = LoadStats()
    cmd = [sys.executable, "-m", "specdec.loadtest.killed_client", address, PROMPTS[0], str(ref.long_tokens)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
