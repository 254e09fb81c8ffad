"""Large blobs between a worker and the real server, a chunk at a time:
RemoteStore's streamed uploads (put_file) and the worker cache's streamed
fetches, each checked byte for byte and refused when wrong."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from cas.remote import BATCH_BYTES, RemoteStore
from cas.store import get_blob, put_file
from executor.local_cache import LocalCache
from reapi.core.digests import DigestFunction
from reapi.core.errors import InvalidArgument

SHA256 = DigestFunction.SHA256
SIZE = 20 * 1024 * 1024  # far above the batch limit: a ByteStream write of 20 chunks


def big_file(path: Path, seed: bytes) -> bytes:
    data = (seed * (SIZE // len(seed) + 1))[:SIZE]
    path.write_bytes(data)
    return data


async def test_a_large_file_is_uploaded_as_a_stream(
    channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    data = big_file(tmp_path / "big", os.urandom(4096))
    store = RemoteStore(channel)
    digest = SHA256.digest_of_file(tmp_path / "big")
    assert digest == SHA256.digest_of(data) and digest.size > BATCH_BYTES
    await put_file(store, digest, tmp_path / "big")
    assert await get_blob(store, digest) == data
    await put_file(store, digest, tmp_path / "big")  # already there: the server may end early


async def test_a_file_that_is_not_its_digest_is_refused_and_not_stored(
    channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    claimed = SHA256.digest_of(big_file(tmp_path / "claimed", b"one"))
    big_file(tmp_path / "other", b"two")
    store = RemoteStore(channel)
    with pytest.raises(InvalidArgument, match="hashes to"):
        await put_file(store, claimed, tmp_path / "other")
    assert await store.find_missing([claimed]) == [claimed]
    (tmp_path / "short").write_bytes(b"short")
    with pytest.raises(InvalidArgument, match="5 of"):
        await put_file(store, claimed, tmp_path / "short")
    assert await store.find_missing([claimed]) == [claimed]


async def test_the_worker_cache_fetches_a_large_input_as_a_stream(
    channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    data = big_file(tmp_path / "big", os.urandom(4096))
    store = RemoteStore(channel)
    digest = SHA256.digest_of(data)
    await put_file(store, digest, tmp_path / "big")
    cache = LocalCache(tmp_path / "cache", store)
    inodes = await cache.ensure([(digest, False), (digest, True)])
    assert len(set(inodes.values())) == 2
    for executable in (False, True):
        path = Path(cache.path(digest, executable))
        assert path.read_bytes() == data
        assert os.access(path, os.X_OK) == executable
    assert os.listdir(tmp_path / "cache" / "tmp") == []


async def test_a_large_blob_in_a_batch_upload_goes_as_a_stream(channel: grpc.aio.Channel) -> None:
    data = os.urandom(SIZE)
    digest = SHA256.digest_of(data)
    store = RemoteStore(channel)
    assert await store.put_many([(digest, data), (SHA256.digest_of(b"x"), b"x")]) == [None, None]
    assert await get_blob(store, digest) == data
