"""Remote execution end to end: the real server, real worker processes, bubblewrap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from reapi.protos import remote_execution_pb2 as re_pb2
from tests.actions import SHA256, execute, execution, read_blob, stage, upload_action
from tests.helpers import ServerProcess

QUEUED, EXECUTING, COMPLETED = (
    re_pb2.ExecutionStage.QUEUED,
    re_pb2.ExecutionStage.EXECUTING,
    re_pb2.ExecutionStage.COMPLETED,
)


@pytest.fixture
def exec_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "storage", workers=1)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
async def channel(exec_server: ServerProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(exec_server.address) as chan:
        yield chan


async def test_runs_then_serves_from_cache(channel: grpc.aio.Channel) -> None:
    action = await upload_action(
        channel,
        ["/bin/sh", "-c", "mkdir -p out && tr a-z A-Z < in.txt > out/up.txt; echo done"],
        files={"in.txt": b"hello\n"},
        outputs=["out/up.txt"],
    )
    operations, response = await execute(channel, action)
    stages = [stage(op) for op in operations]
    assert stages[-1] == COMPLETED and EXECUTING in stages, stages
    assert [op.done for op in operations].count(True) == 1
    assert response.status.code == code_pb2.OK and not response.cached_result
    result = response.result
    assert result.exit_code == 0
    assert await read_blob(channel, result.stdout_digest) == b"done\n"
    (output,) = result.output_files
    assert output.path == "out/up.txt"
    assert await read_blob(channel, output.digest) == b"HELLO\n"
    metadata = result.execution_metadata
    assert metadata.worker and metadata.execution_start_timestamp.seconds > 0
    assert metadata.output_upload_completed_timestamp.ToNanoseconds() >= (
        metadata.execution_completed_timestamp.ToNanoseconds()
    )
    _ops, again = await execute(channel, action, inline_stdout=True)
    assert again.cached_result and again.result.stdout_raw == b"done\n"


async def test_failures_are_not_cached(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/bin/sh", "-c", "echo oops >&2; exit 3"])
    _ops, first = await execute(channel, action, inline_stderr=True)
    assert first.result.exit_code == 3 and first.result.stderr_raw == b"oops\n"
    _ops, second = await execute(channel, action)
    assert not second.cached_result


async def test_missing_inputs_are_listed(channel: grpc.aio.Channel) -> None:
    ghost = SHA256.digest_of(b"never uploaded action")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await execute(channel, ghost)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = status_pb2.Status.FromString(
        dict(raised.value.trailing_metadata())["grpc-status-details-bin"]
    )
    failure = error_details_pb2.PreconditionFailure()
    status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [
        ("MISSING", f"blobs/{ghost.hash}/{ghost.size}")
    ]


async def test_identical_actions_run_once(channel: grpc.aio.Channel) -> None:
    action = await upload_action(
        channel, ["/bin/sh", "-c", "sleep 1; cat /proc/sys/kernel/random/uuid"]
    )
    results = await asyncio.gather(*(execute(channel, action) for _ in range(3)))
    names = {ops[-1].name for ops, _ in results}
    stdouts = {await read_blob(channel, r.result.stdout_digest) for _, r in results}
    assert len(names) == 1 and len(stdouts) == 1, (names, stdouts)


async def test_do_not_cache_is_never_merged_or_cached(channel: grpc.aio.Channel) -> None:
    action = await upload_action(
        channel, ["/bin/sh", "-c", "cat /proc/sys/kernel/random/uuid"], do_not_cache=True
    )
    results = await asyncio.gather(*(execute(channel, action) for _ in range(2)))
    assert len({ops[-1].name for ops, _ in results}) == 2
    _ops, again = await execute(channel, action)
    assert not again.cached_result


async def test_timeout_kills_the_action(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/bin/sleep", "30"], timeout=1)
    _ops, response = await execute(channel, action)
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED


async def test_unmatchable_platform_fails_fast(channel: grpc.aio.Channel) -> None:
    warmup = await upload_action(channel, ["/bin/true"])
    await execute(channel, warmup)  # a worker is connected now
    action = await upload_action(channel, ["/bin/true"], platform={"gpu": "a100"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await execute(channel, action)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no worker matches" in (raised.value.details() or "")


async def test_wait_execution_of_unknown_operation(channel: grpc.aio.Channel) -> None:
    call = execution(channel).WaitExecution(re_pb2.WaitExecutionRequest(name="operations/nope"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [op async for op in call]
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
