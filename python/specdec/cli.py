"""``specdec``: serve | generate | bench | models | health.

    specdec serve [--target T --draft D]     serve (no model given: the default pair, fetched on first use)
    specdec generate "prompt"                stream a completion from a server, then a stats line
    specdec bench [...]                      the benchmark (see ``specdec.bench``)
    specdec models fetch [ROLE...] | list    the default models
    specdec health                           exit 0 only when the server reports SERVING
    specdec loadtest [--target T --draft D]  load, faults and fuzz against a server on loopback (bounded)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from specdec import torch_env
from specdec.backends import NAMES
from specdec.types import GAMMA_LIMIT, PRECISIONS, Method

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9090


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a target (and draft) model over gRPC",
                       description="Serve over gRPC. With no --target, serves the default pair (fetched on first use).")  # fmt: skip
    m = p.add_argument_group("models")
    m.add_argument("--target", help="target model: directory, .gguf file or hub id (default: the default pair)")
    m.add_argument("--draft", help="draft model (default: the default pair's draft when --target is not given)")
    m.add_argument("--dtype", default="auto", choices=PRECISIONS,
                   help="target precision: gguf = a .gguf file's quantised weights as stored; int8/q4 = linear layers "
                        "quantised at load; float32/bfloat16/float16; auto = gguf for a .gguf file on a CPU, else float32")  # fmt: skip
    m.add_argument("--draft-dtype", default="auto", choices=PRECISIONS,
                   help="draft precision, as --dtype; auto = q4 for a .gguf file on a CPU (requantised from the stored values), "
                        "int8 for a float model on a CPU, bfloat16 on a GPU")  # fmt: skip
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: one per core)")
    m.add_argument("--kernels", choices=list(NAMES), default="cpu",
                   help="acceptance/sampling kernels: cpu (C++), tt (stock ttnn operations on a Tenstorrent device) or "
                        "tt-custom (the custom tt-metal program there); neither tt path has yet run on hardware")  # fmt: skip
    m.add_argument("--draft-vocab", type=int, default=None,
                   help="the draft scores only the N most frequent token ids (0: all; default: the engine's)")
    m.add_argument("--prefill-chunk", type=int, default=256,
                   help="prefill a longer prompt this many tokens per step, so running requests keep streaming "
                        "(default 256; 0: the whole prompt in one forward)")  # fmt: skip
    m.add_argument("--prefix-cache-bytes", type=int, default=None,
                   help="bytes of prompt keys and values kept for later requests with the same prefix (target and "
                        "draft together; default: 1/16 of the machine's memory, at most 2 GiB; 0: off)")  # fmt: skip
    s = p.add_argument_group("speculation")
    s.add_argument("--method", choices=["draft", "ngram", "suffix", "auto", "none"], default="auto",
                   help="default drafter: auto (the default), the hybrid of suffix drafting and the draft model: about "
                        "as fast as the draft model alone on text that does not repeat, far faster on text that does "
                        "(docs/benchmarks.md; suffix alone without a draft model); draft falls back to ngram without a "
                        "draft model")  # fmt: skip
    g = s.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=int, default=None, help="fixed γ (default: adaptive)")
    g.add_argument("--gamma-max", type=int, default=8, help="upper bound of adaptive γ (default 8)")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    n.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"gRPC port (default {DEFAULT_PORT}; 0 picks one)")
    n.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"Prometheus /metrics port (default {DEFAULT_METRICS_PORT}; 0 picks one)")  # fmt: skip
    n.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    n.add_argument("--port-file", help="write the bound gRPC port to this file once listening")
    n.add_argument("--max-message-bytes", type=int, default=4 << 20, help="largest request/response (default 4 MiB)")
    n.add_argument("--no-reflection", action="store_true", help="switch off gRPC server reflection")
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", help="PEM certificate chain of the server (with --tls-key: TLS)")
    sec.add_argument("--tls-key", help="PEM private key of the server")
    sec.add_argument("--tls-client-ca", help="PEM CA bundle; client certificates signed by it are required (mTLS)")
    sec.add_argument("--auth-token-file",
                     help="file holding a shared secret; every call but health then needs 'authorization: Bearer "
                          "<token>' (default: $SPECDEC_AUTH_TOKEN if set, else no token auth)")  # fmt: skip
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-prompt-tokens", type=int, default=8192, help="prompt tokens per request (default 8192)")
    lim.add_argument("--max-new-tokens-limit", type=int, default=None,
                     help="largest max_new_tokens a request may ask for (default: the target's context length)")  # fmt: skip
    lim.add_argument("--max-stop-strings", type=int, default=16, help="stop strings per request (default 16)")
    lim.add_argument("--max-stop-length", type=int, default=256, help="characters per stop string (default 256)")
    lim.add_argument("--max-concurrent-streams", type=int, default=128,
                     help="Generate/GenerateStream calls in flight beyond which RESOURCE_EXHAUSTED (default 128)")  # fmt: skip
    lim.add_argument("--max-gamma", type=int, default=None,
                     help="largest gamma or gamma_max a request may ask for (default: the server's own largest γ, "
                          "--gamma or --gamma-max)")  # fmt: skip
    lim.add_argument("--max-unread-chunks", type=int, default=64,
                     help="a stream with this many chunks unread by its client leaves the running batch until it reads "
                          "(default 64)")  # fmt: skip
    lim.add_argument("--unread-timeout", type=float, default=60.0,
                     help="seconds a stream may stay out of the batch unread before it is cancelled (default 60)")  # fmt: skip
    bm = p.add_argument_group("benchmark RPC")
    bm.add_argument("--no-benchmark-rpc", action="store_true", help="switch the Benchmark RPC off (UNIMPLEMENTED)")
    bm.add_argument("--max-benchmark-seconds", type=float, default=300.0,
                    help="one Benchmark call holds the engine at most this long, then fails RESOURCE_EXHAUSTED "
                         "(default 300)")  # fmt: skip
    n.add_argument("--expose-model-paths", action="store_true",
                   help="GetModelInfo reports the models' paths (default: their file names only)")
    q = p.add_argument_group("admission")
    q.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which RESOURCE_EXHAUSTED (default 64)")
    q.add_argument("--max-running", type=int, default=8, help="requests stepped together (default 8)")
    q.add_argument("--grace", type=float, default=30.0, help="seconds in-flight calls get on SIGTERM (default 30)")
    lg = p.add_argument_group("logging")
    lg.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    lg.add_argument("--log-format", default="json", choices=["json", "text"])
    p.set_defaults(func=cmd_serve)


def _add_client_security(p) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root CAs")
    g.add_argument("--tls-ca", help="PEM CA bundle that signed the server's certificate (implies --tls)")
    g.add_argument("--tls-cert", help="PEM client certificate for mTLS (implies --tls)")
    g.add_argument("--tls-key", help="PEM client private key for mTLS")
    g.add_argument("--server-name", help="name to check in the server's certificate (default: from --address)")
    g.add_argument("--auth-token-file", help="file holding the bearer token (default: $SPECDEC_AUTH_TOKEN if set)")


def _client(args: argparse.Namespace, **kw):
    from specdec.client import Client
    from specdec.serving.security import load_token

    return Client(args.address, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                  server_name=args.server_name, token=load_token(args.auth_token_file), **kw)  # fmt: skip


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from a running server")
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    p.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORT}")
    _add_client_security(p)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (the target's chat template)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the server's (64)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the server's default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--method", choices=["draft", "ngram", "suffix", "auto", "none"], default=None,
                   help="override the server's drafter")  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=int, default=None)
    g.add_argument("--gamma-max", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON instead of streaming")
    p.set_defaults(func=cmd_generate)


def _add_bench(sub, full: bool) -> None:
    p = sub.add_parser("bench", help="benchmark baseline vs speculative (vs transformers) decoding",
                       add_help=full)  # fmt: skip
    if not full:  # bench's options import torch: only for `specdec bench` itself, so other commands start fast
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    try:
        from specdec import bench
    except ImportError as e:  # a broken install (torch missing): say so instead of a traceback
        message = f"specdec bench is unavailable: {e}"
        p.set_defaults(func=lambda args: _fail(message))
        return
    bench.add_arguments(p)
    p.set_defaults(func=bench.run_cli)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="fetch or list the default models")
    msub = p.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="download, join, check and convert the default models (idempotent)")
    f.add_argument("roles", nargs="*", help="target, draft, small (default: target and draft)")
    f.set_defaults(func=cmd_models_fetch)
    lst = msub.add_parser("list", help="list the default models and whether they are in the cache")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_models_list)


def _add_health(sub) -> None:
    p = sub.add_parser("health", help="exit 0 only when the server reports SERVING")
    p.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORT}")
    p.add_argument("--service", default="", help='the service to check (default "": the whole server)')
    p.add_argument("--timeout", type=float, default=5.0)
    _add_client_security(p)
    p.set_defaults(func=cmd_health)


def _add_loadtest(sub) -> None:
    from specdec.loadtest import cli as loadtest

    p = sub.add_parser("loadtest", help="load, faults and fuzz against a server on loopback, bounded in time",
                       description=loadtest.__doc__.split("\n\n")[0])  # fmt: skip
    loadtest.add_arguments(p)
    p.set_defaults(func=loadtest.run_cli)


def build_parser(command: str | None = "bench") -> argparse.ArgumentParser:
    """The full parser; the bench subcommand gets its (torch-importing) options only when ``command`` is bench."""
    parser = argparse.ArgumentParser(prog="specdec", description="Exact speculative decoding served over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_bench(sub, command == "bench")
    _add_models(sub)
    _add_health(sub)
    _add_loadtest(sub)
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"specdec: {message}", file=sys.stderr)
    return code


# ---- serve --------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from specdec.serving.metrics import setup_logging

    setup_logging(args.log_level, args.log_format)
    if args.draft and not args.target:
        return _fail("--draft needs --target")
    if args.gamma is not None and not 0 <= args.gamma <= GAMMA_LIMIT:
        return _fail(f"--gamma must be in [0, {GAMMA_LIMIT}], got {args.gamma}")
    if not 1 <= args.gamma_max <= GAMMA_LIMIT:
        return _fail(f"--gamma-max must be in [1, {GAMMA_LIMIT}], got {args.gamma_max}")
    if args.prefill_chunk < 0:
        return _fail(f"--prefill-chunk must be >= 0 (0: the whole prompt in one forward), got {args.prefill_chunk}")
    if args.prefix_cache_bytes is not None and args.prefix_cache_bytes < 0:
        return _fail(f"--prefix-cache-bytes must be >= 0 (0: off), got {args.prefix_cache_bytes}")
    if args.max_queue < 0 or args.max_running < 1:
        return _fail("--max-queue must be >= 0 and --max-running >= 1")
    if args.threads is not None and args.threads < 1:
        return _fail(f"--threads must be >= 1, got {args.threads}")
    if args.max_gamma is not None and not 0 <= args.max_gamma <= GAMMA_LIMIT:
        return _fail(f"--max-gamma must be in [0, {GAMMA_LIMIT}], got {args.max_gamma}")
    if not args.max_benchmark_seconds > 0 or not args.unread_timeout > 0:
        return _fail("--max-benchmark-seconds and --unread-timeout must be > 0")
    for name in ("max_prompt_tokens", "max_new_tokens_limit", "max_stop_strings", "max_stop_length",
                 "max_concurrent_streams", "max_message_bytes", "max_unread_chunks"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_stop_strings" else 1):
            return _fail(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_stop_strings' else 1}, got {value}")
    from specdec.serving.security import load_token, server_credentials

    try:
        server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)  # fails early on a bad pair or path
        args.auth_token = load_token(args.auth_token_file)
    except (ValueError, UnicodeDecodeError) as err:
        return _fail(str(err))
    from specdec.backends import open_backend

    try:
        args.kernel_backend = open_backend(args.kernels)
    except RuntimeError as err:
        return _fail(str(err))
    try:
        code = asyncio.run(_serve(args))
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers are in place
        code = 130
    return _leave(code)


def _leave(code: int) -> int:
    """Return ``code``, or end the process with it at once while a specdec thread still runs: a model load, or an
    engine step that outlived the scheduler's stop. The interpreter's finalization would run C++ destructors (torch's
    thread pools) under that thread and abort the process, where the exit code must say how the server ended."""
    if any(t.is_alive() for t in threading.enumerate() if t.name.startswith("specdec-")):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _loader(args: argparse.Namespace):
    def load():
        from specdec.engine import Engine, EngineConfig

        target, draft = args.target, args.draft
        if target is None:
            from specdec.models.fetch import default_pair

            target, draft = default_pair()
        method = Method(args.method)
        if method == Method.DRAFT and draft is None:
            logging.getLogger("specdec.cli").warning("no --draft given: serving with the n-gram drafter")
            method = Method.NGRAM
        if method not in (Method.DRAFT, Method.AUTO):
            draft = None  # no need to hold a draft model the server will not use
        config = EngineConfig(method=method, gamma=args.gamma, gamma_max=args.gamma_max, prefill_chunk=args.prefill_chunk,
                              prefix_cache_bytes=args.prefix_cache_bytes,
                              **({} if args.draft_vocab is None else {"draft_vocab": args.draft_vocab}))  # fmt: skip
        return Engine.load(target, draft, dtype=args.dtype, draft_dtype=args.draft_dtype, device=args.device,
                           threads=args.threads, config=config, kernels=args.kernel_backend)  # fmt: skip

    return load


async def _serve(args: argparse.Namespace) -> int:
    from specdec.serving.server import ServerConfig, SpecDecServer
    from specdec.serving.wire import Limits

    log = logging.getLogger("specdec.cli")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.no_metrics else args.metrics_port,
        max_queue=args.max_queue,
        max_running=args.max_running,
        grace_s=args.grace,
        max_message_bytes=args.max_message_bytes,
        reflection=not args.no_reflection,
        limits=Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens_limit,
                      max_stop_strings=args.max_stop_strings, max_stop_length=args.max_stop_length,
                      max_gamma=args.max_gamma),  # fmt: skip
        max_concurrent_streams=args.max_concurrent_streams,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=args.auth_token,
        benchmark_rpc=not args.no_benchmark_rpc,
        max_benchmark_s=args.max_benchmark_seconds,
        max_unread=args.max_unread_chunks,
        unread_timeout_s=args.unread_timeout,
        expose_model_paths=args.expose_model_paths,
    )
    server = SpecDecServer(config, loader=_loader(args))
    port = await server.start()
    metrics = f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"specdec serve: listening on {args.host}:{port}{metrics}", flush=True)
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(args.port_file)

    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("signal received: draining", extra={"fields": {"signal": signal.Signals(signum).name}})
            server.shutdown()
        else:  # the operator wants it gone: no more waiting for the engine
            log.warning("second signal: stopping now")
            _exit_now(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.wait_ready()
    except Exception as e:
        log.error("could not load the models: %s", e)
        await server.shutdown(0.0)
        return 1
    await server.wait_closed()
    return 0


# ---- generate -----------------------------------------------------------------------------------


def _request_from_args(args: argparse.Namespace):
    from specdec.client import build_request

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        method=args.method,
        gamma=args.gamma,
        gamma_max=args.gamma_max,
    )
    if args.chat:
        return build_request(messages=[{"role": "user", "content": prompt}], **kw)
    return build_request(prompt, **kw)


def stats_line(summary) -> str:
    """One line of completion statistics (for the terminal)."""
    from specdec.v1 import specdec_pb2 as pb

    u, t, s = summary.usage, summary.timing, summary.speculation
    reason = pb.FinishReason.Name(summary.finish_reason).removeprefix("FINISH_REASON_").lower()
    parts = [
        f"{u.completion_tokens} tokens in {t.e2e_s:.2f} s ({t.tokens_per_s:.1f} tok/s, decode {t.decode_tokens_per_s:.1f} tok/s)",
        f"TTFT {t.ttft_s * 1000:.0f} ms",
        f"queue {t.queue_s * 1000:.0f} ms",
        f"{s.method}: acceptance {s.acceptance_rate:.0%} ({s.accepted}/{s.proposed})",
        f"mean accepted length {s.mean_accepted_length:.2f} over {s.verify_steps} steps",
        f"finish {reason}" + (f" {summary.matched_stop!r}" if summary.matched_stop else ""),
        f"seed {summary.seed}",
    ]
    return "[" + " | ".join(parts) + "]"


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    try:
        request = _request_from_args(args)
        client = _client(args, timeout=args.timeout)
    except ValueError as e:
        return _fail(str(e))
    with client:
        try:
            if args.json:
                response = client.generate_request(request)
                print(json_format.MessageToJson(response, preserving_proto_field_name=True, ensure_ascii=False))
                return 0
            summary = None
            for message in client.stream_request(request):
                if message.HasField("chunk"):
                    sys.stdout.write(message.chunk.text)
                    sys.stdout.flush()
                else:
                    summary = message.summary
            sys.stdout.write("\n")
            if summary is not None:
                print(stats_line(summary), file=sys.stderr)
            return 0
        except grpc.RpcError as e:
            sys.stdout.flush()
            return _fail(f"{e.code().name}: {e.details()}", 1)


# ---- models / health ----------------------------------------------------------------------------


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from specdec.models import fetch

    roles = args.roles or list(fetch.DEFAULT_ROLES)
    unknown = [r for r in roles if r not in fetch.MODELS]
    if unknown:
        return _fail(f"unknown role(s) {', '.join(unknown)}; choose from {', '.join(fetch.MODELS)}")
    try:
        paths = fetch.fetch(roles)
    except fetch.FetchError as e:
        return _fail(str(e), 1)
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from specdec.models import fetch

    models = fetch.list_models()
    if args.json:
        print(json.dumps(models, indent=2, default=str))
        return 0
    for m in models:
        print("  ".join(f"{k}={v}" for k, v in m.items()))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc

    try:
        client = _client(args)
    except ValueError as e:
        return _fail(str(e))
    with client:
        try:
            status = client.health(args.service, timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}")
            return 1
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in ("serve", "bench"):  # they run the engine: before anything loads torch
        torch_env.prepare()
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `specdec generate ... | head`
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
