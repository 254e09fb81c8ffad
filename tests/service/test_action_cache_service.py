"""ActionCache over real gRPC: completeness checking, inlining, bad input."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2

from reapi.core.digests import Digest, DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc

SHA256 = DigestFunction.SHA256


def ac(channel: grpc.aio.Channel) -> re_grpc.ActionCacheStub:
    return re_grpc.ActionCacheStub(channel)


async def put_blobs(channel: grpc.aio.Channel, *blobs: bytes) -> list[Digest]:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    digests = [SHA256.digest_of(b) for b in blobs]
    response = await cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=b)
                for d, b in zip(digests, blobs, strict=True)
            ]
        )
    )
    assert all(r.status.code == code_pb2.OK for r in response.responses)
    return digests


def action(name: str) -> re_pb2.Digest:
    return SHA256.digest_of(re_pb2.Action(salt=name.encode()).SerializeToString()).to_proto()


async def test_update_then_get_with_inlining(channel: grpc.aio.Channel) -> None:
    obj, out, err = await put_blobs(channel, b"\x7fELF object", b"compiled\n", b"warning\n")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out/a.o", digest=obj.to_proto())],
        stdout_digest=out.to_proto(),
        stderr_digest=err.to_proto(),
        exit_code=0,
        stdout_raw=b"clients should not send this",
    )
    key = action("compile a.c")
    stored = await ac(channel).UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=key, action_result=result)
    )
    assert stored.stdout_raw == b""  # inlined bytes are not kept: they live in the CAS

    plain = await ac(channel).GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
    assert plain.output_files[0].digest == obj.to_proto()
    assert (plain.stdout_raw, plain.output_files[0].contents) == (b"", b"")

    inlined = await ac(channel).GetActionResult(
        re_pb2.GetActionResultRequest(
            action_digest=key,
            inline_stdout=True,
            inline_stderr=True,
            inline_output_files=["out/a.o"],
        )
    )
    assert (inlined.stdout_raw, inlined.stderr_raw) == (b"compiled\n", b"warning\n")
    assert inlined.output_files[0].contents == b"\x7fELF object"


async def test_unknown_action_is_not_found(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ac(channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=action("never ran"))
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_result_with_missing_outputs_is_a_miss(channel: grpc.aio.Channel) -> None:
    (present,) = await put_blobs(channel, b"present output")
    gone = SHA256.digest_of(b"output that was never uploaded")
    result = re_pb2.ActionResult(
        output_files=[
            re_pb2.OutputFile(path="a", digest=present.to_proto()),
            re_pb2.OutputFile(path="b", digest=gone.to_proto()),
        ]
    )
    key = action("half uploaded")
    await ac(channel).UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=key, action_result=result)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ac(channel).GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no longer in the CAS" in (raised.value.details() or "")
    # Once the blob arrives, the same entry is complete again.
    await put_blobs(channel, b"output that was never uploaded")
    found = await ac(channel).GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
    assert len(found.output_files) == 2


async def test_output_directory_contents_are_checked(channel: grpc.aio.Channel) -> None:
    inner = SHA256.digest_of(b"file inside the output directory")
    tree = re_pb2.Tree(
        root=re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=inner.to_proto())])
    )
    (tree_digest,) = await put_blobs(channel, tree.SerializeToString())
    key = action("makes a directory")
    await ac(channel).UpdateActionResult(
        re_pb2.UpdateActionResultRequest(
            action_digest=key,
            action_result=re_pb2.ActionResult(
                output_directories=[
                    re_pb2.OutputDirectory(path="outdir", tree_digest=tree_digest.to_proto())
                ]
            ),
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ac(channel).GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    await put_blobs(channel, b"file inside the output directory")
    await ac(channel).GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))


@pytest.mark.parametrize(
    ("request_", "text"),
    [
        (
            re_pb2.UpdateActionResultRequest(
                action_digest=re_pb2.Digest(hash="x", size_bytes=1),
                action_result=re_pb2.ActionResult(),
            ),
            "64 lowercase hexadecimal",
        ),
        (re_pb2.UpdateActionResultRequest(action_digest=action("a")), "action_result is required"),
        (
            re_pb2.UpdateActionResultRequest(
                action_digest=action("a"),
                action_result=re_pb2.ActionResult(
                    output_files=[
                        re_pb2.OutputFile(
                            path="/etc/passwd", digest=SHA256.digest_of(b"").to_proto()
                        )
                    ]
                ),
            ),
            "must be a non-empty relative path",
        ),
        (
            re_pb2.UpdateActionResultRequest(
                action_digest=action("a"),
                action_result=re_pb2.ActionResult(
                    output_files=[
                        re_pb2.OutputFile(path="a.o", digest=re_pb2.Digest(hash="z" * 64))
                    ]
                ),
            ),
            "64 lowercase hexadecimal",
        ),
        (
            re_pb2.UpdateActionResultRequest(
                action_digest=action("a"),
                digest_function=re_pb2.DigestFunction.SHA1,
                action_result=re_pb2.ActionResult(),
            ),
            "SHA1 is not supported",
        ),
    ],
)
async def test_bad_updates_are_invalid_argument(
    channel: grpc.aio.Channel, request_: re_pb2.UpdateActionResultRequest, text: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ac(channel).UpdateActionResult(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in (raised.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await ac(channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=request_.action_digest)
        )
    assert raised.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
