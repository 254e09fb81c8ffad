"""RemoteStore: a BlobStore whose blobs live in a CAS reached over gRPC.

Used by workers (and later the shim) to talk to the server's CAS. Small blobs
travel in batches under the server's batch limit, large ones over ByteStream.
Errors from the server come back as the matching ReapiError.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from cas.store import READ_CHUNK, BlobInfo, BlobWriter, BufferedWriter, check_room, verified
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ReapiError,
    ResourceExhausted,
    Unavailable,
)
from reapi.protos import bytestream_pb2 as bs_pb2
from reapi.protos import bytestream_pb2_grpc as bs_grpc
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc

# Stay under the server's 4 MiB batch limit with room for the framing.
BATCH_BYTES = 3 * 1024 * 1024
FIND_MISSING_CHUNK = 10_000

_ERRORS: dict[grpc.StatusCode, type[ReapiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def as_reapi_error(error: grpc.aio.AioRpcError) -> ReapiError:
    kind = _ERRORS.get(error.code(), Internal)
    return kind(f"remote CAS: {error.code().name}: {error.details()}")


def channel_for(
    target: str, tls_ca: bytes | None = None, max_receive: int | None = None
) -> grpc.aio.Channel:
    """A channel to `grpc://HOST:PORT` (plain), `grpcs://HOST:PORT` (TLS) or
    `unix:PATH` (a local socket, plain); `max_receive` bytes in a message (-1:
    any), instead of gRPC's 4 MiB."""
    options = [] if max_receive is None else [("grpc.max_receive_message_length", max_receive)]
    scheme, address = split_target(target)
    if scheme == "unix":
        return grpc.aio.insecure_channel(target, options=options)
    if scheme == "grpcs":
        credentials = grpc.ssl_channel_credentials(tls_ca)
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)


def split_target(target: str) -> tuple[str, str]:
    """(scheme, address) of `grpc://HOST:PORT`, `grpcs://HOST:PORT` or
    `unix:PATH`; ValueError, saying what is expected, for anything else."""
    if target.startswith("unix:") and len(target) > len("unix:"):
        return "unix", target[len("unix:") :]
    scheme, _, address = target.partition("://")
    if not address or scheme not in ("grpc", "grpcs"):
        raise ValueError(
            f"server address {target!r}: expected grpc://HOST:PORT, grpcs://HOST:PORT or unix:PATH"
        )
    return scheme, address


