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

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from reapi.digests import Digest, Hasher
from reapi.errors import InvalidArgument, OutOfRange

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

    async def get(self, digest: Digest) -> bytes:
        """The whole blob, for small blobs. Raises NotFound."""
        ...

    def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        """Stream the blob from `offset`, at most `limit` bytes (0: to the end).
        Raises NotFound, or OutOfRange if offset is past the end; both before
        the first chunk."""
        ...

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store a small blob whole. Raises InvalidArgument if `data` does not
        match `digest`."""
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


def verify(digest: Digest, data: bytes) -> None:
    """Raise InvalidArgument unless `data` is exactly the blob `digest` names."""
    if len(data) != digest.size:
        raise InvalidArgument(
            f"blob {digest}: digest says {digest.size} bytes but {len(data)} were sent"
        )
    actual = digest.function.digest_of(data)
    if actual.hash != digest.hash:
        raise InvalidArgument(
            f"blob {digest}: data hashes to {actual.hash}, not to the digest's hash"
        )


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
