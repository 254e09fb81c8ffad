"""Execution (Execute, WaitExecution) and google.longrunning.Operations.

Execute checks everything it can before an operation exists, and answers a
gRPC status for what is wrong: an unknown digest function or a malformed
action is INVALID_ARGUMENT; missing inputs are FAILED_PRECONDITION with a
PreconditionFailure naming every missing blob. After that, everything that
happens is reported in the operation's ExecuteResponse.status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2

from cas.action_cache import ActionCache
from cas.store import BlobStore
from cas.tree import TreeRead, read_tree
from executor.scheduler import COMPLETED, Job, Properties, Scheduling
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import FailedPrecondition, InvalidArgument, NotFound
from reapi.frontend.access import current_caller
from reapi.frontend.operation_filter import matches, parse_filter
from reapi.frontend.services.status import grpc_errors
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc

Context = grpc.aio.ServicerContext[Any, Any]

# The longest Action.timeout a client may ask (seconds); workers apply the default
# (executor/runner.py) when an action has none.
MAX_TIMEOUT = 3600.0
# The Action and Command travel whole in one lease message (with some of the
# inputs, reapi/frontend/services/workers.py): far more than a process can be given to
# run (ARG_MAX), and well within the server's message limit.
MAX_ACTION_BYTES = 4 * 1024 * 1024
# Execute's stream says nothing until the action has been queued or running this
# long (seconds): most actions then cost one message, their result. Longer ones
# get their operation (its name, for WaitExecution) and every stage after it.
FIRST_UPDATE_AFTER = 0.5
# ListOperations' page size when the client asks none, and its largest; a page
# also ends before LIST_PAGE_BYTES, since an operation carries its whole result.
LIST_PAGE_SIZE = 1000
LIST_PAGE_BYTES = 2 * 1024 * 1024


class ExecutionService(re_grpc.ExecutionServicer):
    def __init__(self, store: BlobStore, cache: ActionCache, scheduler: Scheduling) -> None:
        self._store = store
        self._cache = cache
        self._scheduler = scheduler

    @grpc_errors
    async def Execute(
        self, request: re_pb2.ExecuteRequest, context: Context
    ) -> AsyncIterator[operations_pb2.Operation]:
        function = DigestFunction.from_wire(request.digest_function)
        action_digest = Digest.from_proto(function, request.action_digest)
        action, command, tree = await self._load(action_digest)
        if not request.skip_cache_lookup and not action.do_not_cache:
            try:
                cached = await self._cache.get(
                    action_digest,
                    inline_stdout=request.inline_stdout,
                    inline_stderr=request.inline_stderr,
                    inline_files=request.inline_output_files,
                    instance_name=request.instance_name,
                )
            except NotFound:
                pass
            else:
                response = re_pb2.ExecuteResponse(result=cached, cached_result=True)
                yield _operation(
                    f"operations/cached-{action_digest.hash}", action_digest, COMPLETED, response
                )
                return
        job = await self._scheduler.submit(
            action_digest,
            action,
            command,
            request.instance_name,
            platform_requirements(action, command),
            request.execution_policy.priority,
            input_directories=list(tree.blobs.values()),
            input_files=list({digest for digest, _ in tree.files()}),
            owner=current_caller().name,
        )
        async for snapshot in self._scheduler.watch(job, quiet=FIRST_UPDATE_AFTER):
            yield await self._job_operation(snapshot, request)

    @grpc_errors
    async def WaitExecution(
        self, request: re_pb2.WaitExecutionRequest, context: Context
    ) -> AsyncIterator[operations_pb2.Operation]:
        job = await visible_job(self._scheduler, request.name)
        async for snapshot in self._scheduler.watch(job):
            yield await self._job_operation(snapshot, None)

    async def _job_operation(
        self, job: Job, request: re_pb2.ExecuteRequest | None
    ) -> operations_pb2.Operation:
        # The job as the watcher saw it: it may complete while this awaits.
        stage, response = job.stage, job.response
        wants_inline = request is not None and (
            request.inline_stdout or request.inline_stderr or request.inline_output_files
        )
        if response is not None and wants_inline and response.HasField("result"):
            assert request is not None
            response, stored = re_pb2.ExecuteResponse(), response
            response.CopyFrom(stored)
            await self._cache.inline(
                job.action_digest.function,
                response.result,
                request.inline_stdout,
                request.inline_stderr,
                request.inline_output_files,
            )
        return _operation(job.name, job.action_digest, stage, response, job)

    async def _load(self, action_digest: Digest) -> tuple[re_pb2.Action, re_pb2.Command, TreeRead]:
        """The Action, the Command and the input tree, checked;
        raises FailedPrecondition listing every missing blob (action, command,
        directories, files)."""
        found = await self._store.get_many([action_digest])
        if action_digest not in found:
            raise _missing([action_digest])
        action = _parse(re_pb2.Action, found[action_digest], "Action")
        for field in ("command_digest", "input_root_digest"):
            if not action.HasField(field):
                raise InvalidArgument(
                    f"the Action has no {field}; an Action names its Command and its "
                    "input root (the empty Directory's digest for no inputs)"
                )
        function = action_digest.function
        command_digest = Digest.from_proto(function, action.command_digest)
        root_digest = Digest.from_proto(function, action.input_root_digest)
        if action_digest.size + command_digest.size > MAX_ACTION_BYTES:
            raise InvalidArgument(
                f"the Action and its Command are {action_digest.size + command_digest.size} "
                f"bytes; this server runs actions of up to {MAX_ACTION_BYTES} bytes"
            )
        if action.HasField("timeout"):
            timeout = action.timeout.ToTimedelta().total_seconds()
            if timeout > MAX_TIMEOUT or timeout < 0:
                raise InvalidArgument(
                    f"Action.timeout {timeout:g}s is outside what this server allows "
                    f"(0 to {MAX_TIMEOUT:g}s)"
                )
        tree = await read_tree(self._store, root_digest)
        missing = await missing_inputs(self._store, command_digest, tree)
        if missing:
            raise _missing(missing)
        command_blob = await self._store.get_many([command_digest])
        command = _parse(re_pb2.Command, command_blob[command_digest], "Command")
        if not command.arguments:
            raise InvalidArgument("Command.arguments is empty")
        return action, command, tree


async def visible_job(scheduler: Scheduling, name: str) -> Job:
    """The job named `name` if the caller may see it: one of its owners, or an
    admin. To anyone else it does not exist (NotFound, as for an unknown name)."""
    job = await scheduler.job(name)
    if not current_caller().sees(job.owners, job.instance_name):
        raise NotFound(f"operation {name!r} not found; it may have expired")
    return job


async def missing_inputs(store: BlobStore, command: Digest, tree: TreeRead) -> list[Digest]:
    """Every blob an action needs that the CAS lacks: the command, and the
    input tree's directories and files."""
    for directory in tree.directories.values():
        for link in directory.symlinks:
            if link.target.startswith("/"):
                raise InvalidArgument(
                    f"input symlink {link.name} -> {link.target}: absolute targets are not "
                    "allowed (SymlinkAbsolutePathStrategy.DISALLOWED)"
                )
    files = sorted({command, *(digest for digest, _ in tree.files())})
    return [*tree.missing, *await store.find_missing(files)]


