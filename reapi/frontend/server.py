"""Assembling the server: storage, services, security, and the run loop."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cas.action_cache import ActionCache, ActionResultStore, DiskActionResultStore
from cas.disk import DiskStore, process_alive
from cas.gc import GRACE, HIGH_WATERMARK, LOW_WATERMARK, human
from cas.read_tier import ReadTier
from cas.redis_conn import Client, RedisConfigError, RedisTarget, check_no_eviction, connect
from cas.redis_lifecycle import GcRunning, collect_redis
from cas.redis_store import RedisActionResultStore, RedisStore
from cas.store import BlobStore
from executor.limits import DEFAULT_LIMITS, Limits
from executor.redis_scheduler import RedisScheduler
from executor.scheduler import Job, OnComplete, Scheduler, Scheduling
from reapi.core.errors import ReapiError
from reapi.frontend.access import WORKER, AccessInterceptor, Caller, load_grants
from reapi.frontend.security import ConfigError, TlsFiles, check_exposure, split_address
from reapi.frontend.services.action_cache import ActionCacheService
from reapi.frontend.services.bytestream import ByteStreamService, add_bytestream_to_server
from reapi.frontend.services.capabilities import CapabilitiesService
from reapi.frontend.services.cas import CasService
from reapi.frontend.services.execution import ExecutionService, OperationsService
from reapi.frontend.services.workers import HEARTBEAT_TIMEOUT, WorkersService
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from reapi.protos import worker_pb2_grpc as worker_grpc

log = logging.getLogger("reapi.frontend.server")

MAX_BATCH_TOTAL_SIZE = 4 * 1024 * 1024
# Room for a full batch plus its digests and framing.
MAX_MESSAGE = MAX_BATCH_TOTAL_SIZE + 4 * 1024 * 1024
SHUTDOWN_GRACE_SECONDS = 10.0
IDLE_TIMEOUT = 120.0
# A connection that has not completed its TLS and HTTP/2 handshake by then is
# closed (gRPC's default, 120 s, lets a silent socket hold a descriptor for long).
HANDSHAKE_TIMEOUT = 10.0
# Seconds between two looks at the store's size, with --max-size.
GC_INTERVAL = 60.0


def reapi_home() -> Path:
    """Where the server and the shim keep state: $REAPI_HOME, default ~/.cache/reapi."""
    return Path(os.environ.get("REAPI_HOME") or Path.home() / ".cache" / "reapi")


def default_storage() -> Path:
    return reapi_home() / "storage"


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:8980"
    storage: Path = field(default_factory=default_storage)
    # Where the CAS and action cache live instead of `storage`, shared by frontends.
    redis: RedisTarget | None = None
    # With `redis`: bytes of this frontend's local disk copy of blobs it read (0: none).
    read_tier: int = 1 << 30
    tls: TlsFiles | None = None
    auth_tokens: Path | None = None
    insecure: bool = False
    max_batch_total_size: int = MAX_BATCH_TOTAL_SIZE
    # Local worker processes `serve` starts, and their sandbox.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    sandbox: str = "bwrap"
    limits: Limits = DEFAULT_LIMITS
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    # Background gc: keep the store's blobs under max_size bytes (None: no limit).
    max_size: int | None = None
    gc_interval: float = GC_INTERVAL
    # The instance names served (None: any name).
    instances: list[str] | None = None
    # A connection with no call, or an upload stream that sends nothing, for this
    # long is closed (seconds): idle clients cannot hold the server's file descriptors.
    idle_timeout: float = IDLE_TIMEOUT


@dataclass(frozen=True)
class Backends:
    """What the services keep their state in, built from the configuration
    (`build_backends`, `open_backends`): the one place that chooses a backend."""

    store: BlobStore
    results: ActionResultStore
    # Makes the scheduler, given what it calls on each completed job.
    scheduler: Callable[[OnComplete], Scheduling] = Scheduler
    # The Redis client they share, when they live in Redis.
    redis: Client | None = None
    # This frontend's local copy of what it read from Redis (a directory it owns).
    read_tier: Path | None = None

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        if self.read_tier is not None:
            shutil.rmtree(self.read_tier, ignore_errors=True)


def build_backends(config: ServerConfig) -> Backends:
    """The embedded default: the CAS and the action cache on disk under
    `config.storage`. ConfigError when unusable."""
    try:
        return Backends(DiskStore(config.storage), DiskActionResultStore(config.storage))
    except OSError as error:
        raise ConfigError(
            f"cannot use storage directory {config.storage}: {error.strerror or error}"
        ) from None


async def open_backends(config: ServerConfig) -> Backends:
    """The backends `config` names: in Redis with `config.redis` (connected and
    checked now), else on disk. ConfigError when unusable or unreachable."""
    if config.redis is None:
        return build_backends(config)
    try:
        client = await connect(config.redis)
    except RedisConfigError as error:
        raise ConfigError(str(error)) from None
    try:
        warning = await check_no_eviction(client, config.redis)
    except RedisConfigError as error:
        await client.aclose()
        raise ConfigError(str(error)) from None
    if warning:
        log.warning("%s", warning)
    target = config.redis

    def scheduler(on_complete: OnComplete) -> Scheduling:
        return RedisScheduler(client, target, on_complete)

    store: BlobStore = RedisStore(client)
    read_tier = None
    if config.read_tier > 0:
        read_tier = _fresh_read_tier(reapi_home())
        store = ReadTier(store, DiskStore(read_tier))
    results = RedisActionResultStore(client)
    return Backends(store, results, scheduler, client, read_tier)


def _fresh_read_tier(home: Path) -> Path:
    """A read tier directory of this process's own, HOME/read-tier-PID; those of
    frontends that died without removing theirs (kill -9) are removed first."""
    home.mkdir(parents=True, exist_ok=True)
    for old in home.glob("read-tier-*"):
        pid = old.name.removeprefix("read-tier-")
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    directory = home / f"read-tier-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)  # a dead process's, with our pid
    directory.mkdir()
    return directory


class Server:
    """The gRPC server with every service wired to the backends."""

    def __init__(self, config: ServerConfig, backends: Backends | None = None) -> None:
        """`backends`: built from `config` when not given."""
        host, _port = split_address(config.listen)
        grants = load_grants(config.auth_tokens) if config.auth_tokens else None
        check_exposure(host, config.tls, grants is not None, config.insecure)
        # Workers are trusted explicitly: where tokens are required, the local
        # workers `serve` starts get a token of their own, valid for this run.
        self.worker_token: str | None = None
        if grants is not None:
            self.worker_token = secrets.token_urlsafe(32)
            grants = grants.with_token(
                self.worker_token, Caller("local-workers", frozenset({WORKER}))
            )
        self._credentials = config.tls.credentials() if config.tls else None
        backends = backends or build_backends(config)
        store, results = backends.store, backends.results
        self.config = config
        self.bytestream = ByteStreamService(store, config.idle_timeout)
        self.health = health.aio.HealthServicer()
        served = frozenset(config.instances) if config.instances is not None else None
        guarded = grants is not None or served is not None
        interceptors = [AccessInterceptor(grants, served)] if guarded else []
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
                ("grpc.max_connection_idle_ms", int(config.idle_timeout * 1000)),
                ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT * 1000)),
            ],
        )
        re_grpc.add_CapabilitiesServicer_to_server(
            CapabilitiesService(config.max_batch_total_size), self._grpc
        )
        re_grpc.add_ContentAddressableStorageServicer_to_server(
            CasService(store, config.max_batch_total_size), self._grpc
        )
        cache = ActionCache(results, store)
        re_grpc.add_ActionCacheServicer_to_server(ActionCacheService(cache), self._grpc)

        async def store_result(job: Job) -> None:
            """Cache what ran to completion with exit code 0, unless told not to."""
            assert job.response is not None
            if job.cacheable and job.response.result.exit_code == 0:
                await cache.put(job.action_digest, job.response.result, job.instance_name)

        self.scheduler = backends.scheduler(store_result)
        re_grpc.add_ExecutionServicer_to_server(
            ExecutionService(store, cache, self.scheduler), self._grpc
        )
        operations_pb2_grpc.add_OperationsServicer_to_server(
            OperationsService(self.scheduler), self._grpc
        )
        self.workers = WorkersService(self.scheduler, store, config.heartbeat_timeout)
        worker_grpc.add_WorkersServicer_to_server(self.workers, self._grpc)
        add_bytestream_to_server(self.bytestream, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        self.port = 0

    async def start(self, local_socket: Path | None = None) -> int:
        """Bind and start serving; returns the bound port (useful with port 0).
        With `local_socket`, also serve on that Unix socket: how the local
        workers `serve` starts reach it, whatever TLS the network port asks."""
        _check_bindable(self.config.listen)
        await self.scheduler.start()
        try:
            if self._credentials is not None:
                self.port = self._grpc.add_secure_port(self.config.listen, self._credentials)
            else:
                self.port = self._grpc.add_insecure_port(self.config.listen)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ConfigError(f"cannot listen on {self.config.listen}: address in use or invalid")
        if local_socket is not None:
            try:
                self._grpc.add_insecure_port(f"unix:{local_socket}")
            except RuntimeError:
                raise ConfigError(
                    f"cannot make the local workers' socket {local_socket} (a path of at "
                    "most 107 bytes; set TMPDIR to a shorter directory)"
                ) from None
        await self._grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop taking calls, let running ones finish for `grace` seconds, then
        discard unfinished uploads. Work streams and unfinished executions end
        at once: nothing would run them any more."""
        await self.health.enter_graceful_shutdown()
        self.workers.close()
        await self.scheduler.shutdown()
        await self._grpc.stop(grace)
        await self.bytestream.close()


