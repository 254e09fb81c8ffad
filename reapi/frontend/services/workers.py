"""The Workers service: the server's end of the lease protocol (reapi/protos/worker.proto)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.rpc import code_pb2, status_pb2

from cas.store import BlobStore
from executor.scheduler import Job, Scheduling, WorkerHandle
from reapi.core.conventions import PROVIDED_DIRS, provided_directory
from reapi.core.errors import InvalidArgument, ReapiError
from reapi.frontend.access import current_caller
from reapi.frontend.services.status import grpc_errors
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import worker_pb2
from reapi.protos import worker_pb2_grpc as worker_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# A worker that sends nothing for this long is taken for dead (seconds).
HEARTBEAT_TIMEOUT = 30.0
# Output blobs up to this many bytes in all may come inside a Finished message
# (the rest the worker uploads first): far below gRPC's 4 MiB message limit.
OUTPUT_BLOB_BYTES = 1 << 20
# Input directories and small files up to this many bytes in all come with a
# lease (the worker reads the rest from the CAS): a lease stays a small message
# whatever the size of the input tree.
LEASE_INPUT_BYTES = 2 << 20
# Files up to this size may come with a lease (most sources and headers).
LEASE_FILE_BYTES = 256 << 10


class _WorkerGone(Exception):
    """Ends a Work stream; the message says why."""


class WorkersService(worker_grpc.WorkersServicer):
    def __init__(
        self, scheduler: Scheduling, store: BlobStore, heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    ) -> None:
        self._scheduler = scheduler
        self._store = store
        self._heartbeat_timeout = heartbeat_timeout
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End every Work stream (the server is stopping)."""
        self._closing.set()

    @grpc_errors
    async def Work(
        self, request_iterator: AsyncIterator[worker_pb2.WorkerMessage], context: Context
    ) -> None:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("kind") != "hello":
            raise InvalidArgument("a Work stream starts with Hello")
        hello = first.hello
        properties = frozenset((p.name, p.value) for p in hello.properties)
        try:
            provided = tuple(sorted({provided_directory(d) for d in hello.provided_directories}))
        except ValueError as error:
            raise InvalidArgument(f"Hello: {error}") from None
        worker = await self._scheduler.connect(
            hello.name or context.peer(),
            properties,
            hello.slots,
            provided or PROVIDED_DIRS,
            instances=current_caller().instances,
        )
        reason = "stream ended"
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._receive(messages, worker))
                group.create_task(self._assign(context, worker))
                group.create_task(self._cancel(context, worker))
                group.create_task(self._until_closing())
        except* _WorkerGone as gone:
            reason = str(gone.exceptions[0])
        except* Exception as failed:
            reason = f"{type(failed.exceptions[0]).__name__}: {failed.exceptions[0]}"
        finally:
            await self._scheduler.disconnect(worker, reason)

    @grpc_errors
    async def GetProvided(
        self, request: worker_pb2.GetProvidedRequest, context: Context
    ) -> worker_pb2.Provided:
        return worker_pb2.Provided(directories=self._scheduler.provided())

    async def _receive(
        self, messages: AsyncIterator[worker_pb2.WorkerMessage], worker: WorkerHandle
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self._heartbeat_timeout):
                    message = await anext(messages, None)
            except TimeoutError:
                raise _WorkerGone(f"no heartbeat for {self._heartbeat_timeout:g}s") from None
            if message is None:
                raise _WorkerGone("stream ended")
            if message.WhichOneof("kind") == "finished":
                finished = message.finished
                response = await self._store_outputs(worker, finished)
                await self._scheduler.finish(worker, finished.lease_id, response)

    async def _store_outputs(
        self, worker: WorkerHandle, finished: worker_pb2.Finished
    ) -> re_pb2.ExecuteResponse:
        """Put the blobs that came with the result in the CAS; the response, or
        an error in its place when they could not all be stored."""
        job = worker.leases.get(finished.lease_id)
        if not finished.output_blobs or job is None:
            return finished.response
        function = job.action_digest.function
        blobs = [(function.digest_of(data), data) for data in finished.output_blobs]
        try:
            errors = [error for error in await self._store.put_many(blobs) if error is not None]
        except ReapiError as error:  # the store is unreachable (Redis failing over)
            errors = [error]
        if not errors:
            return finished.response
        log.error("outputs of %s not stored: %s", job.action_digest, errors[0].message)
        # UNAVAILABLE when the store is (clients retry that), else INTERNAL.
        code = code_pb2.UNAVAILABLE if errors[0].code == code_pb2.UNAVAILABLE else code_pb2.INTERNAL
        status = status_pb2.Status(
            code=code, message=f"storing the outputs failed: {errors[0].message}"
        )
        return re_pb2.ExecuteResponse(status=status)

    async def _until_closing(self) -> None:
        await self._closing.wait()
        raise _WorkerGone("server stopping")

    async def _assign(self, context: Context, worker: WorkerHandle) -> None:
        while True:
            job = await self._scheduler.next_job(worker)
            assign = worker_pb2.Assign(
                lease_id=job.lease_id,
                action_digest=job.action_digest.to_proto(),
                digest_function=job.action_digest.function.value,
                action=job.action,
                command=job.command,
                instance_name=job.instance_name,
                output_blob_bytes=OUTPUT_BLOB_BYTES,
            )
            await add_inputs(self._store, assign, job, worker)
            await context.write(worker_pb2.ServerMessage(assign=assign))

    async def _cancel(self, context: Context, worker: WorkerHandle) -> None:
        while True:
            lease_id = await worker.cancels.get()
            await context.write(
                worker_pb2.ServerMessage(cancel=worker_pb2.Cancel(lease_id=lease_id))
            )


async def add_inputs(
    store: BlobStore, assign: worker_pb2.Assign, job: Job, worker: WorkerHandle
) -> None:
    """What the worker would otherwise read from the CAS, up to
    LEASE_INPUT_BYTES: the input tree's directories, then the small files
    it was not leased before (for a compile, the new source)."""
    budget = LEASE_INPUT_BYTES
    for blob in job.input_directories:
        if len(blob) <= budget:
            assign.input_directories.append(blob)
            budget -= len(blob)
    files = []
    for digest in job.input_files:
        if 0 < digest.size <= min(budget, LEASE_FILE_BYTES) and digest not in worker.held:
            files.append(digest)
            budget -= digest.size
    if files:
        try:
            found = await store.get_many(files)
        except (ReapiError, OSError) as error:  # the worker will ask, and be told
            log.warning("input files of %s not read for its lease: %s", job.action_digest, error)
            found = {}
        assign.input_files.extend(found[d] for d in files if d in found)
    worker.held.add(job.input_files)
