"""Permissions per token and per client certificate, call by call, against the
real server process with TLS, a token file and a local worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from reapi.protos import bytestream_pb2, worker_pb2, worker_pb2_grpc
from reapi.protos import bytestream_pb2_grpc as bs_grpc
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.actions import SHA256, execute, stage, upload_action
from tests.helpers import ServerProcess
from tests.pki import Pem, Pki, issue, make_pki, tls_args

TOKENS = """\
# one line per grant
read-token read
write-token write
alice-token execute
bob-token execute
worker-token worker
admin-token admin
team-token read,write,execute @team-a
"CN=reapi client" read
"""

BLOB = b"a blob anyone may have"
BLOB_DIGEST = SHA256.digest_of(BLOB).to_proto()
ABSENT = SHA256.digest_of(b"not stored").to_proto()
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), TOKENS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Any:
    folder = tmp_path_factory.mktemp("server")
    process = ServerProcess(
        folder / "storage",
        *tls_args(pki),
        "--tls-client-ca",
        str(pki.files["ca.pem"]),
        "--auth-tokens",
        str(pki.files["tokens"]),
        workers=1,
    )
    yield process
    process.stop()


def connect(server: ServerProcess, pki: Pki, token: str | None, cert: Pem | None = None) -> Any:
    """A channel whose calls carry `token` (if any), presenting `cert` (the test
    client's certificate by default: mutual TLS is on)."""
    cert = cert or pki.client
    credentials = grpc.ssl_channel_credentials(pki.ca.cert, cert.key, cert.cert)
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return grpc.aio.secure_channel(f"localhost:{server.port}", credentials)


# ------------------------------------------------------------ one call each


async def _all(stream: Any) -> None:
    async for _ in stream:
        pass


async def _upload_chunks(name: str) -> AsyncIterator[bytestream_pb2.WriteRequest]:
    yield bytestream_pb2.WriteRequest(resource_name=name, data=BLOB, finish_write=True)


async def _work(channel: Any) -> None:
    """Opens the worker stream: a worker is then left waiting for its Hello (the
    call's deadline ends it), anyone else is refused at once. Nothing is sent: a
    message sent after the refusal may fail on its own and hide the status."""
    call = worker_pb2_grpc.WorkersStub(channel).Work(timeout=1.5)
    await call.read()


def _upload_name(instance: str = "") -> str:
    prefix = f"{instance}/" if instance else ""
    return (
        f"{prefix}uploads/1e0a7c2e-0000-4000-8000-000000000001/blobs/{BLOB_DIGEST.hash}/{len(BLOB)}"
    )


CALLS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "GetCapabilities": lambda c: re_grpc.CapabilitiesStub(c).GetCapabilities(
        re_pb2.GetCapabilitiesRequest()
    ),
    "FindMissingBlobs": lambda c: re_grpc.ContentAddressableStorageStub(c).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[BLOB_DIGEST])
    ),
    "BatchReadBlobs": lambda c: re_grpc.ContentAddressableStorageStub(c).BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[BLOB_DIGEST])
    ),
    "GetTree": lambda c: _all(
        re_grpc.ContentAddressableStorageStub(c).GetTree(re_pb2.GetTreeRequest(root_digest=ABSENT))
    ),
    "Read": lambda c: _all(
        bs_grpc.ByteStreamStub(c).Read(
            bytestream_pb2.ReadRequest(resource_name=f"blobs/{BLOB_DIGEST.hash}/{len(BLOB)}")
        )
    ),
    "GetActionResult": lambda c: re_grpc.ActionCacheStub(c).GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=ABSENT)
    ),
    "GetProvided": lambda c: worker_pb2_grpc.WorkersStub(c).GetProvided(
        worker_pb2.GetProvidedRequest()
    ),
    "BatchUpdateBlobs": lambda c: re_grpc.ContentAddressableStorageStub(c).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=BLOB_DIGEST, data=BLOB)]
        )
    ),
    "Write": lambda c: bs_grpc.ByteStreamStub(c).Write(_upload_chunks(_upload_name())),
    "QueryWriteStatus": lambda c: bs_grpc.ByteStreamStub(c).QueryWriteStatus(
        bytestream_pb2.QueryWriteStatusRequest(resource_name=_upload_name())
    ),
    "UpdateActionResult": lambda c: re_grpc.ActionCacheStub(c).UpdateActionResult(
        re_pb2.UpdateActionResultRequest(
            action_digest=ABSENT, action_result=re_pb2.ActionResult(exit_code=0)
        )
    ),
    "Execute": lambda c: _all(
        re_grpc.ExecutionStub(c).Execute(re_pb2.ExecuteRequest(action_digest=ABSENT))
    ),
    "WaitExecution": lambda c: _all(
        re_grpc.ExecutionStub(c).WaitExecution(re_pb2.WaitExecutionRequest(name="operations/x"))
    ),
    "GetOperation": lambda c: operations_pb2_grpc.OperationsStub(c).GetOperation(
        operations_pb2.GetOperationRequest(name="operations/x")
    ),
    "ListOperations": lambda c: operations_pb2_grpc.OperationsStub(c).ListOperations(
        operations_pb2.ListOperationsRequest()
    ),
    "CancelOperation": lambda c: operations_pb2_grpc.OperationsStub(c).CancelOperation(
        operations_pb2.CancelOperationRequest(name="operations/x")
    ),
    "WaitOperation": lambda c: operations_pb2_grpc.OperationsStub(c).WaitOperation(
        operations_pb2.WaitOperationRequest(name="operations/x")
    ),
    "Work": _work,
}

