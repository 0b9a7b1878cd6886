"""Transport security and authentication: TLS / mutual TLS credentials and bearer-token auth.

``--tls-cert``/``--tls-key`` serve TLS; adding ``--tls-client-ca`` requires every client to present a
certificate signed by that CA (mutual TLS). ``--auth-token-file`` requires the metadata
``authorization: Bearer <token>`` on every call except the health service (probes and load
balancers must reach it without secrets); a missing or wrong token is UNAUTHENTICATED. Tokens are
compared in constant time (`hmac.compare_digest`), as bytes, so any input is comparable.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


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
    """Refuses every call without the right bearer token, except the exempt (health) methods."""

    def __init__(self, token: str, *, on_refused: Callable[[], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method.startswith(EXEMPT_PREFIXES) or self._authorized(details):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        if self._on_refused is not None:
            self._on_refused()
        log.debug("refused %s: missing or wrong bearer token", details.method)
        return _refusal(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == AUTH_HEADER:
                supplied = value if isinstance(value, bytes) else value.encode("utf-8",
                                                                                "surrogateescape")
                return hmac.compare_digest(supplied, self._expected)
        return False


_REFUSED = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED without reading
    the request (it is left undecoded)."""
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSED)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
