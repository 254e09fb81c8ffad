"""The contract every BlobStore implementation keeps (see cas/store.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from cas.disk import DiskStore
from cas.existence import ExistenceCache, ExistenceCachingStore
from cas.memory import MemoryStore
from cas.read_tier import ReadTier
from cas.redis_store import RedisStore
from cas.small_blobs import SMALL_BLOB
from cas.store import BlobStore, get_blob, put_blob
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import InvalidArgument, NotFound, OutOfRange
from tests.redis_servers import RedisDeployment, client_of

SHA256, BLAKE3 = DigestFunction.SHA256, DigestFunction.BLAKE3

STORES: dict[str, Callable[[Path], BlobStore]] = {
    "memory": lambda tmp: MemoryStore(),
    "disk": lambda tmp: DiskStore(tmp / "store"),
    "existence-caching": lambda tmp: ExistenceCachingStore(MemoryStore(), ExistenceCache(100)),
    "read-tier": lambda tmp: ReadTier(MemoryStore(), DiskStore(tmp / "tier")),
}


REDIS_STORES = ["redis-standalone", "redis-cluster"]


@pytest.fixture(params=sorted(STORES) + REDIS_STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """Each implementation in turn; the Redis ones on real, emptied, redis-servers."""
    if request.param not in REDIS_STORES:
        yield STORES[request.param](tmp_path)
        return
    deployment: RedisDeployment = request.getfixturevalue(request.param.replace("-", "_"))
    deployment.emptied()
    client = await client_of(deployment)
    yield RedisStore(client)
    await client.aclose()


async def read_all(store: BlobStore, digest: Digest, offset: int = 0, limit: int = 0) -> bytes:
    return b"".join([chunk async for chunk in store.read(digest, offset, limit)])


async def test_put_then_get(store: BlobStore) -> None:
    digest = SHA256.digest_of(b"hello")
    assert await store.find_missing([digest]) == [digest]
    await put_blob(store, digest, b"hello")
    assert await store.find_missing([digest]) == []
    assert await get_blob(store, digest) == b"hello"


@pytest.mark.parametrize("function", list(DigestFunction))
async def test_empty_blob_always_present(store: BlobStore, function: DigestFunction) -> None:
    empty = function.empty()
    assert await store.find_missing([empty]) == []
    assert await get_blob(store, empty) == b""
    assert await read_all(store, empty) == b""


async def test_find_missing_keeps_request_order(store: BlobStore) -> None:
    present = SHA256.digest_of(b"present")
    await put_blob(store, present, b"present")
    absent = [SHA256.digest_of(bytes([n])) for n in range(5)]
    assert await store.find_missing([absent[3], present, absent[1], absent[4]]) == [
        absent[3],
        absent[1],
        absent[4],
    ]


async def test_wrong_size_is_missing(store: BlobStore) -> None:
    digest = SHA256.digest_of(b"sized")
    await put_blob(store, digest, b"sized")
    wrong = Digest(SHA256, digest.hash, digest.size + 1)
    assert await store.find_missing([wrong]) == [wrong]
    with pytest.raises(NotFound):
        await get_blob(store, wrong)


async def test_functions_are_kept_apart(store: BlobStore) -> None:
    sha, blake = SHA256.digest_of(b"same bytes"), BLAKE3.digest_of(b"same bytes")
    await put_blob(store, blake, b"same bytes")
    assert await store.find_missing([sha, blake]) == [sha]
    # A BLAKE3 hash looked up as SHA256 (same length) is a different blob.
    alias = Digest(SHA256, blake.hash, blake.size)
    assert await store.find_missing([alias]) == [alias]


@pytest.mark.parametrize(
    ("data", "claimed"),
    [(b"evil", b"good"), (b"short", b"shorter"), (b"longer", b"long")],
)
async def test_put_rejects_mismatch_and_keeps_nothing(
    store: BlobStore, data: bytes, claimed: bytes
) -> None:
    digest = SHA256.digest_of(claimed)
    with pytest.raises(InvalidArgument):
        await put_blob(store, digest, data)
    assert await store.find_missing([digest]) == [digest]
    assert [info async for info in store.iter_blobs()] == []


async def test_streamed_write(store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = BLAKE3.digest_of(data)
    writer = store.begin_write(digest)
    for start in range(0, len(data), 100_000):
        await writer.write(data[start : start + 100_000])
    assert writer.committed_size == len(data)
    assert await store.find_missing([digest]) == [digest], "readable before commit"
    await writer.commit()
    assert await read_all(store, digest) == data


async def test_streamed_write_mismatch_leaves_nothing(store: BlobStore) -> None:
    digest = SHA256.digest_of(b"a" * 1000)
    writer = store.begin_write(digest)
    await writer.write(b"b" * 1000)
    with pytest.raises(InvalidArgument, match="hashes to"):
        await writer.commit()
    assert await store.find_missing([digest]) == [digest]
    assert [info async for info in store.iter_blobs()] == []


async def test_streamed_write_past_size_is_refused(store: BlobStore) -> None:
    digest = SHA256.digest_of(b"abc")
    writer = store.begin_write(digest)
    with pytest.raises(InvalidArgument, match="more data"):
        await writer.write(b"abcd")
    assert await store.find_missing([digest]) == [digest]


async def test_short_upload_is_refused(store: BlobStore) -> None:
    digest = SHA256.digest_of(b"abcdef")
    writer = store.begin_write(digest)
    await writer.write(b"abc")
    with pytest.raises(InvalidArgument, match="ended after 3 of 6"):
        await writer.commit()


async def test_abort_leaves_nothing(store: BlobStore) -> None:
    digest = SHA256.digest_of(b"x" * 200_000)
    writer = store.begin_write(digest)
    await writer.write(b"x" * 100_000)
    await writer.abort()
    await writer.abort()
    assert await store.find_missing([digest]) == [digest]
    assert [info async for info in store.iter_blobs()] == []


async def test_concurrent_writers_of_one_blob(store: BlobStore) -> None:
    data = os.urandom(500_000)
    digest = SHA256.digest_of(data)

    async def upload() -> None:
        writer = store.begin_write(digest)
        for start in range(0, len(data), 70_000):
            await writer.write(data[start : start + 70_000])
            await asyncio.sleep(0)
        await writer.commit()

    await asyncio.gather(*(upload() for _ in range(8)))
    assert await get_blob(store, digest) == data
    assert [info.digest async for info in store.iter_blobs()] == [digest]


@pytest.mark.parametrize(
    ("offset", "limit"), [(0, 0), (1, 0), (10, 5), (0, 1), (99, 0), (100, 0), (50, 1000)]
)
async def test_read_ranges(store: BlobStore, offset: int, limit: int) -> None:
    data = bytes(range(100))
    digest = SHA256.digest_of(data)
    await put_blob(store, digest, data)
    end = len(data) if limit == 0 else offset + limit
    assert await read_all(store, digest, offset, limit) == data[offset:end]


async def test_read_past_end_is_out_of_range(store: BlobStore) -> None:
    digest = SHA256.digest_of(b"12345")
    await put_blob(store, digest, b"12345")
    with pytest.raises(OutOfRange):
        await read_all(store, digest, 6)


async def test_read_missing_is_not_found(store: BlobStore) -> None:
    with pytest.raises(NotFound):
        await read_all(store, SHA256.digest_of(b"nope"))


async def test_delete_and_iterate(store: BlobStore) -> None:
    blobs = {SHA256.digest_of(bytes([n]) * 10): bytes([n]) * 10 for n in range(20)}
    for digest, data in blobs.items():
        await put_blob(store, digest, data)
    listed = {info.digest async for info in store.iter_blobs()}
    assert listed == set(blobs)
    first = next(iter(blobs))
    assert await store.delete(first) is True
    assert await store.delete(first) is False
    assert await store.find_missing([first]) == [first]


async def test_put_many_reports_each_blob(store: BlobStore) -> None:
    good, other = b"good blob", os.urandom(SMALL_BLOB + 10)
    claimed = SHA256.digest_of(b"claimed")
    blobs = [
        (SHA256.digest_of(good), good),
        (claimed, b"something else"),
        (BLAKE3.digest_of(other), other),
        (SHA256.empty(), b""),
    ]
    errors = await store.put_many(blobs)
    assert [type(e) for e in errors] == [type(None), InvalidArgument, type(None), type(None)]
    assert await store.find_missing([d for d, _ in blobs]) == [claimed]


async def test_get_many_returns_what_is_present(store: BlobStore) -> None:
    small, large = b"s" * 10, os.urandom(SMALL_BLOB * 2)
    stored = [SHA256.digest_of(small), SHA256.digest_of(large)]
    await store.put_many(list(zip(stored, [small, large], strict=True)))
    absent = [SHA256.digest_of(b"absent"), SHA256.digest_of(b"x" * (SMALL_BLOB + 1))]
    found = await store.get_many([*stored, *absent, SHA256.empty()])
    assert found == {stored[0]: small, stored[1]: large, SHA256.empty(): b""}


@pytest.mark.parametrize("size", [1, SMALL_BLOB - 1, SMALL_BLOB, SMALL_BLOB + 1])
async def test_sizes_around_the_small_blob_limit(store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    digest = SHA256.digest_of(data)
    writer = store.begin_write(digest)
    await writer.write(data[: size // 2])
    await writer.write(data[size // 2 :])
    await writer.commit()
    assert await get_blob(store, digest) == data
    assert await read_all(store, digest, size // 3) == data[size // 3 :]
    assert await store.delete(digest)
    assert await store.find_missing([digest]) == [digest]


async def test_disk_store_survives_reopening(tmp_path: Path) -> None:
    small, large = b"small" * 10, os.urandom(SMALL_BLOB * 3)
    digests = [SHA256.digest_of(small), BLAKE3.digest_of(large)]
    first = DiskStore(tmp_path / "store")
    await first.put_many(list(zip(digests, [small, large], strict=True)))
    first.close()
    second = DiskStore(tmp_path / "store")
    assert await second.find_missing(digests) == []
    assert await second.get_many(digests) == {digests[0]: small, digests[1]: large}
    second.close()


async def test_duplicates_are_stored_once(store: BlobStore) -> None:
    data = b"the same bytes"
    digest = SHA256.digest_of(data)
    assert await store.put_many([(digest, data), (digest, data)]) == [None, None]
    assert await store.put_many([(digest, data)]) == [None]
    assert [info.digest async for info in store.iter_blobs()] == [digest]
    assert await store.delete(digest)
    assert [info async for info in store.iter_blobs()] == []
