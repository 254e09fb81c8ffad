"""Who may reach the server: loopback by default, otherwise TLS and a token file.

Listening on a non-loopback address without TLS and a token file is refused
unless the user says `--insecure`; the check is `check_exposure`. What each
token may do once it is in is reapi/frontend/access.py's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc


class ConfigError(Exception):
    """A setting that keeps the server from starting; the message is one line."""


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


def check_exposure(host: str, tls: TlsFiles | None, has_tokens: bool, insecure: bool) -> None:
    if is_loopback(host) or insecure:
        return
    if tls is None or not has_tokens:
        raise ConfigError(
            f"refusing to listen on {host} without --tls-cert/--tls-key and --auth-tokens; "
            "pass --insecure to do it anyway"
        )
