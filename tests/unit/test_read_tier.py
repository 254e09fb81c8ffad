"""ReadTier: reads come from the local copy once made; the shared store stays
the authority for presence; a failing local disk never fails a call."""

from __future__ import annotations

import os
from pathlib import Path

from cas.disk import DiskStore
from cas.memory import MemoryStore
from cas.read_tier import ReadTier
from cas.store import get_blob, put_blob
from reapi.core.digests import DigestFunction

SHA256 = DigestFunction.SHA256


async def read_all(tier: ReadTier, digest: object) -> bytes:
    return b"".join([chunk async for chunk in tier.read(digest)])  # type: ignore[arg-type]


async def test_a_read_is_copied_and_later_served_locally(tmp_path: Path) -> None:
    shared, local = MemoryStore(), DiskStore(tmp_path / "tier")
    tier = ReadTier(shared, local)
    small, large = os.urandom(100), os.urandom(3 * 1024 * 1024)
    digests = [SHA256.digest_of(small), SHA256.digest_of(large)]
    await shared.put_many(list(zip(digests, [small, large], strict=True)))
    assert await get_blob(tier, digests[0]) == small
    assert await read_all(tier, digests[1]) == large
    assert await local.find_missing(digests) == digests, "read once: not copied"
    assert await get_blob(tier, digests[0]) == small
    assert await read_all(tier, digests[1]) == large
    assert await local.find_missing(digests) == [], "read twice: copied"
    for digest in digests:
        await shared.delete(digest)
    assert await tier.find_missing(digests) == digests, "presence is the shared store's"
    assert await get_blob(tier, digests[0]) == small and await read_all(tier, digests[1]) == large
    local.close()


async def test_uploads_go_to_the_shared_store_only(tmp_path: Path) -> None:
    shared, local = MemoryStore(), DiskStore(tmp_path / "tier")
    tier = ReadTier(shared, local)
    digest = SHA256.digest_of(b"header")
    await put_blob(tier, digest, b"header")
    assert await shared.find_missing([digest]) == []
    assert await local.find_missing([digest]) == [digest]
    for _ in range(2):
        assert await get_blob(tier, digest) == b"header"
    assert await local.find_missing([digest]) == [], "copied once read twice"
    local.close()


async def test_a_broken_local_disk_only_costs_the_copy(tmp_path: Path) -> None:
    shared, local = MemoryStore(), DiskStore(tmp_path / "tier")
    tier = ReadTier(shared, local)
    data = os.urandom(200_000)
    digest = SHA256.digest_of(data)
    await shared.put_many([(digest, data)])
    local.close()  # its database is gone: every local call fails
    os.chmod(tmp_path / "tier", 0o500)
    try:
        assert await get_blob(tier, digest) == data
        assert await read_all(tier, digest) == data
        assert await tier.put_many([(SHA256.digest_of(b"x"), b"x")]) == [None]
    finally:
        os.chmod(tmp_path / "tier", 0o700)
