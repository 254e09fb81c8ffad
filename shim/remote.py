"""The agent's side of one server: upload what it lacks, Execute, fetch results.

Every failure is raised (grpc.aio.AioRpcError, ReapiError, ValueError): the
agent then leaves the compile to the local compiler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import code_pb2

from cas.existence import (
    REMEMBERED_BLOBS,
    TRUST_SERVER_SECONDS,
    ExistenceCache,
    ExistenceCachingStore,
)
from cas.remote import RemoteStore, channel_for
from cas.store import get_blob, put_missing
from reapi.core.conventions import PROVIDED_DIRS, provided_directory
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import NotFound, PermissionDenied
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from reapi.protos import worker_pb2
from reapi.protos import worker_pb2_grpc as worker_grpc

SHA256 = DigestFunction.SHA256
# Bytes of outcomes (objects) the agent keeps in memory by default (REAPI_CC_MEMORY).
OUTCOME_MEMORY = 128 << 20
# How long the server's word on what its workers provide is kept (seconds).
PROVIDED_SECONDS = 60.0
# How long a compile may run remotely (seconds).
EXECUTE_TIMEOUT = 3600


class RemoteFailed(Exception):
    """The remote side could not run an action (the compile did not fail:
    the worker refused it, or ran out of something); `reason` is a stats
    reason, the message the server's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    """What a compile's action gave, fetched: its exit code, output files
    (path as the action names it, bytes, executable) and streams."""

    exit_code: int
    files: list[tuple[str, bytes, bool]]
    stdout: bytes
    stderr: bytes

    @property
    def size(self) -> int:
        return sum(len(data) for _, data, _ in self.files) + len(self.stdout) + len(self.stderr)


class OutcomeMemory:
    """The outcomes fetched lately, by action, the least recently used
    forgotten first beyond `limit` bytes (REAPI_CC_MEMORY): a rebuild after
    `make clean` then takes its objects from the agent's memory, as ccache
    takes them from its directory, with no round trip to the server."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._outcomes: dict[Digest, Outcome] = {}  # in order of use, oldest first
        self._size = 0

    def get(self, action: Digest) -> Outcome | None:
        outcome = self._outcomes.pop(action, None)
        if outcome is not None:
            self._outcomes[action] = outcome
        return outcome

    def put(self, action: Digest, outcome: Outcome) -> None:
        if outcome.size > self._limit // 4:  # (one huge object would push out hundreds)
            return
        old = self._outcomes.pop(action, None)
        self._size += outcome.size - (old.size if old else 0)
        self._outcomes[action] = outcome
        while self._size > self._limit:
            self._size -= self._outcomes.pop(next(iter(self._outcomes))).size


