"""ByteStream reads, resumable writes, and compressed-blobs over real gRPC."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest
import zstandard

from reapi.core.digests import Digest, DigestFunction
from reapi.frontend.server import Server
from reapi.frontend.services.bytestream import _read_response
from reapi.protos import bytestream_pb2 as bs_pb2
from reapi.protos import bytestream_pb2_grpc as bs_grpc
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.helpers import expect_status

SHA256, BLAKE3 = DigestFunction.SHA256, DigestFunction.BLAKE3


def stub(channel: grpc.aio.Channel) -> bs_grpc.ByteStreamStub:
    return bs_grpc.ByteStreamStub(channel)


def upload_name(digest: Digest, compressed: bool = False, instance: str = "") -> str:
    prefix = f"{instance}/" if instance else ""
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    return f"{prefix}uploads/{uuid.uuid4()}/{kind}/{digest.resource_path()}"


def requests(
    name: str, data: bytes, chunk: int = 65536, offset: int = 0, finish: bool = True
) -> list[bs_pb2.WriteRequest]:
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    out = []
    for index, piece in enumerate(pieces):
        out.append(
            bs_pb2.WriteRequest(
                resource_name=name if index == 0 else "",
                write_offset=offset,
                data=piece,
                finish_write=finish and index == len(pieces) - 1,
            )
        )
        offset += len(piece)
    return out


async def stream(items: Iterable[bs_pb2.WriteRequest]) -> AsyncIterator[bs_pb2.WriteRequest]:
    for item in items:
        yield item


async def write(channel: grpc.aio.Channel, name: str, data: bytes, **kw: object) -> int:
    response = await stub(channel).Write(stream(requests(name, data, **kw)))  # type: ignore[arg-type]
    return int(response.committed_size)


async def read(channel: grpc.aio.Channel, name: str, offset: int = 0, limit: int = 0) -> bytes:
    call = stub(channel).Read(
        bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
    )
    return b"".join([r.data async for r in call])


async def missing(channel: grpc.aio.Channel, digest: Digest) -> bool:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    response = await cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(
            blob_digests=[digest.to_proto()], digest_function=digest.function.value
        )
    )
    return len(response.missing_blob_digests) == 1


@pytest.mark.parametrize("function", list(DigestFunction))
async def test_write_then_read(channel: grpc.aio.Channel, function: DigestFunction) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = function.digest_of(data)
    assert await write(channel, upload_name(digest, instance="main/ci"), data) == len(data)
    assert await read(channel, f"main/ci/blobs/{digest.resource_path()}") == data
    assert await read(channel, f"blobs/{digest.resource_path()}", 1000, 10) == data[1000:1010]
    assert await read(channel, f"blobs/{digest.resource_path()}", len(data)) == b""


async def test_existing_blob_finishes_early(channel: grpc.aio.Channel) -> None:
    data = b"already here" * 1000
    digest = SHA256.digest_of(data)
    await write(channel, upload_name(digest), data)
    # Only the first chunk is sent, and no finish_write: the server answers at once.
    only_first = requests(upload_name(digest), data, chunk=100)[:1]
    response = await stub(channel).Write(stream(only_first))
    assert response.committed_size == len(data)
    compressed = await stub(channel).Write(
        stream(requests(upload_name(digest, compressed=True), b"x", finish=False))
    )
    assert compressed.committed_size == -1


async def test_resume_after_interrupted_upload(channel: grpc.aio.Channel) -> None:
    data = os.urandom(1_000_000)
    digest = SHA256.digest_of(data)
    name = upload_name(digest)
    first = requests(name, data[:300_000], chunk=100_000, finish=False)
    response = await stub(channel).Write(stream(first))
    assert response.committed_size == 300_000
    status = await stub(channel).QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name)
    )
    assert (status.committed_size, status.complete) == (300_000, False)
    assert await missing(channel, digest)
    rest = requests(name, data[300_000:], offset=300_000)
    rest[0].resource_name = name
    response = await stub(channel).Write(stream(rest))
    assert response.committed_size == len(data)
    status = await stub(channel).QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name)
    )
    assert (status.committed_size, status.complete) == (len(data), True)
    assert await read(channel, f"blobs/{digest.resource_path()}") == data


async def test_query_write_status_of_unknown_upload(channel: grpc.aio.Channel) -> None:
    name = upload_name(SHA256.digest_of(b"never sent"))
    status = await stub(channel).QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name)
    )
    assert (status.committed_size, status.complete) == (0, False)


@pytest.mark.parametrize("function", list(DigestFunction))
async def test_compressed_write_and_read(
    channel: grpc.aio.Channel, function: DigestFunction
) -> None:
    data = b"0123456789abcdef" * 200_000 + os.urandom(1000)
    digest = function.digest_of(data)
    packed = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert await write(channel, upload_name(digest, compressed=True), packed, chunk=50_000) == len(
        packed
    )
    got = await read(channel, f"compressed-blobs/zstd/{digest.resource_path()}")
    assert zstandard.ZstdDecompressor().decompressobj().decompress(got) == data
    part = await read(channel, f"compressed-blobs/zstd/{digest.resource_path()}", 5)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(part) == data[5:]
    assert await read(channel, f"blobs/{digest.resource_path()}") == data


async def expect_read(
    channel: grpc.aio.Channel,
    name: str,
    code: grpc.StatusCode,
    text: str,
    offset: int = 0,
    limit: int = 0,
) -> None:
    await expect_status(read(channel, name, offset, limit), code, text)


HASH = "a" * 64


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("", "expected 'blobs/' or 'compressed-blobs/'"),
        (f"blobz/{HASH}/1", "expected 'blobs/' or 'compressed-blobs/'"),
        ("blobs/abc/1", "64 lowercase hexadecimal"),
        (f"blobs/{HASH}", "expected '{hash}/{size}'"),
        (f"blobs/{HASH}/x", "is not a non-negative integer"),
        (f"blobs/{HASH}/-1", "is not a non-negative integer"),
        (f"blobs/{HASH}/1/extra", "unexpected text after the size"),
        (f"blobs/sha1/{HASH}/1", "digest function 'sha1' is not supported"),
        (f"uploads/blobs/{HASH}/1", "reserved word"),
        (f"compressed-blobs/brotli/{HASH}/1", "compressor 'brotli' is not supported"),
    ],
)
async def test_malformed_read_names(channel: grpc.aio.Channel, name: str, text: str) -> None:
    await expect_read(channel, name, grpc.StatusCode.INVALID_ARGUMENT, text)


async def test_read_errors(channel: grpc.aio.Channel) -> None:
    data = b"twelve bytes"
    digest = SHA256.digest_of(data)
    await write(channel, upload_name(digest), data)
    name = f"blobs/{digest.resource_path()}"
    await expect_read(
        channel,
        f"blobs/{SHA256.digest_of(b'absent').resource_path()}",
        grpc.StatusCode.NOT_FOUND,
        "not found",
    )
    await expect_read(channel, name, grpc.StatusCode.OUT_OF_RANGE, "past the end", offset=13)
    await expect_read(channel, name, grpc.StatusCode.OUT_OF_RANGE, "negative", offset=-1)
    await expect_read(channel, name, grpc.StatusCode.OUT_OF_RANGE, "negative", limit=-1)
    await expect_read(
        channel,
        f"compressed-blobs/zstd/{digest.resource_path()}",
        grpc.StatusCode.INVALID_ARGUMENT,
        "read_limit must be 0",
        limit=4,
    )


@pytest.mark.parametrize(
    ("build", "text"),
    [
        (lambda d, n: requests(n, b"something else entirely"), "more data sent"),
        (lambda d, n: requests(n, b"x" * d.size), "hashes to"),
        (lambda d, n: requests(n, b"ab"), "ended after 2 of"),
        (lambda d, n: requests(n, b"ab", offset=5), "start at 0"),
        (
            lambda d, n: [
                *requests(n, b"abc", finish=False),
                bs_pb2.WriteRequest(write_offset=1, data=b"d"),
            ],
            "does not continue",
        ),
        (
            lambda d, n: [
                *requests(n, b"abc", finish=False),
                bs_pb2.WriteRequest(resource_name=n + "x", write_offset=3),
            ],
            "resource_name changed",
        ),
        (lambda d, n: requests(f"uploads/x/blobs/{HASH}/zz", b""), "non-negative integer"),
        (lambda d, n: requests("blobs/nope", b""), "expected 'uploads/'"),
        (lambda d, n: requests(f"uploads/blobs/{HASH}/1", b""), "missing upload id"),
    ],
)
async def test_bad_writes_leave_nothing(
    server: Server, channel: grpc.aio.Channel, build: object, text: str
) -> None:
    digest = SHA256.digest_of(b"the real content")
    name = upload_name(digest)
    await expect_status(
        stub(channel).Write(stream(build(digest, name))),  # type: ignore[operator]
        grpc.StatusCode.INVALID_ARGUMENT,
        text,
    )
    assert await missing(channel, digest)
    assert list((server.config.storage / "tmp").iterdir()) == []
    # The server keeps serving, and the same upload then succeeds.
    assert await write(channel, upload_name(digest), b"the real content") == digest.size


async def test_bad_compressed_write(server: Server, channel: grpc.aio.Channel) -> None:
    data = b"payload" * 100
    digest = SHA256.digest_of(data)
    await expect_status(
        stub(channel).Write(stream(requests(upload_name(digest, True), b"not zstd"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid zstd data",
    )
    wrong = zstandard.compress(b"other" * 140)
    await expect_status(
        stub(channel).Write(stream(requests(upload_name(digest, True), wrong))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hashes to",
    )
    assert await missing(channel, digest)
    assert list((server.config.storage / "tmp").iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 1 << 20, (1 << 21) + 3])
def test_hand_encoded_read_response_is_a_read_response(size: int) -> None:
    data = os.urandom(size)
    encoded = _read_response(data)
    assert encoded == bs_pb2.ReadResponse(data=data).SerializeToString()
    assert bs_pb2.ReadResponse.FromString(encoded).data == data


async def test_resume_after_client_disconnects(channel: grpc.aio.Channel) -> None:
    data = os.urandom(400_000)
    digest = SHA256.digest_of(data)
    name = upload_name(digest)
    hang = asyncio.Event()

    async def three_chunks_then_hang() -> AsyncIterator[bs_pb2.WriteRequest]:
        for item in requests(name, data[:300_000], chunk=100_000, finish=False):
            yield item
        await hang.wait()

    call = stub(channel).Write(three_chunks_then_hang())
    query = bs_pb2.QueryWriteStatusRequest(resource_name=name)
    for _ in range(200):
        if (await stub(channel).QueryWriteStatus(query)).committed_size == 300_000:
            break
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.1)  # the server notices the cancellation
    assert (await stub(channel).QueryWriteStatus(query)).committed_size == 300_000
    rest = requests(name, data[300_000:], offset=300_000)
    rest[0].resource_name = name
    assert (await stub(channel).Write(stream(rest))).committed_size == len(data)
    assert await read(channel, f"blobs/{digest.resource_path()}") == data
