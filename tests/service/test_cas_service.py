"""ContentAddressableStorage and Capabilities over real gRPC on a loopback port."""

from __future__ import annotations

import grpc
import pytest
import zstandard
from google.rpc import code_pb2

from reapi.core.digests import Digest, DigestFunction
from reapi.frontend.server import MAX_BATCH_TOTAL_SIZE
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.helpers import expect_status

SHA256, BLAKE3 = DigestFunction.SHA256, DigestFunction.BLAKE3
BLAKE3_WIRE = re_pb2.DigestFunction.BLAKE3
UpdateRequest = re_pb2.BatchUpdateBlobsRequest.Request


def cas(channel: grpc.aio.Channel) -> re_grpc.ContentAddressableStorageStub:
    return re_grpc.ContentAddressableStorageStub(channel)


async def upload(
    channel: grpc.aio.Channel, *blobs: bytes, function: DigestFunction = SHA256
) -> list[Digest]:
    digests = [function.digest_of(blob) for blob in blobs]
    response = await cas(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                UpdateRequest(digest=d.to_proto(), data=b)
                for d, b in zip(digests, blobs, strict=True)
            ],
            digest_function=function.value,
        )
    )
    assert [r.status.code for r in response.responses] == [code_pb2.OK] * len(blobs)
    return digests


async def test_capabilities_are_honest(channel: grpc.aio.Channel) -> None:
    stub = re_grpc.CapabilitiesStub(channel)
    caps = await stub.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    cache = caps.cache_capabilities
    assert list(cache.digest_functions) == [re_pb2.DigestFunction.SHA256, BLAKE3_WIRE]
    assert cache.action_cache_update_capabilities.update_enabled
    assert cache.max_batch_total_size_bytes == MAX_BATCH_TOTAL_SIZE
    assert list(cache.supported_compressors) == [re_pb2.Compressor.ZSTD]
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert (caps.high_api_version.major, caps.high_api_version.minor) == (2, 3)
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED
    execution = caps.execution_capabilities
    assert execution.exec_enabled
    assert execution.digest_function == re_pb2.DigestFunction.SHA256
    assert list(execution.digest_functions) == [re_pb2.DigestFunction.SHA256, BLAKE3_WIRE]


async def test_find_missing_then_upload_then_read(channel: grpc.aio.Channel) -> None:
    blobs = [b"one", b"two", b"three"]
    digests = [SHA256.digest_of(b).to_proto() for b in blobs]
    empty = SHA256.empty().to_proto()
    response = await cas(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[*digests, empty])
    )
    assert list(response.missing_blob_digests) == digests  # the empty blob is never missing
    await upload(channel, *blobs[:2])
    response = await cas(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=digests)
    )
    assert list(response.missing_blob_digests) == digests[2:]
    read = await cas(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
    assert [(r.status.code, r.data) for r in read.responses] == [
        (code_pb2.OK, b"one"),
        (code_pb2.OK, b"two"),
        (code_pb2.NOT_FOUND, b""),
    ]


async def test_blake3_is_named_and_kept_apart(channel: grpc.aio.Channel) -> None:
    (blake,) = await upload(channel, b"blake", function=BLAKE3)
    as_blake3 = await cas(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[blake.to_proto()], digest_function=BLAKE3_WIRE)
    )
    as_default = await cas(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[blake.to_proto()])
    )
    assert list(as_blake3.missing_blob_digests) == []
    assert list(as_default.missing_blob_digests) == [blake.to_proto()]


async def test_batch_update_reports_each_blob(channel: grpc.aio.Channel) -> None:
    good = SHA256.digest_of(b"good").to_proto()
    lying = SHA256.digest_of(b"claimed").to_proto()
    malformed = re_pb2.Digest(hash="XYZ", size_bytes=3)
    response = await cas(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                UpdateRequest(digest=good, data=b"good"),
                UpdateRequest(digest=lying, data=b"actual"),
                UpdateRequest(digest=malformed, data=b"xyz"),
            ]
        )
    )
    codes = [r.status.code for r in response.responses]
    assert codes == [code_pb2.OK, code_pb2.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT]
    assert "7 bytes" in response.responses[1].status.message
    missing = await cas(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[good, lying])
    )
    assert list(missing.missing_blob_digests) == [lying]


async def test_batch_update_with_zstd(channel: grpc.aio.Channel) -> None:
    data = b"compressible " * 1000
    digest = SHA256.digest_of(data).to_proto()
    response = await cas(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                UpdateRequest(
                    digest=digest, data=zstandard.compress(data), compressor=re_pb2.Compressor.ZSTD
                ),
                UpdateRequest(
                    digest=SHA256.digest_of(b"x").to_proto(),
                    data=b"not zstd",
                    compressor=re_pb2.Compressor.ZSTD,
                ),
                UpdateRequest(digest=digest, data=data, compressor=re_pb2.Compressor.BROTLI),
            ]
        )
    )
    codes = [r.status.code for r in response.responses]
    assert codes == [code_pb2.OK, code_pb2.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT]
    read = await cas(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest]))
    assert read.responses[0].data == data


