"""MemoryStore: blobs in a dict. For tests, and as the fast side of a cache."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from cas.store import BlobInfo, check_final, check_offset, check_room, verify
from reapi.digests import Digest, DigestFunction
from reapi.errors import NotFound

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

    async def get(self, digest: Digest) -> bytes:
        data = self._lookup(digest)
        if data is None:
            raise NotFound(f"blob {digest} not found")
        return data

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        data = await self.get(digest)
        check_offset(digest, offset, limit)
        end = digest.size if limit == 0 else min(digest.size, offset + limit)
        for start in range(offset, end, 1024 * 1024):
            yield data[start : min(end, start + 1024 * 1024)]

    async def put(self, digest: Digest, data: bytes) -> None:
        verify(digest, data)
        self._store(digest, data)

    def _store(self, digest: Digest, data: bytes) -> None:
        if not digest.is_empty:
            key = (digest.function, digest.hash)
            self._blobs[key] = data
            self._access[key] = time.time()

    def begin_write(self, digest: Digest) -> _MemoryWriter:
        return _MemoryWriter(self, digest)

    async def delete(self, digest: Digest) -> bool:
        key = (digest.function, digest.hash)
        self._access.pop(key, None)
        return self._blobs.pop(key, None) is not None

    async def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        for (function, hash_), data in list(self._blobs.items()):
            last = self._access.get((function, hash_), 0.0)
            yield BlobInfo(Digest(function, hash_, len(data)), last)


class _MemoryWriter:
    def __init__(self, store: MemoryStore, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        self._hasher = digest.function.hasher()
        self._chunks: list[bytes] = []
        self._received = 0

    @property
    def committed_size(self) -> int:
        return self._received

    async def write(self, data: bytes) -> None:
        try:
            check_room(self._digest, self._received, len(data))
        except Exception:
            await self.abort()
            raise
        self._hasher.update(data)
        self._chunks.append(data)
        self._received += len(data)

    async def commit(self) -> None:
        try:
            check_final(self._digest, self._received, self._hasher)
        except Exception:
            await self.abort()
            raise
        self._store._store(self._digest, b"".join(self._chunks))
        self._chunks = []

    async def abort(self) -> None:
        self._chunks = []
        self._received = 0
        self._hasher = self._digest.function.hasher()
