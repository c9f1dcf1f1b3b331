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
5. hostile clients: streams that are never read (a probe Generate must still be served), text prompts too large
   for the prompt-token limit beside a running stream (INVALID_ARGUMENT, the stream keeps its pace), a Benchmark
   over the limits and one cancelled midway (a probe Generate is served right after);
6. RSS of the server after the warm-up and at the end; then SIGTERM with streams in flight: each finishes or
   gets UNAVAILABLE, and the server exits 0.

It prints one summary (and ``--json`` writes it). Exit status 0 only when nothing went wrong. The functions
work against any address, so the tests run them against an in-process server too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import grpc

from specdec.loadtest.fuzz import FuzzStats, run_fuzz
from specdec.loadtest.hostile import run_hostile
from specdec.loadtest.load import PROMPTS, LoadStats, kill_clients, reference, run_load
from specdec.loadtest.server_process import (
    health,
    idle_counts,
    rss_bytes,
    scrape,
    sigterm_under_load,
    spawn_server,
    wait_idle,
)
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc


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
    p.add_argument("--unread-streams", type=int, default=10, help="streams opened and never read (default 10)")
    p.add_argument("--oversized-prompts", type=int, default=4,
                   help="text prompts of about --max-message-bytes, too large to tokenize (default 4)")  # fmt: skip
    p.add_argument("--prompt-prefix-file", type=Path, default=None, metavar="FILE",
                   help="text put before every load prompt, e.g. a long system prompt that loads the prefix cache "
                        "(python/specdec/bench/data/system_prompt.txt)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", help="write the summary as JSON")


def run(args: argparse.Namespace) -> dict:
    say = lambda msg: print(f"[loadtest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    workdir = Path(tempfile.mkdtemp(prefix="specdec-loadtest-"))
    serve_args = ["--max-message-bytes", str(args.max_message_bytes), "--grace", str(args.grace), *args.serve_arg]
    say(f"starting specdec serve ({workdir / 'serve.log'})")
    server = spawn_server(args.target, args.draft, serve_args, workdir)
    summary: dict = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "startup_s": server.startup_s,
                     "rss_bytes_serving": rss_bytes(server.proc.pid)}  # fmt: skip
    try:
        with grpc.insecure_channel(server.address) as ch:
            info = pb_grpc.SpecDecodeStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        methods = ("none", "ngram") + (("draft",) if info.draft else ())
        say(f"serving {info.target} / {info.draft or 'no draft'} at {server.address}; references")
        prefix = args.prompt_prefix_file.read_text(encoding="utf-8") + "\n\n" if args.prompt_prefix_file else ""
        ref = reference(server.address, max_new_tokens=args.max_new_tokens, long_tokens=args.long_tokens,
                        prompts=[prefix + p for p in PROMPTS])  # fmt: skip
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
        say(f"hostile clients: {args.unread_streams} unread streams, {args.oversized_prompts} oversized prompts, "
            "Benchmark calls")  # fmt: skip
        hostile = run_hostile(server.address, unread=args.unread_streams, tokens=min(4000, info.context_length // 2),
                              oversized=args.oversized_prompts, text_bytes=args.max_message_bytes * 9 // 10,
                              max_new_tokens_over=info.context_length + 1, probe_timeout_s=300.0)  # fmt: skip
        idle_after_hostile = wait_idle(lambda: idle_counts(server.metrics_url))
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
        hostile={k: v for k, v in asdict(hostile).items() if k != "bad"} | {"bad": len(hostile.bad),
                                                                              "examples": hostile.bad[:10]},
        idle_after_hostile=idle_after_hostile,
        fuzz={"cases": fuzz.cases, "outcomes": dict(fuzz.outcomes), "bad": len(fuzz.bad), "examples": fuzz.bad[:10]},
        healthy_after_fuzz=healthy,
        rss_bytes={"after_warmup": rss_start, "end": rss_end, "growth": rss_end / rss_start - 1},
        prefix_cache={name: served.get(f"specdec_prefix_cache_{name}", 0.0)
                      for name in ("bytes", "hit_tokens_total", "queried_tokens_total")},  # fmt: skip
        sigterm=term,
    )
    summary["server_log"] = str(server.log_path)
    summary["ok"] = bool(
        not load.errors and not load.mismatches and not fuzz.bad and not hostile.bad and healthy
        and not any(idle_after_load.values()) and not any(idle_after_fuzz.values())
        and not any(idle_after_hostile.values()) and term["exit_code"] == 0 and not term["hung"]
        and set(term["outcomes"]) <= {"finished", "UNAVAILABLE"} and summary["rss_bytes"]["growth"] < 0.10
    )  # fmt: skip
    if summary["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)  # the server's log is kept only when something failed
    return summary


def format_summary(s: dict) -> str:
    ld, fz, hs, rss, term = s["load"], s["fuzz"], s["hostile"], s["rss_bytes"], s["sigterm"]
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
        f"hostile: {hs['unread_streams']} unread streams, {hs['oversized_prompts']} oversized prompts (longest stall "
        f"of a running stream {hs['longest_stall_s']:.2f} s), {hs['benchmarks']} Benchmark calls, {hs['probes']} "
        f"probes; {hs['bad']} bad; idle afterwards: {s['idle_after_hostile']}",
        f"start: SERVING after {s['startup_s']:.1f} s with {s['rss_bytes_serving'] / 2**20:.1f} MiB resident; "
        f"RSS: {rss['after_warmup'] / 2**20:.1f} MiB after warm-up, {rss['end'] / 2**20:.1f} MiB at the end "
        f"({rss['growth']:+.1%})",
        f"prefix cache: {s['prefix_cache']['bytes'] / 2**20:.1f} MiB held at the end; "
        f"{s['prefix_cache']['hit_tokens_total']:g} of {s['prefix_cache']['queried_tokens_total']:g} looked-up prompt "
        "tokens hit",
        f"SIGTERM with {term['in_flight_at_signal']}/{term['streams']} streams in flight: {term['outcomes']}, "
        f"{term['hung']} hung, exit code {term['exit_code']} after {term['exit_s']:.1f} s",
        *(f"  example: {e}" for e in ld["examples"] + fz["examples"] + hs["examples"]),
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
