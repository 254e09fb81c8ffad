"""Who may talk to the server: loopback by default, otherwise TLS and bearer tokens.

Listening on a non-loopback address without TLS and a token file is refused
unless the user says `--insecure`; the check is `check_exposure`.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


class ConfigError(Exception):
    """A setting that keeps the server from starting; the message is one line."""


# The health service answers without a token, so load balancers can probe it.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def split_address(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8980")
    return host, int(port)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        try:
            key, cert = self.key.read_bytes(), self.cert.read_bytes()
            ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as error:
            raise ConfigError(f"cannot read TLS file {error.filename}: {error.strerror}") from None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


def check_exposure(
    host: str, tls: TlsFiles | None, tokens: frozenset[str] | None, insecure: bool
) -> None:
    if is_loopback(host) or insecure:
        return
    if tls is None or tokens is None:
        raise ConfigError(
            f"refusing to listen on {host} without --tls-cert/--tls-key and --auth-tokens; "
            "pass --insecure to do it anyway"
        )


def load_tokens(path: Path) -> frozenset[str]:
    """One token per line; blank lines and lines starting with # are ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read --auth-tokens {path}: {error.strerror}") from None
    tokens = frozenset(
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise ConfigError(f"--auth-tokens {path} holds no token")
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` for a known token."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def _allowed(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                text = value if isinstance(value, str) else value.decode()
                scheme, _, token = text.partition(" ")
                if scheme.lower() == "bearer":
                    given = token.strip().encode()
                    return any(hmac.compare_digest(given, known) for known in self._tokens)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        if self._allowed(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")


def _refusing(handler: Handler) -> Handler:
    """A handler of the same shape as `handler` that refuses the call."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        _refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
