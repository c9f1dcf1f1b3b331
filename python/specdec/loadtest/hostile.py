"""Hostile clients: streams that are never read, prompts too large to tokenize, and Benchmark calls past the limits
or cancelled midway. Each must leave the other traffic served: a probe Generate still completes, a running stream
keeps its pace."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from specdec.loadtest.load import PROMPTS, greedy_request
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

# A channel whose client-side HTTP/2 window is small: once its client stops reading, the server's writes block
# after a few chunks instead of after a default window's worth of them.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


@dataclass
class HostileStats:
    unread_streams: int = 0  # streams opened and never read
    oversized_prompts: int = 0  # text prompts too large for the prompt-token limit
    benchmarks: int = 0  # Benchmark calls over the limits, or cancelled after their first progress message
    probes: int = 0  # Generates sent while the hostile clients were at it
    longest_stall_s: float = 0.0  # the longest gap between a running stream's chunks during the oversized prompts
    bad: list[str] = field(default_factory=list)  # a probe not served, a wrong status, a stream stalled


def _probe(stub, timeout_s: float, stats: HostileStats, what: str) -> None:
    stats.probes += 1
    try:
        r = stub.Generate(greedy_request(PROMPTS[1], 4), timeout=timeout_s)
        if r.summary.usage.completion_tokens != 4:
            stats.bad.append(f"probe during {what}: {r.summary.usage.completion_tokens} tokens, expected 4")
    except grpc.RpcError as e:
        stats.bad.append(f"probe during {what}: {e.code().name}: {e.details()}")


def unread_streams(address: str, count: int, tokens: int, hold_s: float, probe_timeout_s: float) -> HostileStats:
    """``count`` streams that read nothing, held for ``hold_s``; a probe Generate must be served meanwhile."""
    stats = HostileStats(unread_streams=count)
    channels = [grpc.insecure_channel(address, options=SMALL_WINDOW) for _ in range(count)]
    calls = [pb_grpc.SpecDecodeStub(ch).GenerateStream(greedy_request(PROMPTS[0], tokens), timeout=hold_s + 600)
             for ch in channels]  # fmt: skip
    try:
        time.sleep(hold_s)
        with grpc.insecure_channel(address) as ch:
            _probe(pb_grpc.SpecDecodeStub(ch), probe_timeout_s, stats, "unread streams")
    finally:
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
    return stats


def oversized_prompts(address: str, count: int, text_bytes: int, stall_limit_s: float) -> HostileStats:
    """``count`` text prompts of ``text_bytes`` (beyond any prompt-token limit) beside a running stream: each gets
    INVALID_ARGUMENT naming max_prompt_tokens, and the stream's chunks keep coming."""
    stats = HostileStats(oversized_prompts=count)
    text = "x" * text_bytes
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SpecDecodeStub(ch)
        stream = stub.GenerateStream(greedy_request(PROMPTS[0], 64), timeout=600)
        it = iter(stream)
        next(it, None)
        done = threading.Event()

        def send() -> None:
            for _ in range(count):
                try:
                    stub.Generate(pb.GenerateRequest(text=text, max_new_tokens=2), timeout=120)
                    stats.bad.append("an oversized prompt was served")
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.INVALID_ARGUMENT or "max_prompt_tokens" not in (e.details() or ""):
                        stats.bad.append(f"oversized prompt: {e.code().name}: {e.details()}")
            done.set()

        sender = threading.Thread(target=send, daemon=True)
        last = time.monotonic()
        sender.start()
        for _ in it:
            now = time.monotonic()
            stats.longest_stall_s = max(stats.longest_stall_s, now - last)
            last = now
            if done.is_set():
                break
        stream.cancel()
        sender.join(300)
    if stats.longest_stall_s > stall_limit_s:
        stats.bad.append(f"a running stream stalled {stats.longest_stall_s:.2f} s during the oversized prompts")
    return stats


def benchmarks(address: str, max_new_tokens_over: int, probe_timeout_s: float) -> HostileStats:
    """A Benchmark over the token limit (INVALID_ARGUMENT), and one cancelled after its first progress message,
    after which a probe Generate must be served within ``probe_timeout_s``."""
    stats = HostileStats(benchmarks=2)
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SpecDecodeStub(ch)
        try:
            list(stub.Benchmark(pb.BenchmarkRequest(prompts=[PROMPTS[0]], warmup=0, max_new_tokens=max_new_tokens_over,
                                                    no_chat_template=True), timeout=120))  # fmt: skip
            stats.bad.append("a Benchmark over the max_new_tokens limit ran")
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
                stats.bad.append(f"Benchmark over the limit: {e.code().name}: {e.details()}")
        call = stub.Benchmark(pb.BenchmarkRequest(prompts=PROMPTS, warmup=0, max_new_tokens=16, no_chat_template=True),
                              timeout=600)  # fmt: skip
        try:
            next(iter(call), None)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                stats.bad.append(f"Benchmark: {e.code().name}: {e.details()}")
        call.cancel()
        _probe(stub, probe_timeout_s, stats, "a cancelled Benchmark")
    return stats


def run_hostile(address: str, *, unread: int, tokens: int, oversized: int, text_bytes: int, max_new_tokens_over: int,
                hold_s: float = 5.0, probe_timeout_s: float = 30.0, stall_limit_s: float = 5.0) -> HostileStats:  # fmt: skip
    """All three, one after another; the stats added up."""
    total = HostileStats()
    for part in (
        unread_streams(address, unread, tokens, hold_s, probe_timeout_s),
        oversized_prompts(address, oversized, text_bytes, stall_limit_s),
        benchmarks(address, max_new_tokens_over, probe_timeout_s),
    ):
        for name, value in vars(part).items():
            current = getattr(total, name)
            setattr(total, name, max(current, value) if name == "longest_stall_s" else current + value)
    return total
