"""The `reapi` command line.

    reapi serve [--listen 127.0.0.1:8980] [--storage DIR] [--config FILE]
                [--tls-cert F --tls-key F [--tls-client-ca F]] [--auth-tokens F] [--insecure]

A config file is TOML whose keys are the long option names (`listen = "..."`,
`tls-cert = "..."`); options given on the command line win over the file.
Startup problems end the process with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reapi.security import ConfigError, TlsFiles
from reapi.server import ServerConfig, default_storage, serve

SERVE_OPTIONS = (
    "listen",
    "storage",
    "tls-cert",
    "tls-key",
    "tls-client-ca",
    "auth-tokens",
    "insecure",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reapi", description="Remote Execution API v2 server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the server (CAS, action cache)")
    serve_cmd.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8980)")
    serve_cmd.add_argument(
        "--storage", type=Path, help=f"storage directory (default {default_storage()})"
    )
    serve_cmd.add_argument("--config", type=Path, help="TOML file with the same settings")
    serve_cmd.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    serve_cmd.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve_cmd.add_argument(
        "--tls-client-ca",
        type=Path,
        help="CA bundle; when given, clients must present a certificate",
    )
    serve_cmd.add_argument(
        "--auth-tokens", type=Path, help="file of accepted bearer tokens, one per line"
    )
    serve_cmd.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback address without TLS and tokens",
    )
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = tomllib.loads(args.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read --config {args.config}: {error}") from None
        for key, value in loaded.items():
            name = key.replace("_", "-")
            if name not in SERVE_OPTIONS:
                raise ConfigError(f"--config {args.config}: unknown setting {key!r}")
            settings[name] = value
    for name in SERVE_OPTIONS:
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            settings[name] = value
    return settings


def server_config(args: argparse.Namespace) -> ServerConfig:
    settings = _settings(args)

    def path(name: str) -> Path | None:
        return Path(settings[name]) if settings.get(name) else None

    cert, key, client_ca = path("tls-cert"), path("tls-key"), path("tls-client-ca")
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if client_ca is not None and cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    config = ServerConfig(
        tls=TlsFiles(cert, key, client_ca) if cert and key else None,
        auth_tokens=path("auth-tokens"),
        insecure=bool(settings.get("insecure", False)),
    )
    if settings.get("listen"):
        config.listen = str(settings["listen"])
    if settings.get("storage"):
        config.storage = Path(settings["storage"])
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reapi %(levelname)s %(message)s")
    try:
        if args.command == "serve":
            asyncio.run(serve(server_config(args)))
    except ConfigError as error:
        print(f"reapi: {error}", file=sys.stderr)
        return 2
    return 0
