"""The BlobStore protocol every storage implementation follows.

Contract shared by all implementations (checked by `tests/contract/`):
- A blob is addressed by a `Digest`, which names its digest function; blobs of
  different functions never mix.
- The empty blob of each function is always present, whether stored or not.
- Nothing is readable until its bytes have been verified against the digest:
  a write whose data does not match raises `InvalidArgument` and leaves no trace.
- A failure inside the store raises; it never answers "present" or "missing"
  for a blob it could not check.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from reapi.core.digests import Digest, Hasher
from reapi.core.errors import InvalidArgument, NotFound, OutOfRange, ReapiError

# Reads are streamed in chunks of this size (and gRPC messages stay well under 4 MiB).
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One stored blob, as listed by `BlobStore.iter_blobs`."""

    digest: Digest
    last_access: float  # seconds since the epoch


class BlobWriter(Protocol):
    """An upload in progress, created by `BlobStore.begin_write`.

    Call `write` with consecutive chunks, then `commit` once; or `abort`.
    After `abort`, or a failed `commit`, nothing of the upload remains.
    """

    @property
    def committed_size(self) -> int:
        """Bytes accepted so far."""
        ...

    async def write(self, data: bytes) -> None:
        """Append `data`. Raises InvalidArgument if it runs past the digest's size
        (the upload is then aborted)."""
        ...

    async def commit(self) -> None:
        """Verify size and hash and make the blob readable, atomically.
        Raises InvalidArgument on a mismatch (the upload is then aborted)."""
        ...

    async def abort(self) -> None:
        """Discard the upload. Safe to call more than once, and after commit."""
        ...


class BlobStore(Protocol):
    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        """The digests not present, in request order. Extends the lifetime of
        the ones that are present."""
        ...

    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        """The blobs that are present, whole (meant for small blobs, as in
        BatchReadBlobs). Absent ones are simply not in the result."""
        ...

    def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        """Stream the blob from `offset`, at most `limit` bytes (0: to the end).
        Raises NotFound, or OutOfRange if offset is past the end; both before
        the first chunk."""
        ...

    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        """Store blobs given whole; one result per blob, in order: None when
        stored, else the error (InvalidArgument when the data does not match
        its digest). Blobs that fail leave no trace; the others are stored."""
        ...

    def begin_write(self, digest: Digest) -> BlobWriter:
        """Start a streamed upload of `digest`."""
        ...

    async def delete(self, digest: Digest) -> bool:
        """Remove a blob; True if it was there."""
        ...

    def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        """Every stored blob (not the implicit empty ones), in no particular order."""
        ...


async def get_blob(store: BlobStore, digest: Digest) -> bytes:
    """One whole blob; raises NotFound."""
    found = await store.get_many([digest])
    if digest not in found:
        raise NotFound(f"blob {digest} not found")
    return found[digest]


async def put_blob(store: BlobStore, digest: Digest, data: bytes) -> None:
    """Store one blob; raises what `put_many` reports for it."""
    (error,) = await store.put_many([(digest, data)])
    if error is not None:
        raise error


async def put_missing(
    store: BlobStore, digests: Sequence[Digest], data_of: Callable[[Digest], bytes]
) -> int:
    """Store those of `digests` that `store` lacks (it is asked first), each
    one's bytes from `data_of`; raises the first error `put_many` reports.
    Returns the bytes sent."""
    blobs = [(digest, data_of(digest)) for digest in await store.find_missing(digests)]
    for error in await store.put_many(blobs):
        if error is not None:
            raise error
    return sum(len(data) for _, data in blobs)


async def put_file(store: BlobStore, digest: Digest, path: str | os.PathLike[str]) -> None:
    """Store the file at `path` as the blob `digest` (which it must hash to),
    a READ_CHUNK at a time through `begin_write`: however large the file,
    little of it is in memory at once."""
    writer = store.begin_write(digest)
    try:
        with open(path, "rb") as file:
            while chunk := file.read(READ_CHUNK):
                await writer.write(chunk)
        await writer.commit()
    except BaseException:
        await writer.abort()
        raise


def verified(blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
    """`verify` for each blob, collecting the errors instead of raising."""
    errors: list[ReapiError | None] = []
    for digest, data in blobs:
        try:
            verify(digest, data)
        except ReapiError as error:
            errors.append(error)
        else:
            errors.append(None)
    return errors


def verify(digest: Digest, data: bytes) -> None:
    """Raise InvalidArgument unless `data` is exactly the blob `digest` names."""
    if len(data) != digest.size:
        raise InvalidArgument(
            f"blob {digest}: digest says {digest.size} bytes but {len(data)} were sent"
        )
    actual = digest.function.hex_of(data)
    if actual != digest.hash:
        raise InvalidArgument(f"blob {digest}: data hashes to {actual}, not to the digest's hash")


def check_final(digest: Digest, received: int, hasher: Hasher) -> None:
    """The end-of-upload check that streamed writers share with `verify`."""
    if received != digest.size:
        raise InvalidArgument(
            f"blob {digest}: upload ended after {received} of {digest.size} bytes"
        )
    actual = hasher.hexdigest()
    if actual != digest.hash:
        raise InvalidArgument(f"blob {digest}: data hashes to {actual}, not to the digest's hash")


def check_room(digest: Digest, received: int, more: int) -> None:
    if received + more > digest.size:
        raise InvalidArgument(
            f"blob {digest}: more data sent than the digest's {digest.size} bytes"
        )


def check_offset(digest: Digest, offset: int, limit: int) -> None:
    if offset < 0 or limit < 0:
        raise OutOfRange(f"blob {digest}: read offset and limit must not be negative")
    if offset > digest.size:
        raise OutOfRange(
            f"blob {digest}: read offset {offset} is past the end ({digest.size} bytes)"
        )


class BufferedWriter:
    """A BlobWriter that keeps the upload in memory and hands it, verified, to
    `save` on commit. For small blobs, and for stores that live in memory."""

    def __init__(self, digest: Digest, save: Callable[[Digest, bytes], Awaitable[None]]) -> None:
        self._digest = digest
        self._save = save
        self._hasher = digest.function.hasher()
        self._chunks: list[bytes] = []
        self._received = 0

    @property
    def committed_size(self) -> int:
        return self._received

    async def write(self, data: bytes) -> None:
        try:
            check_room(self._digest, self._received, len(data))
        except ReapiError:
            await self.abort()
            raise
        self._hasher.update(data)
        self._chunks.append(data)
        self._received += len(data)

    async def commit(self) -> None:
        try:
            check_final(self._digest, self._received, self._hasher)
        except ReapiError:
            await self.abort()
            raise
        data, self._chunks = b"".join(self._chunks), []
        await self._save(self._digest, data)

    async def abort(self) -> None:
        self._chunks = []
        self._received = 0
        self._hasher = self._digest.function.hasher()
