"""TLS / mTLS credentials and optional bearer-token authentication.

Server side:
    ``server_credentials(cert, key, client_ca)``: TLS; with ``client_ca`` the server *requires* a client
    certificate signed by that CA (mTLS).
    ``TokenAuthInterceptor(token)``: every call but the health service needs the metadata
    ``authorization: Bearer <token>``; a missing or wrong token gets UNAUTHENTICATED. The comparison is
    constant-time (``hmac.compare_digest``). The token is never logged and never a metric label.

Client side:
    ``channel_credentials(ca, cert, key)`` and ``bearer_metadata(token)``.

Secrets are read from files (``--auth-token-file``) or the environment (``SPECDEC_AUTH_TOKEN``), never from
the command line, where ``ps`` would show them.
"""

from __future__ import annotations

import hmac
import math
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

log = logging.getLogger("specdec.security")

TOKEN_ENV = "SPECDEC_AUTH_TOKEN"
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # probes stay open
# At most this many "rejected" warnings per this many seconds, the next one naming how many went unlogged: a
# client retrying without a token must not flood the log (the metrics count every rejection).
REJECT_LOG_BURST = 5
REJECT_LOG_INTERVAL_S = 10.0


def _read(path: str | os.PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"could not read the {what} {str(path)!r}: {e.strerror}") from None


def server_credentials(cert: str | None, key: str | None, client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials for the server; None when no certificate is given (plaintext)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    ca = _read(client_ca, "client CA bundle")
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(ca: str | None = None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a client: ``ca`` (default: the system roots), and a client cert/key for mTLS."""
    if (cert is None) != (key is None):
        raise ValueError("the client certificate and key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA bundle"),
        private_key=_read(key, "client key"),
        certificate_chain=_read(cert, "client certificate"),
    )


def load_token(path: str | None = None, env: str = TOKEN_ENV) -> str | None:
    """The shared secret from a file (stripped of surrounding whitespace) or else the environment."""
    if path is not None:
        token = (_read(path, "token file") or b"").decode("utf-8", "strict").strip()
        if not token:
            raise ValueError(f"the token file {path!r} is empty")
        return token
    token = os.environ.get(env, "").strip()
    return token or None


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def token_matches(expected: bytes, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """True when the metadata carries ``authorization: Bearer <expected>``; compares in constant time."""
    presented = b""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            v = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
            scheme, _, rest = v.partition(b" ")
            if scheme.lower() == b"bearer":
                presented = rest.strip()
            break
    # compare_digest on equal-type bytes: time independent of where the first difference lies
    return hmac.compare_digest(presented, expected) and len(presented) > 0


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED (health stays open)."""

    def __init__(self, token: str, on_reject: Callable[[], None] | None = None) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._token = token.encode("utf-8")
        self._on_reject = on_reject
        self._window_start = -math.inf
        self._logged = 0  # warnings in the current window
        self._unlogged = 0  # rejections not logged since the last warning

    def __repr__(self) -> str:  # never the token
        return "TokenAuthInterceptor(token=<redacted>)"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_SERVICES) or token_matches(self._token, handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject()
        now = time.monotonic()
        if now - self._window_start >= REJECT_LOG_INTERVAL_S:
            self._window_start, self._logged = now, 0
        if self._logged < REJECT_LOG_BURST:
            log.warning("unauthenticated call rejected",
                        extra={"fields": {"method": method, "unlogged_before": self._unlogged}})  # fmt: skip
            self._logged, self._unlogged = self._logged + 1, 0
        else:
            self._unlogged += 1
        return _denied(handler)


_DENIED = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


def _denied(handler):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None  # unknown method: UNIMPLEMENTED as usual
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    return grpc.stream_stream_rpc_method_handler(stream, des, ser)


__all__ = [
    "TOKEN_ENV",
    "TokenAuthInterceptor",
    "bearer_metadata",
    "channel_credentials",
    "load_token",
    "server_credentials",
    "token_matches",
]
