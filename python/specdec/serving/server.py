"""The gRPC server (grpc.aio): SpecDecode, health, reflection, admission, deadlines, shutdown, metrics.

Life of the server:
1. ``start()`` binds the port with health NOT_SERVING, starts the metrics endpoint and loads the models on a
   thread (a model fetch included); calls meanwhile get UNAVAILABLE.
2. Loaded: the scheduler starts and health turns SERVING for "" and ``specdec.v1.SpecDecode``.
3. ``shutdown()`` (SIGTERM/SIGINT in ``specdec serve``): health NOT_SERVING, new calls get UNAVAILABLE,
   in-flight calls may finish within the grace period; then the rest are cancelled (UNAVAILABLE) and the
   server stops.

Status codes: a bad field INVALID_ARGUMENT (never INTERNAL for user error); a full queue RESOURCE_EXHAUSTED
with a retry hint (message and the ``grpc-retry-pushback-ms`` trailer); loading or shutting down UNAVAILABLE;
the client's deadline DEADLINE_EXCEEDED; a failure inside the engine INTERNAL naming the request id (logged
with its traceback; the server keeps serving).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from jinja2 import TemplateError
from grpc_reflection.v1alpha import reflection, reflection_pb2

from specdec import bench
from specdec.bench.environment import rss_bytes
from specdec.engine.scheduler import Closed, Handle, JobCancelled, JobOverLimit, QueueFull, Scheduler
from specdec.models import isa
from specdec.serving.metrics import Metrics
from specdec.serving.security import TokenAuthInterceptor, server_credentials
from specdec.serving.wire import (
    Limits,
    check_gamma,
    check_max_new_tokens,
    engine_message,
    method_from_proto,
    model_info_to_proto,
    new_request_id,
    parse_request,
    response_to_proto,
    sampling_from_proto,
    summary_to_proto,
    top_logprobs_to_proto,
    with_tenant,
)
from specdec.types import Completion, FinishReason, Method
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

log = logging.getLogger("specdec.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecDecode"].full_name  # "specdec.v1.SpecDecode"
HEALTH_SERVICES = ("", SERVICE_NAME)
MAX_BENCHMARK_PROMPTS = 1000
# grpc.reflection.v1 is v1alpha renamed, message for message: newer clients (grpcurl) ask for it first.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("specdec")
    except Exception:
        return "unknown"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (see SpecDecServer.port)
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    metrics_host: str | None = None  # default: host
    max_queue: int = 64  # waiting requests beyond which RESOURCE_EXHAUSTED
    max_running: int = 8  # requests stepped together
    grace_s: float = 30.0  # time in-flight calls get to finish on shutdown
    max_message_bytes: int = 4 << 20
    reflection: bool = True
    limits: Limits = field(default_factory=Limits)
    max_concurrent_streams: int = 128  # Generate + GenerateStream calls in flight beyond which RESOURCE_EXHAUSTED
    tls_cert: str | None = None  # PEM paths; cert + key turn TLS on
    tls_key: str | None = None
    tls_client_ca: str | None = None  # with it, client certificates signed by this CA are required (mTLS)
    auth_token: str | None = field(default=None, repr=False)  # bearer token required on every call but health
    benchmark_rpc: bool = True  # False: Benchmark answers UNIMPLEMENTED (--no-benchmark-rpc)
    max_benchmark_s: float = 300.0  # one Benchmark call holds the engine at most this long (--max-benchmark-seconds)
    # A stream whose client leaves this many step events unread leaves the running batch until it reads; one
    # left unread for unread_timeout_s is cancelled (--max-unread-chunks, --unread-timeout).
    max_unread: int = 64
    unread_timeout_s: float = 60.0
    expose_model_paths: bool = False  # GetModelInfo names models by their file name, not their path, unless set


class SpecDecServer:
    """Owns the grpc.aio server, the scheduler, the metrics and the health state."""

    def __init__(self, config: ServerConfig, engine=None, loader: Callable[[], object] | None = None) -> None:
        if (engine is None) == (loader is None):
            raise ValueError("give exactly one of engine and loader")
        self.config = config
        self.limits = config.limits  # with max_gamma resolved against the engine once it is loaded
        self.engine = engine
        self._loader = loader
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._load_error: BaseException | None = None
        self._draining = False
        self._shutdown_task: asyncio.Task | None = None
        self._active_calls = 0
        self._generate_calls = 0  # Generate + GenerateStream calls in flight (max_concurrent_streams)
        self._info: pb.GetModelInfoResponse | None = None
        # Text and chat prompts are tokenized here, one at a time with a tokenizer of this thread's own, not on the
        # engine's worker: a long prompt then delays only its own request, never the running streams.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._prompts = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics.bind_counts(
            lambda: self.scheduler.running if self.scheduler else 0,
            lambda: self.scheduler.waiting if self.scheduler else 0,
            lambda: self.scheduler.snapshot()["holding_cache"] if self.scheduler else 0,
            lambda: self.scheduler.unread if self.scheduler else 0,
            lambda: _prefix_cache_counts(self.engine),
        )

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until the models are loaded); returns the port."""
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        interceptors = []
        if cfg.auth_token:
            interceptors.append(TokenAuthInterceptor(cfg.auth_token, on_reject=lambda: self.metrics.failed("unauthenticated")))
        self._server = grpc.aio.server(options=options, interceptors=interceptors)
        _add_servicer(_Servicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if cfg.reflection:
            names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self._server)
            _add_reflection_v1(reflection.aio.ReflectionServicer(names), self._server)
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{_host(cfg.host)}:{cfg.port}"
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"could not bind {address}")
        await self._server.start()
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics_host or cfg.host)
        tls = "off" if credentials is None else ("mtls" if cfg.tls_client_ca else "tls")
        log.info("listening", extra={"fields": {"address": f"{cfg.host}:{self.port}", "metrics_port": self.metrics_port,
                                                "tls": tls, "auth": "token" if cfg.auth_token else "off"}})  # fmt: skip
        if self.engine is not None:
            await self._on_loaded()
        else:
            asyncio.get_running_loop().create_task(self._load())
        return self.port

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def work() -> None:  # a daemon thread: a shutdown during a long load need not wait for it
            try:
                result = self._loader()
            except BaseException as e:  # noqa: BLE001 - reported to wait_ready
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        log.info("loading models")
        t0 = time.perf_counter()
        threading.Thread(target=work, name="specdec-load", daemon=True).start()
        try:
            self.engine = await done
        except BaseException as e:  # noqa: BLE001
            log.error("loading the models failed", exc_info=e)
            self._load_error = e
            self._ready.set()
            return
        log.info("models loaded", extra={"fields": {"seconds": round(time.perf_counter() - t0, 3), **self.engine.info()}})
        await self._on_loaded()

    async def _on_loaded(self) -> None:
        if self._draining:
            self._ready.set()
            return
        cfg = self.config
        self.scheduler = Scheduler(self.engine, max_queue=cfg.max_queue, max_running=cfg.max_running,
                                   max_unread=cfg.max_unread, unread_timeout_s=cfg.unread_timeout_s,
                                   observer=self.metrics)  # fmt: skip
        self._prompts = self.engine.prompts.copy()
        self.scheduler.start()
        if self.limits.max_gamma is None:  # the largest γ the engine's own policy uses
            ec = self.engine.config
            self.limits = replace(self.limits, max_gamma=max(ec.gamma_max, ec.gamma or 0))
        info = self.engine.info()
        info["vocab_size"] = getattr(self.engine, "real_vocab", info.get("vocab_size", 0))
        if not cfg.expose_model_paths:
            info.update(target=_model_name(info["target"]), draft=_model_name(info["draft"]))
        self._info = model_info_to_proto(
            info, max_queue=self.config.max_queue, max_running=self.config.max_running, version=version(),
            kernel_isa=(isa.ISA or "torch") if str(info.get("device", "")).startswith("cpu") else "",
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._ready.set()
        log.info("serving", extra={"fields": {"service": SERVICE_NAME}})

    async def wait_ready(self) -> bool:
        """True once serving; False when shut down first; raises the load error if loading failed."""
        ready = asyncio.ensure_future(self._ready.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopped.cancel()
        if self._load_error is not None:
            raise self._load_error
        return self._ready.is_set() and not self._draining

    @property
    def serving(self) -> bool:
        return self.scheduler is not None and not self._draining

    def shutdown(self, grace: float | None = None) -> asyncio.Task:
        """Begin a graceful shutdown (idempotent); await the returned task to wait for it."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown(grace))
        return self._shutdown_task

    async def _shutdown(self, grace: float | None) -> None:
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down", extra={"fields": {"grace_s": grace, "active_calls": self._active_calls}})
        self._draining = True
        await self.health.enter_graceful_shutdown()
        if self.scheduler is not None:
            self.scheduler.close()
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while loop.time() < end and (self._active_calls > 0 or (self.scheduler is not None and self.scheduler.busy)):
            await asyncio.sleep(0.02)
        if self.scheduler is not None:
            # Whatever is left ends now: its calls get UNAVAILABLE, its caches are freed.
            await loop.run_in_executor(None, self.scheduler.stop)
        if self._server is not None:
            await self._server.stop(1.0)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        log.info("stopped")
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    # ---- calls ----------------------------------------------------------------------------------

    async def _check_serving(self, context) -> None:
        if self._draining:
            self.metrics.failed("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.scheduler is None:
            self.metrics.failed("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the models are loading; retry when health reports SERVING")

    async def _open(self, request: pb.GenerateRequest, context) -> Handle:
        await self._check_serving(context)
        limit = self.config.max_concurrent_streams
        if self._generate_calls > limit:  # this call is already counted
            self.metrics.failed("resource_exhausted")
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "1000"),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_concurrent_streams: {limit} Generate/GenerateStream calls are in flight on this replica; "
                "retry in 1 s or on another replica",
            )
        try:
            parsed = with_tenant(parse_request(request, self.limits), _tenant(context))
            if parsed.prompt_kind != "token_ids":
                parsed = replace(parsed, prompt_kind="token_ids", prompt=await self._tokenize(parsed))
        except ValueError as e:
            parsed, error = None, str(e)
        except _TokenizeFailed as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        if parsed is None:
            self.metrics.failed("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        handle = Handle(asyncio.get_running_loop(), parsed.request_id, _deadline(context))
        refusal = None
        try:
            self.scheduler.submit(handle, parsed)
        except QueueFull as e:
            refusal = (grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after_s, "resource_exhausted")
        except Closed as e:
            refusal = (grpc.StatusCode.UNAVAILABLE, str(e), None, "unavailable")
        if refusal is not None:
            code, message, retry, kind = refusal
            self.metrics.failed(kind)
            if retry is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(retry * 1000))),))
            await context.abort(code, message)
        context.add_done_callback(lambda _ctx: handle.cancel(_end_reason(handle)))
        return handle

    async def _tokenize(self, parsed) -> list[int]:
        """A text or chat prompt's ids, on the tokenizing thread. A chat template that fails on these messages is the
        request's fault (ValueError); anything else is logged and answered INTERNAL."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool, self._prompts.tokenize, parsed.prompt_kind, parsed.prompt, parsed.max_prompt_tokens
            )
        except ValueError:
            raise
        except TemplateError as e:
            raise ValueError(f"messages: the target's chat template refused them: {e}") from None
        except Exception as e:
            log.exception("tokenizing request %s failed", parsed.request_id)
            self.metrics.failed("internal")
            raise _TokenizeFailed(f"{type(e).__name__} while tokenizing request {parsed.request_id}") from e

    async def _events(self, handle: Handle, context):
        """Yield the request's StepOutputs, then its Completion; abort with the right status otherwise."""
        try:
            while True:
                kind, payload = await handle.get()
                if kind == "step":
                    yield payload
                    continue
                if kind == "done":
                    reason = payload.finish_reason
                    if reason == FinishReason.DEADLINE:
                        await context.abort(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"deadline exceeded after {payload.completion_tokens} tokens (request {handle.request_id})",
                        )
                    if reason == FinishReason.CANCELLED:
                        if self._draining and handle.cancel_reason is None:
                            await context.abort(
                                grpc.StatusCode.UNAVAILABLE,
                                f"the server shut down before request {handle.request_id} finished; retry",
                            )
                        await context.abort(grpc.StatusCode.CANCELLED, f"request {handle.request_id} was cancelled")
                    yield payload
                    return
                if kind == "error":
                    if isinstance(payload, ValueError):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, engine_message(str(payload)))
                    await context.abort(
                        grpc.StatusCode.INTERNAL, f"internal error in request {handle.request_id}: {payload}"
                    )
        except asyncio.CancelledError:
            handle.cancel(_end_reason(handle))
            raise

    async def generate(self, request, context) -> pb.GenerateResponse:
        self._active_calls += 1
        self._generate_calls += 1
        try:
            handle = await self._open(request, context)
            completion = None
            async for item in self._events(handle, context):
                completion = item
            return response_to_proto(completion)
        finally:
            self._active_calls -= 1
            self._generate_calls -= 1

    async def generate_stream(self, request, context):
        self._active_calls += 1
        self._generate_calls += 1
        try:
            handle = await self._open(request, context)
            index = 0
            async for item in self._events(handle, context):
                if not isinstance(item, Completion):
                    if item.token_ids or item.text:
                        chunk = pb.StreamChunk(token_ids=item.token_ids, text=item.text, logprobs=item.logprobs or [],
                                               index=index, top_logprobs=top_logprobs_to_proto(item.top_logprobs))  # fmt: skip
                        index += 1
                        yield pb.GenerateStreamResponse(request_id=handle.request_id, chunk=chunk)
                else:
                    yield pb.GenerateStreamResponse(request_id=handle.request_id, summary=summary_to_proto(item))
        finally:
            self._active_calls -= 1
            self._generate_calls -= 1

    async def model_info(self, request, context) -> pb.GetModelInfoResponse:
        await self._check_serving(context)
        info = pb.GetModelInfoResponse()
        info.CopyFrom(self._info)
        info.resident_bytes = rss_bytes()  # now, not at start: it grows with the KV caches of running requests
        return info

    async def benchmark(self, request: pb.BenchmarkRequest, context):
        self._active_calls += 1
        try:
            if not self.config.benchmark_rpc:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                    "the Benchmark RPC is switched off on this server (--no-benchmark-rpc)")  # fmt: skip
            await self._check_serving(context)
            try:
                options = self._bench_options(request)
            except ValueError as e:
                options, error = None, str(e)
            if options is None:
                self.metrics.failed("invalid_argument")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            handle = Handle(asyncio.get_running_loop(), "benchmark-" + new_request_id()[:8], _deadline(context))
            try:
                self.scheduler.submit_job(handle, _bench_job(options), max_s=self.config.max_benchmark_s)
            except (QueueFull, Closed) as e:
                busy = isinstance(e, QueueFull)
                if busy:
                    context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(e.retry_after_s * 1000))),))
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if busy else grpc.StatusCode.UNAVAILABLE
                await context.abort(code, str(e))
            context.add_done_callback(lambda _ctx: handle.cancel(_end_reason(handle)))
            try:
                while True:
                    kind, payload = await handle.get()
                    if kind == "progress":
                        yield pb.BenchmarkProgress(progress=_bench_step(payload))
                    elif kind == "result":
                        yield pb.BenchmarkProgress(report=_bench_report(*payload))
                        return
                    elif isinstance(payload, JobOverLimit):
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            f"the benchmark {payload} on this server (limit max_benchmark_seconds); "
                                            "ask for fewer prompts or tokens")  # fmt: skip
                    elif isinstance(payload, JobCancelled):
                        reason = payload.args[0] if payload.args else FinishReason.CANCELLED
                        if reason == FinishReason.DEADLINE:
                            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded during the benchmark")
                        if self._draining:
                            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server shut down during the benchmark")
                        await context.abort(grpc.StatusCode.CANCELLED, "the benchmark was cancelled")
                    elif isinstance(payload, ValueError):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(payload))
                    else:
                        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {handle.request_id}: {payload}")
            except asyncio.CancelledError:
                handle.cancel(_end_reason(handle))
                raise
        finally:
            self._active_calls -= 1

    def _bench_options(self, r: pb.BenchmarkRequest):
        if len(r.prompts) > MAX_BENCHMARK_PROMPTS:
            raise ValueError(f"prompts must hold at most {MAX_BENCHMARK_PROMPTS} prompts, got {len(r.prompts)}")
        for i, p in enumerate(r.prompts):
            if not p.strip():
                raise ValueError(f"prompts[{i}] must not be empty")
        limits = self.limits
        if r.HasField("max_new_tokens"):
            check_max_new_tokens(r.max_new_tokens, limits)
        check_gamma(r.gamma if r.HasField("gamma") else None, r.gamma_max if r.HasField("gamma_max") else None, limits,
                    prefix="")  # fmt: skip
        method = method_from_proto(r.method, "method")
        if method is None:
            method = Method.DRAFT if getattr(self.engine, "draft", None) is not None else Method.NGRAM
        if method == Method.DRAFT and getattr(self.engine, "draft", None) is None:
            raise ValueError("method METHOD_DRAFT needs a draft model; this server was started without one")
        options = bench.BenchOptions(
            prompts=[bench.Prompt(p) for p in r.prompts] if r.prompts else bench.builtin_prompts(),
            method=method,
            gamma=r.gamma if r.HasField("gamma") else None,
            gamma_max=r.gamma_max if r.HasField("gamma_max") else None,
            sampling=sampling_from_proto(r.sampling),
            compare_hf=r.compare_hf,
            chat=not r.no_chat_template,
            max_prompt_tokens=limits.max_prompt_tokens,
        )
        if r.HasField("warmup"):
            options.warmup = r.warmup
        elif r.prompts and len(r.prompts) == 1:
            options.warmup = 0  # a single prompt of one's own is measured
        if r.HasField("max_new_tokens"):
            options.max_new_tokens = r.max_new_tokens
        options.validate(prefix="")  # the request names them gamma and gamma_max
        return options


