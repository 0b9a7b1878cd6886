"""Transport security and authentication: TLS / mutual TLS credentials, bearer-token auth, and what
a peer without the token can cost.

``--tls-cert``/``--tls-key`` serve TLS; adding ``--tls-client-ca`` requires every client to present a
certificate signed by that CA (mutual TLS). ``--auth-token-file`` requires the metadata
``authorization: Bearer <token>`` on every call; a missing or wrong token is UNAUTHENTICATED.
Tokens are compared in constant time (`hmac.compare_digest`), as bytes, so any input is comparable.

Open without a token: ``grpc.health.v1.Health/Check`` only (`EXEMPT_METHODS`), for kubelet's
native gRPC probes and load balancers, which carry no secrets. Everything else needs it:
``Health/Watch`` too (our client's ``wait_ready`` sends the token; a probe polls Check), reflection,
and any method name, known or not, so a peer without the token cannot list what is served.

Refusal happens before the request is read. `TokenAuth` sees the call's metadata before gRPC
reads its body and answers with a *streaming-request* handler that aborts without reading: gRPC
Python reads a unary request in full before it calls even an aborting handler (8 token-less 60 MiB
bodies at once: server peak RSS +807 MiB), but leaves a streaming request unread (the same 8:
+1 MiB; bench/attack.py). The one exempt method, Check, is unary: gRPC reads its body before
any handler runs, up to ``--max-message-mb`` (the same 8 to Check: peak +418 MiB, transient);
only a health port of its own with a small message limit would close that.

`CappedHealth` bounds open health Watch streams (`MAX_WATCH_STREAMS`; 1,000 open measured 6-15
MiB); beyond it a Watch is RESOURCE_EXHAUSTED at once. It applies with or without a token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1._async import HealthServicer

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
EXEMPT_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
MAX_WATCH_STREAMS = 1000


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of the server's certificate chain and key, and of the client CA (mTLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def read(cls, cert: str | Path, key: str | Path, client_ca: str | Path | None = None
             ) -> TlsFiles:
        """Read the PEM files (an unreadable one raises OSError naming it)."""
        return cls(_read_pem(cert, "--tls-cert"), _read_pem(key, "--tls-key"),
                   _read_pem(client_ca, "--tls-client-ca") if client_ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _read_pem(path: str | Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"{flag} {str(path)!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise OSError(f"{flag} {str(path)!r}: not a PEM file")
    return data


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); empty is refused."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise OSError(f"--auth-token-file {str(path)!r}: {exc.strerror or exc}") from None
    if not token:
        raise OSError(f"--auth-token-file {str(path)!r}: the file is empty")
    return token


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses every call without the right bearer token, except `EXEMPT_METHODS`, without
    reading its request."""

    def __init__(self, token: str, *, on_refused: Callable[[], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method in EXEMPT_METHODS or self._authorized(details):
            return await continuation(details)
        # Not even `continuation`: whether the method exists is no business of this peer.
        if self._on_refused is not None:
            self._on_refused()
        log.debug("refused %s: missing or wrong bearer token", details.method)
        return _REFUSAL

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == AUTH_HEADER:
                supplied = value if isinstance(value, bytes) else value.encode("utf-8",
                                                                                "surrogateescape")
                return hmac.compare_digest(supplied, self._expected)
        return False


_REFUSED = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


async def _refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSED)


# Stream-stream whatever the method's shape: gRPC then calls the handler without reading a
# message (a unary handler gets the whole body read first), and every client shape accepts a
# status with no messages. No deserializer: nothing is ever decoded.
_REFUSAL = grpc.stream_stream_rpc_method_handler(_refuse)


class CappedHealth(HealthServicer):
    """The standard asyncio health service, with at most ``max_watches`` Watch streams open at
    once (default `MAX_WATCH_STREAMS`, read when constructed); the next one is
    RESOURCE_EXHAUSTED."""

    def __init__(self, max_watches: int | None = None) -> None:
        super().__init__()
        self.max_watches = MAX_WATCH_STREAMS if max_watches is None else max_watches
        self.watching = 0

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        if self.watching >= self.max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.watching} health Watch streams are open, the most this "
                                f"server holds; poll Health/Check instead")
        # Counted inside the handler, in one step with the check (one event loop): no call can
        # slip past the cap, and the finally releases the slot however the stream ends.
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1
