"""The worker-local input cache (executor/local_cache.py) on an in-memory CAS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cas.memory import MemoryStore
from cas.store import put_blob
from executor.local_cache import LocalCache
from reapi.core.digests import DigestFunction
from reapi.core.errors import NotFound

SHA256 = DigestFunction.SHA256


async def test_fetches_verified_read_only_files(tmp_path: Path) -> None:
    cas = MemoryStore()
    data = b"int main(void) { return 0; }\n"
    digest = SHA256.digest_of(data)
    await put_blob(cas, digest, data)
    cache = LocalCache(tmp_path, cas)
    inodes = await cache.ensure([(digest, False), (digest, True)])
    plain, executable = Path(cache.path(digest, False)), Path(cache.path(digest, True))
    assert inodes == {
        (digest, False): plain.stat().st_ino,
        (digest, True): executable.stat().st_ino,
    }
    assert plain.read_bytes() == executable.read_bytes() == data
    assert plain.stat().st_mode & 0o777 == 0o444
    assert executable.stat().st_mode & 0o777 == 0o555
    assert os.listdir(tmp_path / "tmp") == []


async def test_a_file_already_cached_is_never_replaced(tmp_path: Path) -> None:
    """Two workers sharing the cache fetch the same blob at once: the second
    must leave the first one's file (the inode other actions are linking) alone."""
    cas = MemoryStore()
    data = b"#define SHARED 1\n"
    digest = SHA256.digest_of(data)
    await put_blob(cas, digest, data)
    first, second = LocalCache(tmp_path, cas), LocalCache(tmp_path, cas)
    await first.ensure([(digest, False)])
    path = Path(first.path(digest, False))
    inode = path.stat().st_ino
    await second._fetch([digest], {(digest, False)})  # as if it had checked before first stored
    assert Path(second.path(digest, False)).stat().st_ino == inode
    assert path.read_bytes() == data
    assert await second.ensure([(digest, False)]) == {(digest, False): inode}
    assert os.listdir(tmp_path / "tmp") == []


async def test_a_blob_the_cas_lacks_is_not_found(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path, MemoryStore())
    digest = SHA256.digest_of(b"never uploaded")
    with pytest.raises(NotFound, match="missing from the CAS"):
        await cache.ensure([(digest, False)])
    assert not os.path.exists(cache.path(digest, False))


async def test_contents_at_hand_are_stored_without_a_fetch(tmp_path: Path) -> None:
    """A lease's input files: stored as fetched ones are; only the others are fetched."""
    cas = MemoryStore()
    fetched, carried = b"#define FETCHED 1\n", b"int carried;\n"
    fetched_digest, carried_digest = SHA256.digest_of(fetched), SHA256.digest_of(carried)
    await put_blob(cas, fetched_digest, fetched)  # the CAS lacks `carried`
    cache = LocalCache(tmp_path, cas)
    wanted = [(fetched_digest, False), (carried_digest, False), (carried_digest, True)]
    inodes = await cache.ensure(wanted, at_hand={carried_digest: carried})
    assert set(inodes) == set(wanted)
    for digest, executable in wanted:
        path = Path(cache.path(digest, executable))
        assert path.stat().st_ino == inodes[digest, executable]
        assert path.read_bytes() == (carried if digest == carried_digest else fetched)
        assert path.stat().st_mode & 0o777 == (0o555 if executable else 0o444)
    assert os.listdir(tmp_path / "tmp") == []