class RemoteStore:
    """The CAS at the other end of `channel`, for digests of any supported function."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: tuple[tuple[str, str], ...] | None = None,
        instance_name: str = "",
    ) -> None:
        """`metadata` goes with every call (e.g. an authorization header)."""
        self._metadata = metadata
        self._cas: Any = re_grpc.ContentAddressableStorageStub(channel)  # type: ignore[no-untyped-call]
        self._bytestream: Any = bs_grpc.ByteStreamStub(channel)  # type: ignore[no-untyped-call]
        self._instance = instance_name

    def _resource(self, digest: Digest) -> str:
        prefix = f"{self._instance}/" if self._instance else ""
        return f"{prefix}blobs/{digest.resource_path()}"

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        missing: list[Digest] = []
        for function, group in _by_function(digests).items():
            for start in range(0, len(group), FIND_MISSING_CHUNK):
                chunk = group[start : start + FIND_MISSING_CHUNK]
                request = re_pb2.FindMissingBlobsRequest(
                    instance_name=self._instance,
                    blob_digests=[d.to_proto() for d in chunk],
                    digest_function=function.value,
                )
                try:
                    response = await self._cas.FindMissingBlobs(request, metadata=self._metadata)
                except grpc.aio.AioRpcError as error:
                    raise as_reapi_error(error) from None
                absent = {(d.hash, d.size_bytes) for d in response.missing_blob_digests}
                missing.extend(d for d in chunk if (d.hash, d.size) in absent)
        return missing

    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found: dict[Digest, bytes] = {d: b"" for d in digests if d.is_empty}
        small = [d for d in set(digests) if d.size <= BATCH_BYTES]
        for function, group in _by_function(small).items():
            for batch in _batches(group):
                request = re_pb2.BatchReadBlobsRequest(
                    instance_name=self._instance,
                    digests=[d.to_proto() for d in batch],
                    digest_function=function.value,
                )
                try:
                    response = await self._cas.BatchReadBlobs(request, metadata=self._metadata)
                except grpc.aio.AioRpcError as error:
                    raise as_reapi_error(error) from None
                by_key = {(d.hash, d.size): d for d in batch}
                for item in response.responses:
                    digest = by_key.get((item.digest.hash, item.digest.size_bytes))
                    if digest is not None and item.status.code == 0:
                        found[digest] = item.data
        for digest in {d for d in digests if d.size > BATCH_BYTES}:
            with contextlib.suppress(NotFound):
                found[digest] = b"".join([chunk async for chunk in self.read(digest)])
        return found

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        request = bs_pb2.ReadRequest(
            resource_name=self._resource(digest), read_offset=offset, read_limit=limit
        )
        try:
            async for response in self._bytestream.Read(request, metadata=self._metadata):
                yield response.data
        except grpc.aio.AioRpcError as error:
            raise as_reapi_error(error) from None

    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        errors = verified(blobs)
        good = [blob for blob, error in zip(blobs, errors, strict=True) if error is None]
        small = [(d, data) for d, data in good if d.size <= BATCH_BYTES and not d.is_empty]
        for function in {d.function for d, _ in small}:
            group = [(d, data) for d, data in small if d.function is function]
            for batch in _batches([d for d, _ in group]):
                wanted = set(batch)
                request = re_pb2.BatchUpdateBlobsRequest(
                    instance_name=self._instance,
                    requests=[
                        re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data)
                        for d, data in group
                        if d in wanted
                    ],
                    digest_function=function.value,
                )
                try:
                    response = await self._cas.BatchUpdateBlobs(request, metadata=self._metadata)
                except grpc.aio.AioRpcError as error:
                    raise as_reapi_error(error) from None
                failed = [r for r in response.responses if r.status.code != 0]
                if failed:
                    raise Internal(f"remote CAS refused a blob: {failed[0].status.message}")
        for digest, data in good:
            if digest.size > BATCH_BYTES:  # on a ByteStream write of its own
                writer = self.begin_write(digest)
                try:
                    for start in range(0, len(data), READ_CHUNK):
                        await writer.write(data[start : start + READ_CHUNK])
                    await writer.commit()
                except BaseException:
                    await writer.abort()
                    raise
        return errors

    def _upload_name(self, digest: Digest) -> str:
        prefix = f"{self._instance}/" if self._instance else ""
        return f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.resource_path()}"

    def begin_write(self, digest: Digest) -> BlobWriter:
        """A batch upload for a small blob; a ByteStream write that sends each
        chunk as it is written for a large one."""
        if digest.size <= BATCH_BYTES:
            return BufferedWriter(digest, self._save)
        return _StreamWriter(self._bytestream, self._upload_name(digest), digest, self._metadata)

    async def _save(self, digest: Digest, data: bytes) -> None:
        (error,) = await self.put_many([(digest, data)])
        if error is not None:
            raise error

    async def delete(self, digest: Digest) -> bool:
        raise FailedPrecondition("a remote CAS cannot delete blobs")

    async def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        raise FailedPrecondition("a remote CAS cannot list its blobs")
        yield  # pragma: no cover - makes this an async generator


class _StreamWriter:
    """A BlobWriter that sends what it is given at once, on one ByteStream
    Write call (gRPC's flow control holds `write` back while the server is
    behind, so memory holds a chunk or so). The server checks the hash."""

    def __init__(
        self,
        bytestream: Any,
        name: str,
        digest: Digest,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> None:
        self._bytestream = bytestream
        self._name = name
        self._digest = digest
        self._metadata = metadata
        self._call: Any = None
        self._sent = 0
        self._done = False  # the server has the blob (it may say so early)

    @property
    def committed_size(self) -> int:
        return self._sent

    async def _send(self, data: bytes, finish: bool) -> None:
        if self._call is None:
            self._call = self._bytestream.Write(metadata=self._metadata)
        request = bs_pb2.WriteRequest(
            resource_name=self._name if self._sent == 0 else "",
            write_offset=self._sent,
            data=data,
            finish_write=finish,
        )
        try:
            await self._call.write(request)
        except (
            asyncio.InvalidStateError,
            grpc.aio.AioRpcError,
        ):  # the call ended: its answer says why
            await self._answer()

    async def _answer(self) -> None:
        try:
            response = await self._call
        except grpc.aio.AioRpcError as error:
            raise as_reapi_error(error) from None
        if response.committed_size != self._digest.size:
            raise Internal(
                f"remote CAS: the upload of {self._digest} ended after "
                f"{response.committed_size} bytes"
            )
        self._done = True

    async def write(self, data: bytes) -> None:
        try:
            check_room(self._digest, self._sent, len(data))
        except ReapiError:
            await self.abort()
            raise
        if not self._done:
            await self._send(data, finish=False)
        self._sent += len(data)

    async def commit(self) -> None:
        if self._sent != self._digest.size:
            await self.abort()
            raise InvalidArgument(
                f"blob {self._digest}: upload ended after {self._sent} of {self._digest.size} bytes"
            )
        if self._done:
            return
        await self._send(b"", finish=True)
        if not self._done:
            await self._call.done_writing()
            await self._answer()

    async def abort(self) -> None:
        if self._call is not None and not self._done:
            self._call.cancel()


def _by_function(digests: Sequence[Digest]) -> dict[DigestFunction, list[Digest]]:
    groups: dict[DigestFunction, list[Digest]] = {}
    for digest in digests:
        if not digest.is_empty:
            groups.setdefault(digest.function, []).append(digest)
    return groups


def _batches(digests: Sequence[Digest]) -> list[list[Digest]]:
    """Groups of digests whose sizes add up to at most BATCH_BYTES each."""
    batches: list[list[Digest]] = []
    current: list[Digest] = []
    total = 0
    for digest in digests:
        if current and total + digest.size > BATCH_BYTES:
            batches.append(current)
            current, total = [], 0
        current.append(digest)
        total += digest.size
    if current:
        batches.append(current)
    return batches
