"""Remembering which blobs a peer holds, so as not to ask (or send) again.

Three places want this: the shim's agent (blobs the server's CAS holds: it
uploads only the others), the scheduler (input files a worker was leased
before: a lease need not carry them again) and the worker (blobs the server
holds: outputs seen before are not asked about). `ExistenceCache` is the
memory of it, bounded by configuration: past `limit` entries it forgets
everything, which at worst costs one question or one blob sent twice.
`ExistenceCachingStore` puts one in front of a BlobStore.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from cas.store import BlobInfo, BlobStore, BlobWriter
from reapi.core.digests import Digest
from reapi.core.errors import ReapiError

# How long a client trusts our server's word that it holds a blob (seconds):
# its gc keeps a blob that FindMissingBlobs reported present for the grace
# period less the refresh interval (cas/gc.py), far longer than this.
TRUST_SERVER_SECONDS = 600.0
# Digests a client remembers (about 200 bytes each).
REMEMBERED_BLOBS = 200_000


class ExistenceCache:
    """Digests known to be held, each for `ttl` seconds after it was last
    confirmed (None: until forgotten), at most `limit` of them."""

    def __init__(
        self, limit: int, ttl: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._ttl = ttl
        self._clock = clock
        self._confirmed: dict[Digest, float] = {}

    def __contains__(self, digest: Digest) -> bool:
        when = self._confirmed.get(digest)
        if when is None:
            return False
        return self._ttl is None or self._clock() - when < self._ttl

    def __len__(self) -> int:
        return len(self._confirmed)

    def add(self, digests: Iterable[Digest]) -> None:
        """Record `digests` as held, as of now."""
        now = self._clock()
        if len(self._confirmed) > self._limit:
            self._confirmed.clear()
        self._confirmed.update(dict.fromkeys(digests, now))

    def discard(self, digest: Digest) -> None:
        self._confirmed.pop(digest, None)

    def unknown(self, digests: Iterable[Digest]) -> list[Digest]:
        """Those of `digests` not known to be held, in order."""
        return [digest for digest in digests if digest not in self]


class ExistenceCachingStore:
    """A BlobStore in front of `base` (a remote CAS) that answers
    find_missing from memory for blobs `base` confirmed within `ttl` seconds,
    and asks `base` only about the rest.

    Use it where `base` keeps what it confirmed at least `ttl` seconds: our
    server keeps a blob that FindMissingBlobs reported present for its grace
    period, far longer than the ten minutes the agent trusts. It never
    answers "present" for a blob `base` did not confirm: an error from `base`
    is raised as it is, and nothing is remembered from a failed call.
    Everything else is forwarded unchanged."""

    def __init__(self, base: BlobStore, known: ExistenceCache) -> None:
        self.base = base
        self.known = known

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        asked = self.known.unknown(digests)
        missing = await self.base.find_missing(asked) if asked else []
        absent = set(missing)
        self.known.add(digest for digest in asked if digest not in absent)
        return missing

    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        return await self.base.get_many(digests)

    def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        return self.base.read(digest, offset, limit)

    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        errors = await self.base.put_many(blobs)
        stored = (digest for (digest, _), error in zip(blobs, errors, strict=True) if not error)
        self.known.add(stored)
        return errors

    def begin_write(self, digest: Digest) -> BlobWriter:
        return self.base.begin_write(digest)

    async def delete(self, digest: Digest) -> bool:
        self.known.discard(digest)
        return await self.base.delete(digest)

    def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        return self.base.iter_blobs()