READS = {
    "GetCapabilities", "FindMissingBlobs", "BatchReadBlobs", "GetTree", "Read",
    "GetActionResult", "GetProvided",
}  # fmt: skip
UPLOADS = {"BatchUpdateBlobs", "Write", "QueryWriteStatus"}
OPERATIONS = {"Execute", "WaitExecution", "GetOperation", "ListOperations", "CancelOperation",
              "WaitOperation"}  # fmt: skip
WORKER = READS - {"GetActionResult"} | UPLOADS | {"Work"}
ALLOWED = {
    "read-token": READS,
    "write-token": READS | UPLOADS | {"UpdateActionResult"},
    "alice-token": READS | UPLOADS | OPERATIONS,
    "worker-token": WORKER,
    "admin-token": READS | UPLOADS | OPERATIONS | {"UpdateActionResult"},
}


async def outcome(channel: Any, call: str) -> grpc.StatusCode:
    try:
        await CALLS[call](channel)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("token", sorted(ALLOWED))
async def test_each_permission_call_by_call(server: ServerProcess, pki: Pki, token: str) -> None:
    async with connect(server, pki, token) as channel:
        codes = {call: await outcome(channel, call) for call in CALLS}
    refused = {call for call, code in codes.items() if code == DENIED}
    assert refused == set(CALLS) - ALLOWED[token], codes
    # What is allowed gets its service's own answer (OK, NOT_FOUND, ...), never
    # an authentication error.
    assert grpc.StatusCode.UNAUTHENTICATED not in codes.values()


async def test_unknown_tokens_are_unauthenticated(server: ServerProcess, pki: Pki) -> None:
    stranger = issue("nobody listed", issue("another CA", None))
    for token in ("wrong", "read-tokenx", "read-toke", "CN=reapi client"):
        async with connect(server, pki, token) as channel:
            for call in CALLS:
                assert await outcome(channel, call) == grpc.StatusCode.UNAUTHENTICATED, (
                    token,
                    call,
                )
    # A certificate the CA did not sign does not get past TLS.
    async with connect(server, pki, "read-token", cert=stranger) as channel:
        assert await outcome(channel, "GetCapabilities") == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_stands_for_a_token(server: ServerProcess, pki: Pki) -> None:
    async with connect(server, pki, None) as channel:  # CN=reapi client: read
        codes = {call: await outcome(channel, call) for call in CALLS}
    assert {call for call, code in codes.items() if code == DENIED} == set(CALLS) - READS
    # Signed by the CA but not listed: no grant.
    unlisted = issue("reapi other client", pki.ca)
    async with connect(server, pki, None, cert=unlisted) as channel:
        assert await outcome(channel, "GetCapabilities") == grpc.StatusCode.UNAUTHENTICATED
    # A token, when given, decides alone: the certificate's read does not add up.
    async with connect(server, pki, "worker-token") as channel:
        assert await outcome(channel, "GetActionResult") == DENIED


