"""ExistenceCache and ExistenceCachingStore (cas/existence.py): what a peer is
known to hold, never claimed beyond what the peer confirmed."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from cas.existence import ExistenceCache, ExistenceCachingStore
from cas.memory import MemoryStore
from cas.store import put_blob
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import Unavailable

SHA256 = DigestFunction.SHA256


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def digests(count: int) -> list[Digest]:
    return [SHA256.digest_of(b"blob %d" % n) for n in range(count)]


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = ExistenceCache(limit=10, ttl=60, clock=clock)
    first, second = digests(2)
    cache.add([first])
    clock.now += 59
    assert first in cache and second not in cache
    cache.add([first])  # confirmed again: trusted for another ttl
    clock.now += 59
    assert first in cache
    clock.now += 1
    assert first not in cache
    assert cache.unknown([first, second]) == [first, second]


def test_memory_is_bounded_by_the_limit() -> None:
    cache = ExistenceCache(limit=3)
    many = digests(10)
    for digest in many:
        cache.add([digest])
        assert len(cache) <= 4
    assert many[-1] in cache  # the newest survives a reset


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[Digest]] = []
        self.down = False

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        if self.down:
            raise Unavailable("the server is gone")
        self.asked.append(list(digests))
        return await super().find_missing(digests)


async def test_asks_only_about_blobs_not_confirmed() -> None:
    base = CountingStore()
    store = ExistenceCachingStore(base, ExistenceCache(100))
    present, absent = digests(2)
    await put_blob(base, present, b"blob 0")
    assert await store.find_missing([present, absent]) == [absent]
    assert await store.find_missing([present, absent]) == [absent]
    assert base.asked == [[present, absent], [absent]]
    await put_blob(store, absent, b"blob 1")  # stored through it: known from then on
    assert await store.find_missing([present, absent]) == []
    assert base.asked[-1] == [absent]


async def test_a_failing_peer_is_never_reported_as_holding_anything() -> None:
    base = CountingStore()
    store = ExistenceCachingStore(base, ExistenceCache(100))
    blob = digests(1)[0]
    base.down = True
    with pytest.raises(Unavailable):
        await store.find_missing([blob])
    base.down = False
    assert await store.find_missing([blob]) == [blob]


async def test_a_deleted_blob_is_forgotten() -> None:
    base = CountingStore()
    store = ExistenceCachingStore(base, ExistenceCache(100))
    blob = digests(1)[0]
    await put_blob(store, blob, b"blob 0")
    assert await store.delete(blob)
    assert await store.find_missing([blob]) == [blob]
