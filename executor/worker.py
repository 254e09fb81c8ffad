"""A worker process: takes leases from the server and runs them.

`reapi worker --server grpc://HOST:PORT [--slots N] [--property KEY=VALUE ...]`
keeps one Work stream open to the server (reapi/protos/worker.proto), sends a
heartbeat every HEARTBEAT_INTERVAL seconds, runs up to `slots` actions at once,
and reconnects when the connection drops: to the next of its servers, when it
was given several (`--server A --server B`, frontends of one service), with
backoff once it has tried them all. What it was running when the connection
dropped is abandoned: the server that leased it runs it again elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cas.existence import (
    REMEMBERED_BLOBS,
    TRUST_SERVER_SECONDS,
    ExistenceCache,
    ExistenceCachingStore,
)
from cas.remote import RemoteStore, channel_for
from executor.limits import DEFAULT_LIMITS, Limits, cgroup_v2_state
from executor.local_cache import LocalCache
from executor.runner import DEFAULT_ENV, ActionRunner
from executor.sandbox import Sandbox
from reapi.core.conventions import PROVIDED_DIRS
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import worker_pb2
from reapi.protos import worker_pb2_grpc as worker_grpc

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
MAX_BACKOFF = 10.0


@dataclass
class WorkerConfig:
    # grpc://HOST:PORT, grpcs://HOST:PORT or unix:PATH; more than one: tried in turn.
    servers: Sequence[str]
    workdir: Path
    name: str = field(default_factory=socket.gethostname)
    slots: int = 1
    properties: Sequence[tuple[str, str]] = ()
    sandbox: str = "bwrap"
    tls_ca: bytes | None = None
    token: str | None = None
    # Set by `reapi serve` for its local workers (its own pid): stop when it is gone.
    parent_pid: int | None = None
    # Directories provided to every action besides PROVIDED_DIRS (`--provide`).
    provide: Sequence[str] = ()
    # Environment variables an action gets when its Command does not set them
    # (`--env`; the REAPI allows it, and tools such as Pants rely on PATH).
    env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    # What each action may use (`--max-processes`, ...).
    limits: Limits = DEFAULT_LIMITS

    @property
    def provided(self) -> tuple[str, ...]:
        """Every directory the sandbox mounts for an action (reapi/core/conventions.py)."""
        return tuple(sorted({*PROVIDED_DIRS, *self.provide}))


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._sandbox = Sandbox(
            config.sandbox, config.workdir / "actions", config.slots, config.provided, config.limits
        )
        if config.sandbox == "bwrap":
            log.info("each action may use %s; %s", config.limits.describe(), cgroup_v2_state())

    async def run_forever(self) -> None:
        """Serve the server's leases until cancelled (or, for a local worker, until
        the server process that started it is gone)."""
        try:
            await self._until_parent_is_gone()
        finally:
            self._sandbox.close()

    async def _until_parent_is_gone(self) -> None:
        parent = self.config.parent_pid
        if parent is None:
            await self._serve()
            return
        async with asyncio.TaskGroup() as group:
            serving = group.create_task(self._serve())
            while os.getppid() == parent:
                await asyncio.sleep(1.0)
            log.warning("the server that started this worker is gone; stopping")
            serving.cancel()

    async def _serve(self) -> None:
        servers = self.config.servers
        backoff = 0.5
        for attempt in itertools.count():
            server = servers[attempt % len(servers)]
            started = time.monotonic()
            try:
                await self._session(server)
            except* (grpc.aio.AioRpcError, ConnectionError) as lost:
                # Plain, or grouped by the session's TaskGroup: either way, reconnect.
                log.warning("connection to %s lost: %s", server, lost.exceptions[0])
            if time.monotonic() - started > MAX_BACKOFF:
                backoff = 0.5  # it had been working: try again soon
            if (attempt + 1) % len(servers) == 0:  # each tried once since the last pause
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)

    async def _session(self, server: str) -> None:
        config = self.config
        metadata = (("authorization", f"Bearer {config.token}"),) if config.token else None
        # A lease can be larger than gRPC's default 4 MiB (an Action and Command
        # of up to 4 MiB, and up to 2 MiB of inputs): its server's messages are
        # taken whatever their size.
        async with channel_for(server, config.tls_ca, max_receive=-1) as channel:
            # Outputs already stored (an empty file, a result seen before) are not asked about.
            known = ExistenceCache(REMEMBERED_BLOBS, TRUST_SERVER_SECONDS)
            store = ExistenceCachingStore(RemoteStore(channel, metadata), known)
            cache = LocalCache(config.workdir / "cache", store)
            runner = ActionRunner(store, cache, config.name, config.provided, config.env)
            outgoing: asyncio.Queue[worker_pb2.WorkerMessage] = asyncio.Queue()
            hello = worker_pb2.Hello(
                name=config.name,
                slots=config.slots,
                properties=[
                    re_pb2.Platform.Property(name=k, value=v) for k, v in sorted(config.properties)
                ],
                provided_directories=config.provided,
            )
            outgoing.put_nowait(worker_pb2.WorkerMessage(hello=hello))

            async def requests() -> AsyncIterator[worker_pb2.WorkerMessage]:
                while True:
                    yield await outgoing.get()

            stub: Any = worker_grpc.WorkersStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Work(requests(), metadata=metadata)
            running: dict[str, asyncio.Task[None]] = {}
            async with asyncio.TaskGroup() as group:
                heartbeat = group.create_task(self._heartbeat(outgoing))
                log.info("worker %s connected to %s", config.name, server)
                async for message in call:
                    if message.WhichOneof("kind") == "assign":
                        lease = message.assign.lease_id
                        running[lease] = group.create_task(
                            self._run(runner, message.assign, outgoing, running)
                        )
                    elif message.WhichOneof("kind") == "cancel":
                        task = running.pop(message.cancel.lease_id, None)
                        if task is not None:
                            task.cancel()
                heartbeat.cancel()
                for task in running.values():
                    task.cancel()
            raise ConnectionError("the server closed the Work stream")

    async def _heartbeat(self, outgoing: asyncio.Queue[worker_pb2.WorkerMessage]) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            outgoing.put_nowait(worker_pb2.WorkerMessage(heartbeat=worker_pb2.Heartbeat()))

    async def _run(
        self,
        runner: ActionRunner,
        assign: worker_pb2.Assign,
        outgoing: asyncio.Queue[worker_pb2.WorkerMessage],
        running: dict[str, asyncio.Task[None]],
    ) -> None:
        log.info("running %s/%d", assign.action_digest.hash, assign.action_digest.size_bytes)
        try:
            async with self._sandbox.slot() as slot:
                finished = await runner.run(assign, slot)
                running.pop(assign.lease_id, None)
                outgoing.put_nowait(worker_pb2.WorkerMessage(finished=finished))
                # Let the stream send it before the tree is put back: that is
                # not on the way to the result.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            log.info("lease %s cancelled", assign.lease_id)
        finally:
            running.pop(assign.lease_id, None)