def platform_requirements(action: re_pb2.Action, command: re_pb2.Command) -> Properties:
    """Action.platform when set (REAPI v2.2), else the deprecated Command.platform."""
    platform = action.platform if action.platform.properties else command.platform
    return frozenset((p.name, p.value) for p in platform.properties)


def _parse(kind: Any, data: bytes, what: str) -> Any:
    try:
        return kind.FromString(data)
    except DecodeError:
        raise InvalidArgument(f"the {what} blob is not a valid {what} message") from None


def _missing(digests: list[Digest]) -> FailedPrecondition:
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type="MISSING", subject=f"blobs/{digest.resource_path()}"
            )
            for digest in digests
        ]
    )
    return FailedPrecondition(
        f"{len(digests)} input blob(s) missing from the CAS, e.g. {digests[0]}",
        details=(failure,),
    )


def _operation(
    name: str,
    action_digest: Digest,
    stage: int,
    response: re_pb2.ExecuteResponse | None,
    job: Job | None = None,
) -> operations_pb2.Operation:
    """The Operation message; with the `job` that runs it, its metadata says when
    it was queued and, once leased, which worker runs it."""
    metadata = re_pb2.ExecuteOperationMetadata(
        stage=stage,  # type: ignore[arg-type]
        action_digest=action_digest.to_proto(),
        digest_function=action_digest.function.value,
    )
    if job is not None:
        partial = metadata.partial_execution_metadata
        partial.queued_timestamp.FromNanoseconds(int(job.queued_at * 1e9))
        partial.worker = job.worker
    operation = operations_pb2.Operation(name=name, done=stage == COMPLETED)
    operation.metadata.Pack(metadata)
    if stage == COMPLETED and response is not None:
        operation.response.Pack(response)
    return operation


