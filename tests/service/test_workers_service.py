"""The Workers service's GetProvided and the Hello it is built from: what
every connected worker provides (reapi/conventions.py), against a real
in-process server, with hostile Hellos."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

from reapi.conventions import PROVIDED_DIRS
from reapi.protos import worker_pb2
from reapi.protos import worker_pb2_grpc as worker_grpc
from tests.helpers import REPO


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