async def test_a_planted_result_is_refused(server: ServerProcess, pki: Pki) -> None:
    target = SHA256.digest_of(b"an action someone will build").to_proto()
    plant = re_pb2.UpdateActionResultRequest(
        action_digest=target, action_result=re_pb2.ActionResult(exit_code=0)
    )
    lookup = re_pb2.GetActionResultRequest(action_digest=target)
    async with connect(server, pki, "read-token") as channel:
        cache = re_grpc.ActionCacheStub(channel)
        for token in ("read-token", "alice-token", "worker-token"):
            async with connect(server, pki, token) as planter:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await re_grpc.ActionCacheStub(planter).UpdateActionResult(plant)
                assert refused.value.code() == DENIED
                assert "UpdateActionResult needs" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await cache.GetActionResult(lookup)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # What CI (write) stores, developers (read) get.
        async with connect(server, pki, "write-token") as ci:
            await re_grpc.ActionCacheStub(ci).UpdateActionResult(plant)
        assert (await cache.GetActionResult(lookup)).exit_code == 0


async def test_only_a_worker_token_leases_actions(server: ServerProcess, pki: Pki) -> None:
    """A bare client token opening the worker stream is refused, and an action
    submitted meanwhile runs on the real worker, not on the intruder."""
    for token in ("alice-token", "admin-token", "write-token"):
        async with connect(server, pki, token) as channel:
            assert await outcome(channel, "Work") == DENIED
    async with connect(server, pki, "alice-token") as channel:
        action = await upload_action(channel, ["/bin/sh", "-c", "echo secret=$SECRET"],
                                     env={"SECRET": "hunter2", "PATH": "/bin"})  # fmt: skip
        _ops, response = await execute(channel, action, inline_stdout=True)
    assert response.result.stdout_raw == b"secret=hunter2\n"
    assert "local" in response.result.execution_metadata.worker


async def _last(call: Any) -> operations_pb2.Operation:
    """The last operation an Execute call sends (its first was read already)."""
    operation = None
    while (message := await call.read()) is not grpc.aio.EOF:
        operation = message
    assert operation is not None
    return operation


async def _running(channel: Any, seconds: int, salt: bytes = b"") -> tuple[Any, str]:
    """Executes `sleep seconds`; the call and its operation's name once it is known."""
    action = await upload_action(channel, ["/bin/sleep", str(seconds)], salt=salt)
    call = re_grpc.ExecutionStub(channel).Execute(
        re_pb2.ExecuteRequest(action_digest=action.to_proto())
    )
    first = await call.read()
    assert not first.done
    return call, first.name


async def test_operations_belong_to_their_caller(server: ServerProcess, pki: Pki) -> None:
    async with (
        connect(server, pki, "alice-token") as alice,
        connect(server, pki, "bob-token") as bob,
        connect(server, pki, "admin-token") as admin,
    ):
        call, name = await _running(alice, 3, salt=b"alice's")
        bob_ops = operations_pb2_grpc.OperationsStub(bob)
        for attempt in (
            bob_ops.GetOperation(operations_pb2.GetOperationRequest(name=name)),
            bob_ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name)),
            bob_ops.WaitOperation(operations_pb2.WaitOperationRequest(name=name)),
            _all(re_grpc.ExecutionStub(bob).WaitExecution(re_pb2.WaitExecutionRequest(name=name))),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await attempt
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await bob_ops.ListOperations(operations_pb2.ListOperationsRequest())
        assert name not in {operation.name for operation in listed.operations}
        for caller in (alice, admin):
            ops = operations_pb2_grpc.OperationsStub(caller)
            listed = await ops.ListOperations(operations_pb2.ListOperationsRequest())
            assert name in {operation.name for operation in listed.operations}
            assert (await ops.GetOperation(operations_pb2.GetOperationRequest(name=name))).name
        final = await _last(call)
        response = re_pb2.ExecuteResponse()
        final.response.Unpack(response)
        assert final.done and response.status.code == 0 and response.result.exit_code == 0

        # An admin cancels anyone's operation.
        call, name = await _running(alice, 30, salt=b"cancelled by admin")
        await operations_pb2_grpc.OperationsStub(admin).CancelOperation(
            operations_pb2.CancelOperationRequest(name=name)
        )
        final = await _last(call)
        final.response.Unpack(response)
        assert response.status.code == grpc.StatusCode.CANCELLED.value[0]


