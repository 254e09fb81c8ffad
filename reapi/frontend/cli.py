"""The `reapi` command line.

    reapi serve [--listen 127.0.0.1:8980] [--storage DIR] [--config FILE]
                [--tls-cert F --tls-key F [--tls-client-ca F]] [--auth-tokens F] [--insecure]
                [--workers N] [--sandbox bwrap|none] [--max-size SIZE [--gc-interval S]]
                [--instance NAME ...] [--idle-timeout SECONDS] [LIMITS]
    reapi worker --server grpc://HOST:PORT [--server ...] [--slots N] [--property KEY=VALUE ...]
                 [--provide DIR ...] [--env KEY=VALUE ...] [--sandbox bwrap|none] [LIMITS]
                 [--name NAME] [--workdir DIR]
                 [--tls-ca PEM] [--auth-token-file FILE]
    reapi cas gc | stats | verify ...      (see reapi/frontend/cas_commands.py)

LIMITS, per action (executor/limits.py): [--max-processes N] [--max-memory SIZE]
[--max-tmp SIZE] [--max-tree SIZE]; `serve` passes them to its local workers.

A config file is TOML whose keys are the long option names (`listen = "..."`,
`tls-cert = "..."`); options given on the command line win over the file.
Startup problems end the process with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cas.inventory import StorageError
from cas.redis_conn import RedisConfigError, RedisTarget
from cas.remote import split_target
from executor.limits import DEFAULT_LIMITS, Limits
from executor.runner import DEFAULT_ENV
from executor.worker import Worker, WorkerConfig
from reapi.core.conventions import provided_directory
from reapi.core.credentials import read_token
from reapi.frontend import cas_commands
from reapi.frontend.security import ConfigError, TlsFiles
from reapi.frontend.server import ServerConfig, default_storage, reapi_home, serve

SERVE_OPTIONS = (
    "listen",
    "storage",
    "redis",
    "read-tier",
    "tls-cert",
    "tls-key",
    "tls-client-ca",
    "auth-tokens",
    "insecure",
    "workers",
    "sandbox",
    "heartbeat-timeout",
    "max-size",
    "gc-interval",
    "instance",
    "idle-timeout",
    "max-processes",
    "max-memory",
    "max-tmp",
    "max-tree",
)
# What each action may use on a worker (executor/limits.py): option, field, help.
LIMIT_OPTIONS = (
    ("max-processes", "processes", "processes an action may have at once (default 1024)"),
    ("max-memory", "memory", "memory each process of an action may write to (default 8G)"),
    ("max-tmp", "tmp", "size of an action's /tmp, and of its /dev/shm (tmpfs; default 1G)"),
    (
        "max-tree",
        "tree",
        "bytes an action may write to its tree, stdout and stderr together (default 16G)",
    ),
)


def _add_limit_options(parser: argparse.ArgumentParser, whose: str) -> None:
    for option, _field, text in LIMIT_OPTIONS:
        parser.add_argument(f"--{option}", metavar="N" if option == "max-processes" else "SIZE",
                            help=f"{text}{whose}")  # fmt: skip


def limits_from(settings: dict[str, Any]) -> Limits:
    """The limits set among `settings` (by option name, or its attribute name
    in parsed arguments), the rest at their defaults."""
    values: dict[str, int] = {}
    for option, field_name, _text in LIMIT_OPTIONS:
        text = settings.get(option, settings.get(option.replace("-", "_")))
        if text is None:
            continue
        if option == "max-processes":
            value = int(text) if str(text).isdigit() else 0
        else:
            value = cas_commands.size_option(f"--{option}", str(text))
        if value <= 0:
            raise ConfigError(f"--{option} {text!r}: expected a number above 0")
        values[field_name] = value
    return dataclasses.replace(DEFAULT_LIMITS, **values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reapi", description="Remote Execution API v2 server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the server (CAS, action cache)")
    serve_cmd.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8980)")
    serve_cmd.add_argument(
        "--storage", type=Path, help=f"storage directory (default {default_storage()})"
    )
    serve_cmd.add_argument(
        "--redis",
        action="append",
        help="redis://[:PASSWORD@]HOST:PORT or rediss://...: keep the CAS and the action "
        "cache in this Redis or Redis Cluster, shared with other frontends (repeatable: "
        "nodes of one deployment); instead of --storage",
    )
    serve_cmd.add_argument(
        "--read-tier",
        help="with --redis: keep up to this much (500M, 10G; 0: nothing) of what this "
        "frontend reads from Redis on its own disk too, for the next reads (default 1G)",
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
        "--auth-tokens",
        type=Path,
        help="file of grants, one per line: TOKEN [read,write,execute,worker,admin] [@INSTANCE]",
    )
    serve_cmd.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback address without TLS and tokens",
    )
    serve_cmd.add_argument(
        "--workers", type=int, help="local worker processes to start (default: one per core)"
    )
    serve_cmd.add_argument(
        "--sandbox", choices=("bwrap", "none"), help="sandbox of the local workers (default bwrap)"
    )

    serve_cmd.add_argument(
        "--heartbeat-timeout",
        type=float,
        help="seconds of silence after which a worker is taken for dead (default 30)",
    )

    serve_cmd.add_argument(
        "--idle-timeout",
        type=float,
        help="seconds after which a connection with no call, or an upload that sends "
        "nothing, is closed (default 120)",
    )
    serve_cmd.add_argument(
        "--instance",
        action="append",
        help="serve this instance name (repeatable; '' for the default one); "
        "without it, every name is served",
    )
    _add_limit_options(serve_cmd, ", for the local workers")
    serve_cmd.add_argument(
        "--max-size",
        help="keep the stored blobs under this size (500M, 10G): a background gc "
        "evicts least recently used blobs past it, down to 90%%",
    )
    serve_cmd.add_argument(
        "--gc-interval",
        type=float,
        help="seconds between two checks of the size, with --max-size (default 60)",
    )

    worker_cmd = commands.add_parser("worker", help="run actions for a server")
    worker_cmd.add_argument(
        "--server",
        action="append",
        required=True,
        help="grpc://HOST:PORT, grpcs://... or unix:PATH (repeatable: frontends of one "
        "service, tried in turn when the connection drops)",
    )
    worker_cmd.add_argument("--slots", type=int, default=1, help="actions run at once")
    worker_cmd.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="platform property this worker offers (repeatable)",
    )
    worker_cmd.add_argument(
        "--provide",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory to mount read-only for every action, besides the system's "
        "(a toolchain under /opt, say; repeatable): clients then rely on its files",
    )
    worker_cmd.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable actions get when their Command does not set it "
        "(repeatable; default PATH=/usr/local/bin:/usr/bin:/bin)",
    )
    worker_cmd.add_argument("--sandbox", choices=("bwrap", "none"), default="bwrap")
    _add_limit_options(worker_cmd, "")
    worker_cmd.add_argument("--name", help="name in logs and results (default: host name)")
    worker_cmd.add_argument(
        "--workdir", type=Path, help="cache and action trees (default $REAPI_HOME/worker)"
    )
    worker_cmd.add_argument("--tls-ca", type=Path, help="CA to trust for a grpcs:// server")
    worker_cmd.add_argument(
        "--auth-token-file", type=Path, help="file whose first token is sent as a bearer token"
    )
    worker_cmd.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    cas_commands.add_parsers(commands)
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
    if settings.get("redis"):
        urls = settings["redis"]
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ConfigError("redis: expected a URL or a list of URLs")
        if settings.get("storage"):
            raise ConfigError("--redis and --storage exclude each other: blobs live in one place")
        try:
            config.redis = RedisTarget(tuple(urls))
        except RedisConfigError as error:
            raise ConfigError(str(error)) from None
    if settings.get("read-tier") is not None:
        config.read_tier = cas_commands.size_option("--read-tier", str(settings["read-tier"]))
    if settings.get("workers") is not None:
        config.workers = int(settings["workers"])
    if settings.get("sandbox"):
        config.sandbox = str(settings["sandbox"])
    if settings.get("heartbeat-timeout"):
        config.heartbeat_timeout = float(settings["heartbeat-timeout"])
    if settings.get("max-size") is not None:
        config.max_size = cas_commands.size_option("--max-size", str(settings["max-size"]))
    if settings.get("gc-interval"):
        config.gc_interval = float(settings["gc-interval"])
    if settings.get("idle-timeout") is not None:
        config.idle_timeout = float(settings["idle-timeout"])
        if not config.idle_timeout > 0:
            raise ConfigError(f"--idle-timeout {settings['idle-timeout']}: expected seconds > 0")
    if settings.get("instance") is not None:
        names = settings["instance"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError("instance: expected a list of instance names")
        config.instances = names
    config.limits = limits_from(settings)
    return config


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    properties = []
    for item in args.property:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--property {item!r}: expected KEY=VALUE")
        properties.append((key, value))
    provide = []
    for directory in args.provide:
        try:
            provide.append(provided_directory(directory))
        except ValueError as error:
            raise ConfigError(f"--provide {error}") from None
        if not os.path.isdir(directory):
            raise ConfigError(f"--provide {directory!r}: not a directory")
    for server in args.server:
        try:
            split_target(server)
        except ValueError as error:
            raise ConfigError(f"--server: {error}") from None
    env = dict(DEFAULT_ENV)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    config = WorkerConfig(
        servers=args.server,
        env=env,
        workdir=args.workdir or reapi_home() / "worker",
        slots=args.slots,
        properties=properties,
        sandbox=args.sandbox,
        parent_pid=args.parent_pid,
        provide=provide,
        limits=limits_from(vars(args)),
    )
    if args.name:
        config.name = args.name
    try:
        if args.tls_ca:
            config.tls_ca = args.tls_ca.read_bytes()
        if args.auth_token_file:
            config.token = read_token(args.auth_token_file)
    except OSError as error:
        raise ConfigError(f"cannot read {error.filename}: {error.strerror}") from None
    except ValueError as error:  # a token file without a token
        raise ConfigError(str(error)) from None
    return config


async def _work(config: WorkerConfig) -> None:
    try:
        worker = Worker(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    async with asyncio.TaskGroup() as group:
        running = group.create_task(worker.run_forever())
        signalled = group.create_task(stopping.wait())
        # Until a signal, or until the worker itself ends (a local worker whose server is gone).
        await asyncio.wait({running, signalled}, return_when=asyncio.FIRST_COMPLETED)
        running.cancel()
        signalled.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reapi %(levelname)s %(message)s")
    try:
        if args.command == "serve":
            asyncio.run(serve(server_config(args)))
        elif args.command == "worker":
            asyncio.run(_work(worker_config(args)))
        elif args.command == "cas":
            return cas_commands.run(args)
    except (ConfigError, StorageError) as error:
        print(f"reapi: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reapi: {args.command} interrupted", file=sys.stderr)
        return 130
    return 0
