"""MemoryStore: blobs in a dict. For tests, and as the fast side of a cache."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from cas.store import READ_CHUNK, BlobInfo, BufferedWriter, check_offset, verified
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import NotFound, ReapiError

_Key = tuple[DigestFunction, str]


class MemoryStore:
    """Keeps every blob in memory until deleted. No size limit: use it where
    the data is known to be small (tests, per-process caches)."""

    def __init__(self) -> None:
        self._blobs: dict[_Key, bytes] = {}
        self._access: dict[_Key, float] = {}

    def _lookup(self, digest: Digest) -> bytes | None:
        if digest.is_empty:
            return b""
        key = (digest.function, digest.hash)
        data = self._blobs.get(key)
        if data is None or len(data) != digest.size:
            return None
        self._access[key] = time.time()
        return data

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return [digest for digest in digests if self._lookup(digest) is None]

    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found = {}
        for digest in digests:
            data = self._lookup(digest)
            if data is not None:
                found[digest] = data
        return found

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        data = self._lookup(digest)
        if data is None:
            raise NotFound(f"blob {digest} not found")
        check_offset(digest, offset, limit)
        end = digest.size if limit == 0 else min(digest.size, offset + limit)
        for start in range(offset, end, READ_CHUNK):
            yield data[start : min(end, start + READ_CHUNK)]

    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        errors = verified(blobs)
        for (digest, data), error in zip(blobs, errors, strict=True):
            if error is None:
                self._store(digest, data)
        return errors

    def _store(self, digest: Digest, data: bytes) -> None:
        if not digest.is_empty:
            key = (digest.function, digest.hash)
            self._blobs[key] = data
            self._access[key] = time.time()

    def begin_write(self, digest: Digest) -> BufferedWriter:
        return BufferedWriter(digest, self._save)

    async def _save(self, digest: Digest, data: bytes) -> None:
        self._store(digest, data)

    async def delete(self, digest: Digest) -> bool:
        key = (digest.function, digest.hash)
        self._access.pop(key, None)
        return self._blobs.pop(key, None) is not None

    async def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        for (function, hash_), data in list(self._blobs.items()):
            last = self._access.get((function, hash_), 0.0)
            yield BlobInfo(Digest(function, hash_, len(data)), last)