async def test_a_shared_run_outlives_one_owners_cancel(server: ServerProcess, pki: Pki) -> None:
    """Bob asking for the action Alice runs joins her operation; his cancel
    withdraws only his interest, and her build gets its result."""
    async with (
        connect(server, pki, "alice-token") as alice,
        connect(server, pki, "bob-token") as bob,
    ):
        alice_call, name = await _running(alice, 3, salt=b"shared")
        bob_call, bob_name = await _running(bob, 3, salt=b"shared")
        assert bob_name == name
        await operations_pb2_grpc.OperationsStub(bob).CancelOperation(
            operations_pb2.CancelOperationRequest(name=name)
        )
        final = await _last(alice_call)
        bob_call.cancel()
    response = re_pb2.ExecuteResponse()
    final.response.Unpack(response)
    assert stage(final) == re_pb2.ExecutionStage.COMPLETED
    assert response.status.code == 0 and response.result.exit_code == 0


async def test_instance_scoped_tokens(server: ServerProcess, pki: Pki) -> None:
    async with connect(server, pki, "team-token") as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="team-a"))
        byte_stream = bs_grpc.ByteStreamStub(channel)
        name = f"team-a/blobs/{BLOB_DIGEST.hash}/{len(BLOB)}"
        other = name.replace("team-a", "team-b")
        written = await byte_stream.Write(_upload_chunks(_upload_name("team-a")))
        assert written.committed_size == len(BLOB)
        await _all(byte_stream.Read(bytestream_pb2.ReadRequest(resource_name=name)))
        for attempt in (
            cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="team-b")),
            cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest()),
            _all(byte_stream.Read(bytestream_pb2.ReadRequest(resource_name=other))),
            byte_stream.Write(_upload_chunks(_upload_name("team-b"))),
            re_grpc.ActionCacheStub(channel).GetActionResult(
                re_pb2.GetActionResultRequest(instance_name="team-b", action_digest=ABSENT)
            ),
            operations_pb2_grpc.OperationsStub(channel).ListOperations(
                operations_pb2.ListOperationsRequest(name="team-b")
            ),
            _all(
                re_grpc.ExecutionStub(channel).Execute(
                    re_pb2.ExecuteRequest(instance_name="team-b", action_digest=ABSENT)
                )
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await attempt
            assert refused.value.code() == DENIED
            assert "'team-b'" in (refused.value.details() or "") or "''" in (
                refused.value.details() or ""
            )


def test_the_server_log_never_shows_a_token(server: ServerProcess) -> None:
    tokens = [line.split()[0] for line in TOKENS.splitlines() if line[0] not in '#"']
    assert len(tokens) == 7
    assert not [token for token in tokens if token in server.log()]


@pytest.mark.parametrize("bad", ["tok reed\n", "tok read write\n", "# only a comment\n"])
def test_a_bad_token_file_stops_the_server_with_one_line(tmp_path: Path, bad: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(bad)
    with pytest.raises(RuntimeError, match="server exited early") as failed:
        ServerProcess(tmp_path / "storage", "--auth-tokens", str(tokens))
    message = str(failed.value).splitlines()[1:]
    assert len([line for line in message if line.strip()]) == 1, message
    assert message[0].startswith("reapi: --auth-tokens")


async def test_a_server_serves_the_instance_names_it_is_given(tmp_path: Path) -> None:
    """`--instance` lists the names served: any other is INVALID_ARGUMENT, from
    Capabilities to uploads; without tokens, everything else is allowed."""
    server = ServerProcess(tmp_path / "storage", "--instance", "", "--instance", "team-a")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            capabilities = re_grpc.CapabilitiesStub(channel)
            for served in ("", "team-a"):
                request = re_pb2.GetCapabilitiesRequest(instance_name=served)
                assert (await capabilities.GetCapabilities(request)).cache_capabilities
            cas = re_grpc.ContentAddressableStorageStub(channel)
            byte_stream = bs_grpc.ByteStreamStub(channel)
            read = f"team-b/blobs/{BLOB_DIGEST.hash}/{len(BLOB)}"
            for attempt in (
                capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="team-b")),
                cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="team-b")),
                _all(byte_stream.Read(bytestream_pb2.ReadRequest(resource_name=read))),
                byte_stream.Write(_upload_chunks(_upload_name("team-b"))),
                operations_pb2_grpc.OperationsStub(channel).ListOperations(
                    operations_pb2.ListOperationsRequest(name="team-b")
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await attempt
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "instance name 'team-b' is not served here; served: '', 'team-a'" in (
                    refused.value.details() or ""
                )
            written = await byte_stream.Write(_upload_chunks(_upload_name("team-a")))
            assert written.committed_size == len(BLOB)
    finally:
        server.stop()