def _check_bindable(listen: str) -> None:
    """Fail with one clear line before gRPC would log its own multi-line bind error."""
    host, port = split_address(listen)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConfigError(f"cannot listen on {listen}: {error.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(f"cannot listen on {listen}: {error.strerror}") from None


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    backends = await open_backends(config)
    server = Server(config, backends)
    # A directory only this user can enter: the local workers' socket and token.
    with tempfile.TemporaryDirectory(prefix="reapi-serve-") as private:
        local_socket = Path(private) / "workers.sock"
        port = await server.start(local_socket if config.workers else None)
        host, _ = split_address(config.listen)
        where = f"Redis {config.redis}" if config.redis else f"storage {config.storage}"
        log.info("serving on %s:%d, %s", host, port, where)
        token_file = None
        if server.worker_token is not None:
            token_file = Path(private) / "worker-token"
            token_file.write_text(server.worker_token + "\n")
        workers = [
            await _start_local_worker(config, local_socket, n, token_file)
            for n in range(config.workers)
        ]
        if workers:
            log.info("started %d local worker(s), sandbox %s", len(workers), config.sandbox)
        async with asyncio.TaskGroup() as group:
            collectors = [group.create_task(gc) for gc in _collectors(config, backends)]
            await stopping.wait()
            log.info("stopping")
            for collector in collectors:
                collector.cancel()
        for worker in workers:
            if worker.returncode is None:
                worker.terminate()
        for worker in workers:
            await worker.wait()
    await server.stop()
    await backends.close()


def _collectors(config: ServerConfig, backends: Backends) -> list[Coroutine[Any, Any, None]]:
    """The background gcs: of the store with --max-size, and of the read tier."""
    found = []
    if config.max_size is not None and backends.redis is not None:
        found.append(_keep_redis_under(backends.redis, config))
    elif config.max_size is not None:
        found.append(_keep_under(config.storage, config.max_size, config.gc_interval))
    if backends.read_tier is not None:  # a cache: no grace period to keep
        found.append(_keep_under(backends.read_tier, config.read_tier, config.gc_interval, 0))
    return found


async def _keep_under(
    storage: Path, max_size: int, interval: float, grace: float | None = None
) -> None:
    """The background gc: every `interval`, `reapi cas gc` in a child process
    (the same code as by hand, on the other core, with its own database
    connection) brings the storage directory from above HIGH_WATERMARK of
    max_size down to LOW_WATERMARK of it. It runs alongside the services; see
    cas/gc.py. `grace`: gc's own default unless given."""
    high, low = int(max_size * HIGH_WATERMARK), int(max_size * LOW_WATERMARK)
    command = [
        sys.executable, "-m", "reapi", "cas", "gc", "--storage", str(storage),
        "--max-size", str(low), "--if-above", str(high),
    ]  # fmt: skip
    if grace is not None:
        command += ["--grace", str(grace)]
    while True:
        await asyncio.sleep(interval)
        pipe = asyncio.subprocess.PIPE
        process = await asyncio.create_subprocess_exec(*command, stdout=pipe, stderr=pipe)
        try:
            out, err = await process.communicate()
        except asyncio.CancelledError:
            process.terminate()  # an interrupted gc leaves a consistent store
            await process.wait()
            raise
        if process.returncode != 0:
            log.warning("background gc failed: %s", err.decode(errors="replace").strip())
        elif not out.startswith(b"nothing to do"):
            log.info("background gc:\n%s", out.decode(errors="replace").rstrip())


async def _keep_redis_under(client: Client, config: ServerConfig) -> None:
    """The background gc on Redis: as `_keep_under`, in this process (the work
    is Redis's). Another frontend's gc running at the time is no error: that
    one does the work."""
    assert config.max_size is not None
    high, low = int(config.max_size * HIGH_WATERMARK), int(config.max_size * LOW_WATERMARK)
    while True:
        await asyncio.sleep(config.gc_interval)
        try:
            report = await collect_redis(client, low, grace=GRACE, if_above=high)
        except GcRunning:
            continue
        except ReapiError as error:
            log.warning("background gc failed: %s", error.message)
            continue
        if report.evicted_blobs or report.kept_recent_bytes:
            log.info(
                "background gc: evicted %d blobs (%s), %s above the size kept (grace period)",
                report.evicted_blobs, human(report.evicted_bytes), human(report.kept_recent_bytes),
            )  # fmt: skip


async def _start_local_worker(
    config: ServerConfig, local_socket: Path, number: int, token_file: Path | None
) -> asyncio.subprocess.Process:
    """`reapi worker` on this machine, reaching the server through its local
    socket with the worker token (when the server requires tokens)."""
    args = [
        "--server",
        f"unix:{local_socket}",
        "--slots",
        "1",
        "--sandbox",
        config.sandbox,
        "--name",
        f"{socket.gethostname()}-local-{number}",
        "--workdir",
        str(reapi_home() / "worker"),
        "--parent-pid",
        str(os.getpid()),
    ]
    if token_file is not None:
        args += ["--auth-token-file", str(token_file)]
    limits = config.limits
    args += ["--max-processes", str(limits.processes), "--max-memory", str(limits.memory)]
    args += ["--max-tmp", str(limits.tmp), "--max-tree", str(limits.tree)]
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "reapi", "worker", *args)