@pytest.mark.parametrize(
    ("digest", "text"),
    [
        (re_pb2.Digest(hash="abc", size_bytes=1), "64 lowercase hexadecimal"),
        (re_pb2.Digest(hash="A" * 64, size_bytes=1), "64 lowercase hexadecimal"),
        (re_pb2.Digest(hash="g" * 64, size_bytes=1), "64 lowercase hexadecimal"),
        (re_pb2.Digest(hash="a" * 64, size_bytes=-5), "must not be negative"),
        (re_pb2.Digest(hash="a" * 40, size_bytes=1), "64 lowercase hexadecimal"),
    ],
)
async def test_malformed_digests_are_invalid_argument(
    channel: grpc.aio.Channel, digest: re_pb2.Digest, text: str
) -> None:
    await expect_status(
        cas(channel).FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[digest])),
        grpc.StatusCode.INVALID_ARGUMENT,
        text,
    )
    await expect_status(
        cas(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest])),
        grpc.StatusCode.INVALID_ARGUMENT,
        text,
    )


@pytest.mark.parametrize(
    "function",
    [re_pb2.DigestFunction.SHA1, re_pb2.DigestFunction.MD5, re_pb2.DigestFunction.SHA256TREE, 77],
)
async def test_unsupported_digest_function(channel: grpc.aio.Channel, function: int) -> None:
    await expect_status(
        cas(channel).FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(
                blob_digests=[SHA256.digest_of(b"x").to_proto()],
                digest_function=function,  # type: ignore[arg-type]  # 77 is no enum value
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "is not supported",
    )


async def test_oversize_batches_are_invalid_argument(channel: grpc.aio.Channel) -> None:
    big = b"\0" * (MAX_BATCH_TOTAL_SIZE // 2 + 1)
    digest = SHA256.digest_of(big).to_proto()
    await expect_status(
        cas(channel).BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    UpdateRequest(digest=digest, data=big),
                    UpdateRequest(digest=digest, data=big),
                ]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceeds max_batch_total_size_bytes",
    )
    await expect_status(
        cas(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest, digest])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceeds max_batch_total_size_bytes",
    )
    # Nothing of the refused batch was stored, and the server still serves.
    missing = await cas(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[digest])
    )
    assert list(missing.missing_blob_digests) == [digest]


def directory(files: dict[str, Digest] = {}, dirs: dict[str, Digest] = {}) -> re_pb2.Directory:  # noqa: B006
    return re_pb2.Directory(
        files=[re_pb2.FileNode(name=n, digest=d.to_proto()) for n, d in sorted(files.items())],
        directories=[
            re_pb2.DirectoryNode(name=n, digest=d.to_proto()) for n, d in sorted(dirs.items())
        ],
    )


async def store_directory(channel: grpc.aio.Channel, message: re_pb2.Directory) -> Digest:
    (digest,) = await upload(channel, message.SerializeToString())
    return digest


async def test_get_tree_pages_through_the_whole_tree(channel: grpc.aio.Channel) -> None:
    (leaf_file,) = await upload(channel, b"leaf")
    leaves = [await store_directory(channel, directory({f"f{n}": leaf_file})) for n in range(7)]
    middle = await store_directory(
        channel, directory(dirs={f"d{n}": d for n, d in enumerate(leaves)})
    )
    absent = SHA256.digest_of(directory({"gone": leaf_file}).SerializeToString())
    root = await store_directory(channel, directory(dirs={"m": middle, "x": absent}))
    expected = 1 + 1 + 7  # the absent subtree is left out

    async def fetch(page_size: int, token: str = "") -> list[re_pb2.GetTreeResponse]:
        request = re_pb2.GetTreeRequest(
            root_digest=root.to_proto(), page_size=page_size, page_token=token
        )
        return [page async for page in cas(channel).GetTree(request)]

    pages = await fetch(4)
    assert [len(p.directories) for p in pages] == [4, 4, 1]
    assert [p.next_page_token for p in pages] == ["4", "8", ""]
    everything = [d for p in pages for d in p.directories]
    assert len(everything) == expected
    assert everything[0] == directory(dirs={"m": middle, "x": absent})
    resumed = await fetch(4, pages[0].next_page_token)
    assert [d for p in resumed for d in p.directories] == everything[4:]


async def test_get_tree_errors(channel: grpc.aio.Channel) -> None:
    missing = SHA256.digest_of(b"no such directory").to_proto()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [page async for page in cas(channel).GetTree(re_pb2.GetTreeRequest(root_digest=missing))]
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    (root,) = await upload(channel, directory().SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [
            page
            async for page in cas(channel).GetTree(
                re_pb2.GetTreeRequest(root_digest=root.to_proto(), page_token="bogus")
            )
        ]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