def _page_position(token: str) -> tuple[float, str]:
    when, _, name = token.partition(" ")
    try:
        return float(when), name
    except ValueError:
        raise InvalidArgument(f"page_token {token!r} is not one this server gave") from None


class OperationsService(operations_pb2_grpc.OperationsServicer):  # type: ignore[misc]
    """Get, List, Cancel and Wait over the scheduler's jobs."""

    def __init__(self, scheduler: Scheduling) -> None:
        self._scheduler = scheduler

    def _message(self, job: Job) -> operations_pb2.Operation:
        return _operation(job.name, job.action_digest, job.stage, job.response, job)

    @grpc_errors
    async def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: Context
    ) -> operations_pb2.Operation:
        return self._message(await visible_job(self._scheduler, request.name))

    @grpc_errors
    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: Context
    ) -> operations_pb2.ListOperationsResponse:
        """The operations of instance `request.name` (as `bgd operation list`
        sends it; empty for the default) the server still knows, the caller's
        own (an admin's: everyone's), that pass the filter
        (reapi/frontend/operation_filter.py), oldest first, a page at a time: the page
        token names the last one listed (its time and name)."""
        clauses = parse_filter(request.filter)
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, not {request.page_size}")
        size = min(request.page_size or LIST_PAGE_SIZE, LIST_PAGE_SIZE)
        caller = current_caller()
        jobs = sorted(
            (
                job
                for job in await self._scheduler.jobs()
                if job.instance_name == request.name
                and caller.sees(job.owners, job.instance_name)
                and matches(clauses, job)
            ),
            key=lambda job: (job.queued_at, job.name),
        )
        if request.page_token:
            after = _page_position(request.page_token)
            jobs = [job for job in jobs if (job.queued_at, job.name) > after]
        listed = operations_pb2.ListOperationsResponse()
        room = LIST_PAGE_BYTES
        for job in jobs[:size]:
            operation = self._message(job)
            room -= operation.ByteSize()
            if room < 0 and listed.operations:
                break
            listed.operations.append(operation)
        if len(listed.operations) < len(jobs):
            last = jobs[len(listed.operations) - 1]
            listed.next_page_token = f"{last.queued_at!r} {last.name}"
        return listed

    @grpc_errors
    async def CancelOperation(
        self, request: operations_pb2.CancelOperationRequest, context: Context
    ) -> empty_pb2.Empty:
        caller = current_caller()
        await visible_job(self._scheduler, request.name)
        await self._scheduler.cancel(request.name, None if caller.is_admin else caller.name)
        return empty_pb2.Empty()

    @grpc_errors
    async def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: Context
    ) -> operations_pb2.Operation:
        job = await visible_job(self._scheduler, request.name)
        timeout = (
            request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else None
        )
        try:
            async with asyncio.timeout(timeout):
                async for _ in self._scheduler.watch(job):
                    pass
        except TimeoutError:
            pass
        return self._message(job)