class _TokenizeFailed(Exception):
    """Tokenizing failed for a reason other than the request (logged with its traceback)."""


class _Malformed:
    """A request that did not parse (bad wire format, invalid UTF-8 in a string): INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self, message_type, error: Exception) -> None:
        self.text = f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {error}"


def _tolerant(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as e:  # DecodeError, or anything else the parser raises on hostile input
            return _Malformed(message_type, e)

    return parse


def _tenant(context) -> str:
    """The caller's identity where the channel proves one: an mTLS client certificate's (its subject alternative
    names, else its common name), else "". A bearer token names no one: every client holds the same token."""
    identities = context.peer_identities() if context.auth_context().get("transport_security_type") else None
    return ",".join(i.decode("utf-8", "replace") for i in identities or ())


class _Servicer(pb_grpc.SpecDecodeServicer):
    def __init__(self, app: SpecDecServer) -> None:
        self._app = app

    async def _reject_malformed(self, request, context) -> None:
        if isinstance(request, _Malformed):
            self._app.metrics.failed("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)

    async def Generate(self, request, context):
        await self._reject_malformed(request, context)
        return await self._app.generate(request, context)

    async def GenerateStream(self, request, context):
        await self._reject_malformed(request, context)
        async for message in self._app.generate_stream(request, context):
            yield message

    async def Benchmark(self, request, context):
        await self._reject_malformed(request, context)
        async for message in self._app.benchmark(request, context):
            yield message

    async def GetModelInfo(self, request, context):
        await self._reject_malformed(request, context)
        return await self._app.model_info(request, context)


def _add_servicer(servicer: _Servicer, server: grpc.aio.Server) -> None:
    """As the generated ``add_SpecDecodeServicer_to_server``, with request parsing that cannot fail the call."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, _tolerant(pb.GenerateRequest), pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, _tolerant(pb.GenerateRequest), pb.GenerateStreamResponse.SerializeToString),
        "Benchmark": grpc.unary_stream_rpc_method_handler(
            servicer.Benchmark, _tolerant(pb.BenchmarkRequest), pb.BenchmarkProgress.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, _tolerant(pb.GetModelInfoRequest), pb.GetModelInfoResponse.SerializeToString),
    }  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


