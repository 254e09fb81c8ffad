"""The Workers service's GetProvided and the Hello it is built from: what
every connected worker provides (reapi/core/conventions.py), against a real
in-process server, with hostile Hellos."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2

from cas.action_cache import MemoryActionResultStore
from cas.memory import MemoryStore
from reapi.core.conventions import PROVIDED_DIRS
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import ReapiError, Unavailable
from reapi.frontend.server import Backends, Server, ServerConfig
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import worker_pb2
from reapi.protos import worker_pb2_grpc as worker_grpc
from tests.actions import execute, upload_action
from tests.helpers import REPO

SHA256 = DigestFunction.SHA256


async def provided(channel: grpc.aio.Channel) -> list[str]:
    stub = worker_grpc.WorkersStub(channel)
    answer = await stub.GetProvided(worker_pb2.GetProvidedRequest())
    return list(answer.directories)


async def connect(channel: grpc.aio.Channel, name: str, directories: list[str]) -> object:
    """A worker's Work stream, once the server has taken its Hello."""
    stub = worker_grpc.WorkersStub(channel)
    hello = worker_pb2.Hello(name=name, slots=1, provided_directories=directories)
    call = stub.Work()
    await call.write(worker_pb2.WorkerMessage(hello=hello))
    return call


async def wait_for(channel: grpc.aio.Channel, expected: list[str]) -> None:
    for _ in range(200):
        if await provided(channel) == expected:
            return
        await asyncio.sleep(0.02)
    assert await provided(channel) == expected


async def test_what_every_connected_worker_provides(channel: grpc.aio.Channel) -> None:
    assert await provided(channel) == list(PROVIDED_DIRS)  # no worker yet
    first = await connect(channel, "toolchain", [*PROVIDED_DIRS, "/opt/tc"])
    await wait_for(channel, sorted([*PROVIDED_DIRS, "/opt/tc"]))
    second = await connect(channel, "all-of-opt", [*PROVIDED_DIRS, "/opt"])
    await wait_for(channel, sorted([*PROVIDED_DIRS, "/opt/tc"]))  # both have /opt/tc
    third = await connect(channel, "bare", ["/usr"])
    await wait_for(channel, ["/usr"])
    for call in (first, second, third):
        call.cancel()  # type: ignore[attr-defined]
    await wait_for(channel, list(PROVIDED_DIRS))


@pytest.mark.parametrize("directory", ["relative/dir", "/", "/tmp", "/build/x", "/proc"])
async def test_a_hello_with_a_directory_no_worker_can_provide_is_refused(
    channel: grpc.aio.Channel, directory: str
) -> None:
    call = await connect(channel, "liar", [*PROVIDED_DIRS, directory])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()  # type: ignore[attr-defined]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be provided" in (raised.value.details() or "") or "absolute" in (
        raised.value.details() or ""
    )
    assert await provided(channel) == list(PROVIDED_DIRS)


@pytest.mark.parametrize(
    ("directory", "message"),
    [
        ("/", "cannot be provided"),
        ("/tmp/x", "cannot be provided"),
        ("relative", "must be an absolute path"),
        ("/nonexistent-reapi-dir", "not a directory"),
    ],
)
def test_worker_provide_option_errors(directory: str, message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "reapi", "worker", "--server", "grpc://127.0.0.1:1",
         "--provide", directory],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


class UnreachableOnWrite(MemoryStore):
    """A store whose writes fail as a Redis failing over makes them fail."""

    failing = False

    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        if self.failing:
            raise Unavailable("Redis unreachable: storing blobs")
        return await super().put_many(blobs)


async def test_outputs_that_cannot_be_stored_fail_the_action_not_the_worker(
    tmp_path: Path,
) -> None:
    """The store fails while a worker reports a result with output blobs: the
    client gets UNAVAILABLE (it retries that), the worker's stream goes on and
    takes the next action."""
    store = UnreachableOnWrite()
    config = ServerConfig(listen="127.0.0.1:0", storage=tmp_path / "unused")
    server = Server(config, Backends(store, MemoryActionResultStore()))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            work = await connect(channel, "fake", list(PROVIDED_DIRS))
            results = []
            for salt in (b"first", b"second"):
                action = await upload_action(channel, ["true"], salt=salt)
                running = asyncio.create_task(execute(channel, action))
                message = await work.read()  # type: ignore[attr-defined]
                store.failing = salt == b"first"
                output = b"object code"
                stdout = re_pb2.Digest(hash=SHA256.hex_of(output), size_bytes=len(output))
                response = re_pb2.ExecuteResponse(result=re_pb2.ActionResult(stdout_digest=stdout))
                finished = worker_pb2.Finished(
                    lease_id=message.assign.lease_id, response=response, output_blobs=[output]
                )
                await work.write(worker_pb2.WorkerMessage(finished=finished))  # type: ignore[attr-defined]
                results.append((await asyncio.wait_for(running, 30))[1])
                store.failing = False
            assert results[0].status.code == code_pb2.UNAVAILABLE
            assert "storing the outputs failed" in results[0].status.message
            assert results[1].status.code == code_pb2.OK
            work.cancel()  # type: ignore[attr-defined]
    finally:
        await server.stop(grace=1)
