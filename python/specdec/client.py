"""A small sync and asyncio client over the generated ``specdec.v1`` stubs.

    from specdec.client import Client
    with Client("127.0.0.1:50051") as c:
        r = c.generate("def fib(n):", max_new_tokens=32)
        print(r.text, r.summary.speculation.acceptance_rate)
        for chunk in c.stream("Hello", max_new_tokens=16):
            print(chunk.text, end="", flush=True)

Responses are the protobuf messages themselves (``specdec.v1.specdec_pb2``). Errors are ``grpc.RpcError`` with
the server's status code and message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.serving.security import bearer_metadata, channel_credentials
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
METHODS = {"draft": pb.METHOD_DRAFT, "ngram": pb.METHOD_NGRAM, "suffix": pb.METHOD_SUFFIX, "auto": pb.METHOD_AUTO,
           "none": pb.METHOD_NONE}  # fmt: skip


def build_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    json_schema: str | dict | None = None,
    json_object: bool = False,
    regex: str | None = None,
    grammar: str | None = None,
    method: str | None = None,
    gamma: int | None = None,
    gamma_max: int | None = None,
    cache_scope: str = "",
    request_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; exactly one of prompt, token_ids and messages, and at most one
    response format (json_schema, a JSON string or a dict; json_object; regex; grammar, Lark)."""
    if sum(x is not None for x in (prompt, token_ids, messages)) != 1:
        raise ValueError("give exactly one of prompt, token_ids and messages")
    formats = {"json_schema": json_schema, "regex": regex, "grammar": grammar, "json_object": json_object or None}
    given = {k: v for k, v in formats.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one response format, got {', '.join(given)}")
    req = pb.GenerateRequest(request_id=request_id, stop=list(stop), stop_token_ids=list(stop_token_ids),
                             ignore_eos=ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs)  # fmt: skip
    for kind, value in given.items():
        setattr(req.response_format, kind, json.dumps(value) if isinstance(value, dict) else value)
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.messages.SetInParent()
        for m in messages:
            req.messages.messages.add(role=m["role"], content=m["content"])
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p), ("seed", seed)):
        if value is not None:
            setattr(req.sampling, name, value)
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        req.speculation.method = METHODS[method]
    if gamma is not None:
        req.speculation.gamma = gamma
    if gamma_max is not None:
        req.speculation.gamma_max = gamma_max
    if cache_scope:
        req.speculation.cache_scope = cache_scope
    return req


def _channel_options(max_message_bytes: int, server_name: str | None = None) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_message_bytes),
                                            ("grpc.max_send_message_length", max_message_bytes)]  # fmt: skip
    if server_name:  # the name the server's certificate must carry, when it differs from the address
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _credentials(credentials, tls: bool, ca: str | None, cert: str | None, key: str | None):
    if credentials is not None or not tls:
        return credentials
    return channel_credentials(ca, cert, key)


class Client:
    """Blocking client.

    TLS: ``tls_ca`` (the CA bundle that signed the server; ``tls=True`` alone uses the system roots), and for
    mTLS ``tls_cert`` + ``tls_key``; or ready ``credentials`` (grpc.ChannelCredentials). ``server_name``
    overrides the name checked in the server's certificate. ``token`` sends ``authorization: Bearer <token>``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = 4 << 20,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls: bool = False,
        server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        options = _channel_options(max_message_bytes, server_name)
        credentials = _credentials(credentials, tls or tls_ca is not None or tls_cert is not None, tls_ca, tls_cert, tls_key)
        metadata = tuple(metadata) + bearer_metadata(token)
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.stub = pb_grpc.SpecDecodeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _kw(self, timeout: float | None) -> dict:
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": self.metadata or None}

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **kwargs), **self._kw(timeout))

    def generate_request(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> pb.GenerateResponse:
        return self.stub.Generate(request, **self._kw(timeout))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[pb.GenerateStreamResponse]:
        """Yields every stream message: chunks (``.chunk``) then the summary (``.summary``)."""
        return self.stub.GenerateStream(build_request(prompt, **kwargs), **self._kw(timeout))

    def stream_request(self, request: pb.GenerateRequest, *, timeout: float | None = None):
        return self.stub.GenerateStream(request, **self._kw(timeout))

    def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    def benchmark(self, request: pb.BenchmarkRequest | None = None, *, timeout: float | None = None):
        return self.stub.Benchmark(request or pb.BenchmarkRequest(), **self._kw(timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ...; raises grpc.RpcError when the server cannot be reached."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client: ``async with AsyncClient(addr) as c: r = await c.generate("hi")``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        max_message_bytes: int = 4 << 20,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls: bool = False,
        server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        options = _channel_options(max_message_bytes, server_name)
        credentials = _credentials(credentials, tls or tls_ca is not None or tls_cert is not None, tls_ca, tls_cert, tls_key)
        metadata = tuple(metadata) + bearer_metadata(token)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.stub = pb_grpc.SpecDecodeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _kw(self, timeout: float | None) -> dict:
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": self.metadata or None}

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return await self.stub.Generate(build_request(prompt, **kwargs), **self._kw(timeout))

    async def generate_request(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> pb.GenerateResponse:
        return await self.stub.Generate(request, **self._kw(timeout))

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **kwargs) -> AsyncIterator[pb.GenerateStreamResponse]:  # fmt: skip
        call = self.stub.GenerateStream(build_request(prompt, **kwargs), **self._kw(timeout))
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()  # a no-op when the stream has ended; frees the server's work when the caller stops early

    async def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        r = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