# ---- helpers ------------------------------------------------------------------------------------


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 86400:  # no deadline (some stacks report "infinite")
        return None
    return time.monotonic() + remaining


# A call's end within this long of its deadline counts as the deadline: the deadline the server computes at the start
# of a call (now + time remaining) runs a little behind grpc's own.
DEADLINE_SLACK_S = 0.05


def _end_reason(handle: Handle) -> FinishReason:
    """Why a call ended early: its deadline if that has (about) passed, else a cancel."""
    if handle.deadline is not None and time.monotonic() >= handle.deadline - DEADLINE_SLACK_S:
        return FinishReason.DEADLINE
    return FinishReason.CANCELLED


def _bench_job(options):
    def run(engine, progress, check):
        with engine.prefix_cache.paused():  # baseline and speculative each run a prompt cold
            report = bench.run_benchmark(engine, options, progress, check)
        return report, bench.to_json(report), bench.to_markdown(report)

    return run


def _model_name(source: str) -> str:
    """A model as GetModelInfo names it by default: a local path by its last component, a hub id as it is."""
    return Path(source).name if source and Path(source).exists() else source


def _add_reflection_v1(servicer, server: grpc.aio.Server) -> None:
    """Serve reflection as grpc.reflection.v1 too, through the v1alpha servicer (the messages are the same)."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),))


def _bench_step(event: dict) -> pb.BenchmarkStep:
    return pb.BenchmarkStep(
        phase=str(event.get("phase", "")),
        done=int(event.get("done", 0)),
        total=int(event.get("total", 0)),
        message=str(event.get("message", event.get("event", ""))),
    )


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if x == x and abs(x) != float("inf") else None


def _bench_report(report: dict, json_text: str, markdown: str) -> pb.BenchmarkReport:
    base, spec = report.get("baseline", {}), report.get("speculative", {})
    out = pb.BenchmarkReport(
        baseline_decode_tokens_per_s=_num(base.get("decode_tokens_per_s")) or 0.0,
        speculative_decode_tokens_per_s=_num(spec.get("decode_tokens_per_s")) or 0.0,
        speedup=_num(report.get("speedup")) or 0.0,
        acceptance_rate=_num(spec.get("acceptance_rate")) or 0.0,
        mean_accepted_length=_num(spec.get("mean_accepted_length")) or 0.0,
        json=json_text,
        markdown=markdown,
    )
    for name in ("analytic_bound", "efficiency", "speedup_vs_hf"):
        if (v := _num(report.get(name))) is not None:
            setattr(out, name, v)
    if isinstance(report.get("identical_outputs"), bool):
        out.identical_outputs = report["identical_outputs"]
    if "hf_assisted" in report and (v := _num(report["hf_assisted"].get("decode_tokens_per_s"))) is not None:
        out.hf_assisted_decode_tokens_per_s = v
    return out


async def serve(config: ServerConfig, *, engine=None, loader=None) -> SpecDecServer:
    """Start a server (convenience for embedding); the caller awaits ``shutdown()``."""
    server = SpecDecServer(config, engine=engine, loader=loader)
    await server.start()
    return server


__all__ = ["SERVICE_NAME", "ServerConfig", "SpecDecServer", "serve"]


def _prefix_cache_counts(engine) -> tuple[int, int, int]:
    """(queried tokens, hit tokens, bytes held) of the engine's prefix cache; zeros before it loads or without one."""
    cache = getattr(engine, "prefix_cache", None)
    return (cache.queried_tokens, cache.hit_tokens, cache.bytes) if cache is not None else (0, 0, 0)
