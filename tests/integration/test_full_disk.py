"""A full disk under the real server: RESOURCE_EXHAUSTED blob by blob, what fits is
stored and reads back, no traceback, the server keeps serving, and `reapi cas
verify` finds the store clean. The disk is a small tmpfs (the test needs root to
mount it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from reapi.core.digests import Digest
from reapi.protos import bytestream_pb2
from reapi.protos import bytestream_pb2_grpc as bs_grpc
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.actions import SHA256, execute, upload_action
from tests.helpers import REPO, ServerProcess, WorkerProcess

OK, FULL = grpc.StatusCode.OK.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DISK_BYTES = 3 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it mounts a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(disk)],
                   check=True)  # fmt: skip
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def blob(seed: int, size: int) -> tuple[Digest, bytes]:
    data = (seed.to_bytes(4, "big") + os.urandom(60)) * (size // 64) + bytes(size % 64)
    return SHA256.digest_of(data), data


def batch(blobs: list[tuple[Digest, bytes]]) -> re_pb2.BatchUpdateBlobsRequest:
    return re_pb2.BatchUpdateBlobsRequest(
        requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=digest.to_proto(), data=data)
            for digest, data in blobs
        ]
    )


async def _one_upload(digest: Digest, data: bytes) -> AsyncIterator[bytestream_pb2.WriteRequest]:
    name = f"uploads/0b6e1e3c-1111-4222-8333-444455556666/blobs/{digest.hash}/{digest.size}"
    for offset in range(0, len(data), 256 * 1024):
        yield bytestream_pb2.WriteRequest(
            resource_name=name if offset == 0 else "",
            write_offset=offset,
            data=data[offset : offset + 256 * 1024],
            finish_write=offset + 256 * 1024 >= len(data),
        )


async def test_a_full_store_refuses_blob_by_blob_and_loses_nothing(small_disk: Path) -> None:
    server = ServerProcess(small_disk / "storage")
    stored: dict[Digest, bytes] = {}
    refused: list[Digest] = []
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            # Small blobs first (SQLite), then large ones (files), 3.6 MiB on a 3 MiB disk.
            batches = [
                [blob(n, 3000) for n in range(60)],
                [blob(100 + n, 900 * 1024) for n in range(4)],
                [blob(200 + n, 4000) for n in range(200)],  # the disk is full by now
            ]
            for blobs in batches:
                reply = await cas.BatchUpdateBlobs(batch(blobs))
                assert len(reply.responses) == len(blobs)
                for (digest, data), response in zip(blobs, reply.responses, strict=True):
                    assert Digest.from_proto(SHA256, response.digest) == digest
                    if response.status.code == OK:
                        stored[digest] = data
                    else:
                        assert response.status.code == FULL, response.status
                        assert "storage is full" in response.status.message
                        refused.append(digest)
            assert len(refused) > 0 and len(stored) > 60, (len(stored), len(refused))
            # The large batch was partly stored: what fit was acknowledged.
            large = {digest for digest, _ in batches[1]}
            assert large & set(stored) and large & set(refused)

            # A streamed upload that cannot fit: RESOURCE_EXHAUSTED, nothing kept.
            digest, data = blob(300, 2 * 1024 * 1024)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await bs_grpc.ByteStreamStub(channel).Write(_one_upload(digest, data))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused.append(digest)

            # Everything acknowledged reads back; nothing refused is there.
            missing = await cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(
                    blob_digests=[d.to_proto() for d in [*stored, *refused]]
                )
            )
            assert {Digest.from_proto(SHA256, d) for d in missing.missing_blob_digests} == set(
                refused
            )
            for digest, data in stored.items():
                read = await cas.BatchReadBlobs(
                    re_pb2.BatchReadBlobsRequest(digests=[digest.to_proto()])
                )
                assert read.responses[0].data == data
            # And the server goes on serving.
            capabilities = await re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest()
            )
            assert capabilities.cache_capabilities.digest_functions
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "Traceback" not in log, log
    assert "is full" in log
    verify = subprocess.run(
        [sys.executable, "-m", "reapi", "cas", "verify", "--storage", str(small_disk / "storage")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_a_full_worker_disk_fails_the_action_clearly(
    small_disk: Path, tmp_path: Path
) -> None:
    """Inputs that do not fit on the worker's disk: the action fails with
    RESOURCE_EXHAUSTED saying so (no traceback), and the worker runs the next one."""
    server = ServerProcess(tmp_path / "storage")
    worker = WorkerProcess(server, "small-disk", small_disk / "worker")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            too_big = await upload_action(
                channel, ["/bin/true"], files={"big.bin": os.urandom(DISK_BYTES + 1024 * 1024)}
            )
            _ops, response = await execute(channel, too_big)
            assert response.status.code == FULL, response.status
            assert "worker small-disk: its disk is full" in response.status.message
            small = await upload_action(channel, ["/bin/sh", "-c", "echo still here"])
            _ops, response = await execute(channel, small, inline_stdout=True)
            assert response.status.code == OK, response.status
            assert response.result.stdout_raw == b"still here\n"
    finally:
        worker.stop()
        server.stop()
    assert "Traceback" not in worker.log(), worker.log()
