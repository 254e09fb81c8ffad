"""kill -9 in the middle of uploads: afterwards no blob's bytes differ from its digest.

Each round starts the real server, runs many concurrent uploads (ByteStream in
small chunks, plain and zstd, and BatchUpdateBlobs), kills the server with
SIGKILL at a different moment, then checks every file in the store by hashing
it, and reads everything back through a restarted server.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import zstandard

from cas.disk import DiskStore
from cas.small_blobs import SMALL_DB
from reapi.core.digests import Digest, DigestFunction
from reapi.protos import bytestream_pb2 as bs_pb2
from reapi.protos import bytestream_pb2_grpc as bs_grpc
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.helpers import ServerProcess


async def chunks(name: str, data: bytes, size: int) -> AsyncIterator[bs_pb2.WriteRequest]:
    for start in range(0, len(data), size):
        piece = data[start : start + size]
        yield bs_pb2.WriteRequest(
            resource_name=name if start == 0 else "",
            write_offset=start,
            data=piece,
            finish_write=start + size >= len(data),
        )
        await asyncio.sleep(0.005)


async def stream_uploads(
    channel: grpc.aio.Channel,
    rng: random.Random,
    function: DigestFunction,
    compressed: bool,
    done: list[Digest],
) -> None:
    """Upload one blob after another until the server goes away."""
    stub = bs_grpc.ByteStreamStub(channel)
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    while True:
        # Small blobs (kept in SQLite), or large ones that reach disk in tmp/ within
        # their first megabyte and stay there for most of their upload.
        small = rng.random() < 0.3
        data = rng.randbytes(
            rng.randint(1_000, 60_000) if small else rng.randint(2_000_000, 6_000_000)
        )
        digest = function.digest_of(data)
        name = f"uploads/{uuid.uuid4()}/{kind}/{digest.resource_path()}"
        wire = zstandard.compress(data) if compressed else data
        await stub.Write(chunks(name, wire, 128 * 1024))
        done.append(digest)


async def batch_upload(channel: grpc.aio.Channel, rng: random.Random, done: list[Digest]) -> None:
    stub = re_grpc.ContentAddressableStorageStub(channel)
    while True:
        blobs = [rng.randbytes(rng.randint(1, 8192)) for _ in range(50)]
        digests = [DigestFunction.SHA256.digest_of(b) for b in blobs]
        await stub.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=b)
                    for d, b in zip(digests, blobs, strict=True)
                ]
            )
        )
        done.extend(digests)


async def load_then_kill(server: ServerProcess, rng: random.Random, delay: float) -> list[Digest]:
    done: list[Digest] = []
    async with grpc.aio.insecure_channel(server.address) as channel:
        jobs = [batch_upload(channel, rng, done)]
        for index in range(8):
            function = DigestFunction.BLAKE3 if index % 3 == 0 else DigestFunction.SHA256
            jobs.append(stream_uploads(channel, rng, function, index % 4 == 1, done))
        tasks = [asyncio.create_task(job) for job in jobs]
        # `delay` counts from the first upload in flight, not from the start: a
        # loaded machine can take longer than the shortest delay to get there.
        uploads = server.storage / "tmp"

        async def until_an_upload_is_in_flight() -> None:
            deadline = time.monotonic() + 30
            while not (uploads.is_dir() and any(uploads.iterdir())):
                assert time.monotonic() < deadline, "no upload reached tmp/"
                await asyncio.sleep(0.002)

        await until_an_upload_is_in_flight()
        await asyncio.sleep(delay)
        await until_an_upload_is_in_flight()  # the streams may be between two blobs
        server.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results), results
    return done


def check_every_file(storage: Path) -> int:
    """Hash every stored blob, reading the files and the SQLite rows directly."""
    count = 0
    db = sqlite3.connect(storage / SMALL_DB)
    rows = db.execute(
        "SELECT k.function, k.hash, k.size, d.data FROM blob_keys AS k "
        "JOIN blob_data AS d ON d.id = k.data_id"
    )
    for value, key, size, data in rows:
        function = DigestFunction(value)
        assert function.digest_of(data) == Digest(function, key.hex(), size)
        count += 1
    (orphans,) = db.execute(
        "SELECT COUNT(*) FROM blob_data WHERE id NOT IN (SELECT data_id FROM blob_keys)"
    ).fetchone()
    assert orphans == 0
    db.close()
    for function in DigestFunction:
        for path in (storage / "cas" / function.path_name).glob("*/*"):
            data = path.read_bytes()
            assert function.digest_of(data).hash == path.name, f"corrupt blob {path}"
            count += 1
    return count


async def read_back(server: ServerProcess, storage: Path, acknowledged: list[Digest]) -> None:
    store = DiskStore(storage)
    stored = [info.digest async for info in store.iter_blobs()]
    store.close()
    async with grpc.aio.insecure_channel(server.address) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        bytestream = bs_grpc.ByteStreamStub(channel)
        for function in DigestFunction:
            wanted = [d.to_proto() for d in acknowledged if d.function is function]
            response = await cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=wanted, digest_function=function.value)
            )
            assert list(response.missing_blob_digests) == [], "acknowledged upload lost"
        for digest in stored:
            call = bytestream.Read(
                bs_pb2.ReadRequest(resource_name=f"blobs/{digest.resource_path()}")
            )
            data = b"".join([r.data async for r in call])
            assert digest.function.digest_of(data) == digest


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8, 1.5])
async def test_kill_9_mid_upload_never_corrupts(tmp_path: Path, delay: float) -> None:
    storage = tmp_path / "storage"
    rng = random.Random(delay)
    server = ServerProcess(storage)
    acknowledged = await load_then_kill(server, rng, delay)
    leftovers = list((storage / "tmp").iterdir())
    stored = check_every_file(storage)
    restarted = ServerProcess(storage)
    try:
        # The dead server's partial uploads are swept at start.
        assert leftovers, "the kill came when no upload was in flight"
        assert not any(path.exists() for path in leftovers)
        await read_back(restarted, storage, acknowledged)
    finally:
        assert restarted.stop() == 0
    assert stored > 0