class Server:
    """One server: its channel, the blobs it is known to hold, the outcomes
    fetched lately, and what its workers provide."""

    def __init__(
        self,
        target: str,
        memory: int = OUTCOME_MEMORY,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
        tls_ca: bytes | None = None,
    ) -> None:
        """`memory`: bytes of outcomes kept (0: none); `token`: sent as a
        bearer token; `tls_ca`: the CA a grpcs:// server's certificate is
        checked against (default: the system's)."""
        self.channel = channel_for(target, tls_ca)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        # Set once the server refuses this token uploads or execution: from
        # then on only the action cache is asked (a token that may only read).
        self.read_only = False
        known = ExistenceCache(REMEMBERED_BLOBS, TRUST_SERVER_SECONDS)
        self.store = ExistenceCachingStore(RemoteStore(self.channel, self._metadata), known)
        self._cache: Any = re_grpc.ActionCacheStub(self.channel)  # type: ignore[no-untyped-call]
        self._execution: Any = re_grpc.ExecutionStub(self.channel)  # type: ignore[no-untyped-call]
        self._workers: Any = worker_grpc.WorkersStub(self.channel)  # type: ignore[no-untyped-call]
        self._clock = clock
        self._provided: tuple[float, tuple[str, ...]] | None = None
        self._outcomes = OutcomeMemory(memory)

    async def provided(self) -> tuple[str, ...]:
        """The directories every worker provides (reapi/core/conventions.py), as
        the server said at most PROVIDED_SECONDS ago. A server that does not
        say (an older one) is taken to have workers that provide PROVIDED_DIRS."""
        now = self._clock()
        if self._provided is not None and now - self._provided[0] < PROVIDED_SECONDS:
            return self._provided[1]
        try:
            answer = await self._workers.GetProvided(
                worker_pb2.GetProvidedRequest(), timeout=60, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            directories = PROVIDED_DIRS
        else:
            directories = tuple(d for d in answer.directories if _usable(d))
        self._provided = (now, directories)
        return directories

    async def cached_result(self, action: Digest, outputs: list[str]) -> re_pb2.ActionResult | None:
        """The action cache's result for `action` (outputs inlined), or None."""
        request = re_pb2.GetActionResultRequest(
            action_digest=action.to_proto(),
            inline_stdout=True,
            inline_stderr=True,
            inline_output_files=outputs,
        )
        try:
            result: re_pb2.ActionResult = await self._cache.GetActionResult(
                request, metadata=self._metadata
            )
        except grpc.aio.AioRpcError:
            return None
        return result

    async def upload(self, digests: Iterable[Digest], data_of: Callable[[Digest], bytes]) -> int:
        """Send those of `digests` the server lacks; the bytes sent. Raises
        PermissionDenied when the token may not upload."""
        return await put_missing(self.store, list(set(digests)), data_of)

    async def execute(self, action: Digest, outputs: list[str]) -> re_pb2.ExecuteResponse:
        """Run `action` (the server answers from its action cache when it can);
        raises RemoteFailed when it ends without a result, PermissionDenied
        when the token may not execute."""
        request = re_pb2.ExecuteRequest(
            action_digest=action.to_proto(),
            inline_stdout=True,
            inline_stderr=True,
            inline_output_files=outputs,
        )
        last = None
        call = self._execution.Execute(request, timeout=EXECUTE_TIMEOUT, metadata=self._metadata)
        try:
            async for operation in call:
                last = operation
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise PermissionDenied(str(error.details())) from None
            raise
        response = re_pb2.ExecuteResponse()
        if last is None or not last.done or not last.response.Unpack(response):
            raise RemoteFailed("remote-error", "the Execute stream ended without a result")
        if response.status.code == code_pb2.FAILED_PRECONDITION:
            # A worker whose system files differ from ours, or that lacks them.
            raise RemoteFailed("worker-refused", response.status.message)
        if response.status.code != 0:
            raise RemoteFailed(
                "remote-error", f"remote execution failed: {response.status.message}"
            )
        return response

    def remembered(self, action: Digest) -> Outcome | None:
        """The outcome of `action` fetched lately, if it is still in memory."""
        return self._outcomes.get(action)

    async def fetch(self, action: Digest, result: re_pb2.ActionResult) -> Outcome:
        """`action`'s outcome, as `result` names it (outputs read from the CAS
        when they did not come inlined); one that succeeded is remembered."""
        files: list[tuple[str, bytes, bool]] = []
        if result.exit_code == 0:
            files = await self._output_files(result)
        stdout = await self._stream(result, "stdout")
        stderr = await self._stream(result, "stderr")
        outcome = Outcome(result.exit_code, files, stdout, stderr)
        if result.exit_code == 0:
            self._outcomes.put(action, outcome)
        return outcome

    async def _stream(self, result: re_pb2.ActionResult, name: str) -> bytes:
        """The result's `stdout` or `stderr`, inlined or read from the CAS."""
        raw: bytes = getattr(result, f"{name}_raw")
        if raw or not result.HasField(f"{name}_digest"):
            return raw
        return await get_blob(
            self.store, Digest.from_proto(SHA256, getattr(result, f"{name}_digest"))
        )

    async def _output_files(self, result: re_pb2.ActionResult) -> list[tuple[str, bytes, bool]]:
        """(path, bytes, executable) of each output file: inlined when the
        bytes match the digest, else read from the CAS."""
        digests = [Digest.from_proto(SHA256, f.digest) for f in result.output_files]
        found = {
            digest: output.contents
            for output, digest in zip(result.output_files, digests, strict=True)
            if digest.size == 0 or SHA256.digest_of(output.contents) == digest
        }
        missing = [digest for digest in digests if digest not in found]
        if missing:
            found.update(await self.store.get_many(missing))
        if lost := [digest for digest in digests if digest not in found]:
            raise NotFound(f"output {lost[0]} is missing from the CAS")
        return [
            (output.path, found[digest], output.is_executable)
            for output, digest in zip(result.output_files, digests, strict=True)
        ]


def _usable(directory: str) -> bool:
    """Whether a directory the server says workers provide is one (a lying
    or broken server must not make the agent leave project files out)."""
    try:
        return provided_directory(directory) == directory
    except ValueError:
        return False
