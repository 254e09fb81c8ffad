"""ReadTier: a shared store (Redis) with this frontend's own disk in front of it
for reads, so the headers every compile reads are not fetched from Redis each
time (the fast/slow pair of Buildbarn and NativeLink).

A blob is copied on its second read through this frontend: headers are read
by every compile, most outputs once. The shared store stays the authority:
FindMissingBlobs, lifetimes, gc and the action cache's completeness check all
ask it. The local copy only saves
transfers: it holds verified bytes (every store does), so whatever it serves is
right, and it may lose anything at any time (its size is kept by the same gc
as a storage directory's, without a grace period). A failing local disk
(whatever it raises: an OSError, SQLite's errors) never fails a call: the
shared store answers instead.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Sequence

from cas.existence import ExistenceCache
from cas.store import BlobInfo, BlobStore, BlobWriter
from reapi.core.digests import Digest
from reapi.core.errors import NotFound, ReapiError

log = logging.getLogger(__name__)

# Blobs up to this size read whole from the shared store are copied locally.
COPY_LIMIT = 64 << 20
# A blob is copied on its second read from the shared store (one read once, as
# most outputs are, costs no local write); this many first reads are remembered.
SEEN_ONCE = 200_000
# The local copy is asked only for blobs copied there (the disk is not searched
# for what was never put on it); this many are remembered.
COPIED = 1_000_000


class ReadTier:
    def __init__(self, shared: BlobStore, local: BlobStore) -> None:
        self._shared = shared
        self._local = local
        self._seen = ExistenceCache(SEEN_ONCE)
        self._copied = ExistenceCache(COPIED)  # may name some the local gc removed

    def _worth_copying(self, digest: Digest) -> bool:
        """True on a blob's second read from the shared store (within SEEN_ONCE)."""
        if digest in self._seen:
            self._seen.discard(digest)
            return True
        self._seen.add([digest])
        return False

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return await self._shared.find_missing(digests)

    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found: dict[Digest, bytes] = {}
        copied = [d for d in digests if d in self._copied]
        try:
            if copied:
                found = await self._local.get_many(copied)
        except Exception as error:
            log.warning("local read tier: %s", error)
        wanted = [d for d in digests if d not in found]
        if wanted:
            fetched = await self._shared.get_many(wanted)
            found.update(fetched)
            await self._copy([(d, data) for d, data in fetched.items() if self._worth_copying(d)])
        return found

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        try:
            if digest in self._copied:
                async for chunk in self._local.read(digest, offset, limit):
                    yield chunk
                return
        except NotFound:
            self._copied.discard(digest)  # the local gc removed it
        except Exception as error:
            log.warning("local read tier: %s", error)
        if offset or limit or digest.size > COPY_LIMIT or not self._worth_copying(digest):
            async for chunk in self._shared.read(digest, offset, limit):
                yield chunk
            return
        # The whole blob: pass it on and keep a copy, committed once all of it came.
        writer = self._local.begin_write(digest)
        copying = True
        try:
            async for chunk in self._shared.read(digest):
                copying = copying and await _local(writer.write(chunk))
                yield chunk
            if copying and await _local(writer.commit()):
                self._copied.add([digest])
        finally:
            await writer.abort()  # after a commit: nothing left to discard

    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        # Not copied: an upload is read (by a worker) through any frontend, maybe
        # not this one, and copying would cost every upload a local write.
        return await self._shared.put_many(blobs)

    def begin_write(self, digest: Digest) -> BlobWriter:
        return self._shared.begin_write(digest)

    async def delete(self, digest: Digest) -> bool:
        self._copied.discard(digest)
        try:
            await self._local.delete(digest)
        except Exception as error:
            log.warning("local read tier: %s", error)
        return await self._shared.delete(digest)

    def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        return self._shared.iter_blobs()

    async def _copy(self, blobs: list[tuple[Digest, bytes]]) -> None:
        if not blobs:
            return
        try:
            errors = await self._local.put_many(blobs)
        except Exception as error:
            log.warning("local read tier: %s", error)
            return
        self._copied.add(d for (d, _), error in zip(blobs, errors, strict=True) if error is None)


async def _local(step: Awaitable[None]) -> bool:
    """Run a step of the local copy; False (and a warning) if it failed: the
    read goes on without the copy."""
    try:
        await step
    except Exception as error:
        log.warning("local read tier: %s", error)
        return False
    return True
