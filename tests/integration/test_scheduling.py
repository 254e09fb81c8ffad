"""Scheduling with real worker processes: lost workers, operations, priorities."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2

from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.actions import execute, execution, stage, upload_action
from tests.helpers import REPO, ServerProcess, WorkerProcess


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[ServerProcess, list[WorkerProcess]]]:
    server = ServerProcess(tmp_path / "storage")
    workers = [WorkerProcess(server, f"w{n}", tmp_path / f"w{n}") for n in range(2)]
    yield server, workers
    for worker in workers:
        worker.stop()
    server.stop()


async def test_killed_worker_loses_its_lease_and_the_build_succeeds(
    two_workers: tuple[ServerProcess, list[WorkerProcess]],
) -> None:
    server, workers = two_workers
    async with grpc.aio.insecure_channel(server.address) as channel:
        action = await upload_action(channel, ["/bin/sh", "-c", "sleep 2; echo survived"])
        running = asyncio.create_task(execute(channel, action, inline_stdout=True))
        deadline = time.monotonic() + 30
        while not (victims := [w for w in workers if "running" in w.log()]):
            assert time.monotonic() < deadline, "no worker picked the action up"
            await asyncio.sleep(0.05)
        victims[0].stop(signal.SIGKILL)
        _ops, response = await running
    (survivor,) = [w for w in workers if w is not victims[0]]
    assert response.status.code == code_pb2.OK, response.status
    assert response.result.stdout_raw == b"survived\n"
    assert response.result.execution_metadata.worker == survivor.name
    assert f"worker {victims[0].name} lost" in server.log()


async def test_a_worker_started_after_one_was_killed_removes_its_slots(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "storage")
    workdir = tmp_path / "worker"
    killed = WorkerProcess(server, "killed", workdir)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            action = await upload_action(
                channel, ["/bin/sh", "-c", "echo x > out"], outputs=["out"]
            )
            assert (await execute(channel, action))[1].result.exit_code == 0
            killed.stop(signal.SIGKILL)
            left = [p for p in (workdir / "actions").iterdir() if p.is_dir()]
            assert len(left) == 1 and (left[0] / "root").is_dir()
            after = WorkerProcess(server, "after", workdir)
            try:
                action = await upload_action(channel, ["/bin/true"], salt=b"after")
                assert (await execute(channel, action))[1].result.exit_code == 0
                assert not left[0].exists()
                assert "left by a worker that stopped" in after.log()
            finally:
                after.stop()
    finally:
        killed.stop()
        server.stop()


@pytest.fixture
def one_worker(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "storage", workers=1)
    yield server
    server.stop()


async def test_operations_outlive_their_client(one_worker: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(one_worker.address) as channel:
        action = await upload_action(channel, ["/bin/sh", "-c", "sleep 1; echo later"])
        call = execution(channel).Execute(re_pb2.ExecuteRequest(action_digest=action.to_proto()))
        first = await anext(aiter(call))
        call.cancel()  # the client goes away
        operations = operations_pb2_grpc.OperationsStub(channel)
        current = await operations.GetOperation(operations_pb2.GetOperationRequest(name=first.name))
        assert not current.done
        listed = await operations.ListOperations(operations_pb2.ListOperationsRequest())
        assert first.name in [op.name for op in listed.operations]
        reattached = [
            op
            async for op in execution(channel).WaitExecution(
                re_pb2.WaitExecutionRequest(name=first.name)
            )
        ]
        assert reattached[-1].done and stage(reattached[-1]) == re_pb2.ExecutionStage.COMPLETED
        response = re_pb2.ExecuteResponse()
        reattached[-1].response.Unpack(response)
        assert response.result.exit_code == 0


async def test_operations_are_listed_a_page_at_a_time(one_worker: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(one_worker.address) as channel:
        names = []
        for n in range(5):
            action = await upload_action(channel, ["/bin/true"], salt=b"%d" % n)
            names.append((await execute(channel, action))[0][-1].name)
        operations = operations_pb2_grpc.OperationsStub(channel)
        pages, token = [], ""
        while True:
            page = await operations.ListOperations(
                operations_pb2.ListOperationsRequest(page_size=2, page_token=token)
            )
            pages.append([op.name for op in page.operations])
            token = page.next_page_token
            if not token:
                break
        assert pages == [names[0:2], names[2:4], names[4:]]  # oldest first, each once
        whole = await operations.ListOperations(operations_pb2.ListOperationsRequest())
        assert [op.name for op in whole.operations] == names and not whole.next_page_token
        for wrong in (
            operations_pb2.ListOperationsRequest(page_token="not a token"),
            operations_pb2.ListOperationsRequest(filter="done=true"),
            operations_pb2.ListOperationsRequest(filter="stage = FINISHED"),
            operations_pb2.ListOperationsRequest(filter="stage QUEUED"),
            operations_pb2.ListOperationsRequest(page_size=-1),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await operations.ListOperations(wrong)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_operations_are_listed_by_a_filter(one_worker: ServerProcess) -> None:
    """The filter `bgd operation list --filter` sends (BuildGrid's language)."""
    async with grpc.aio.insecure_channel(one_worker.address) as channel:
        done = await upload_action(channel, ["/bin/true"], salt=b"done")
        finished = (await execute(channel, done))[0][-1].name
        slow = await upload_action(channel, ["/bin/sleep", "5"], salt=b"slow")
        call = execution(channel).Execute(re_pb2.ExecuteRequest(action_digest=slow.to_proto()))
        running = (await anext(aiter(call))).name
        operations = operations_pb2_grpc.OperationsStub(channel)

        async def listed(text: str) -> set[str]:
            request = operations_pb2.ListOperationsRequest(filter=text)
            return {op.name for op in (await operations.ListOperations(request)).operations}

        assert await listed("stage = COMPLETED") == {finished}
        assert await listed("stage != completed") == {running}
        assert await listed("stage < COMPLETED") == {running}
        assert await listed("stage >= QUEUED") == {running, finished}
        assert await listed(f"stage = COMPLETED & name = {finished}") == {finished}
        assert await listed(f"stage = EXECUTING & name = {finished}") == set()
        assert await listed(f"action_digest = {slow.hash}/{slow.size}") == {running}
        assert await listed("  ") == {running, finished}
        call.cancel()


async def test_cancel_and_wait(one_worker: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(one_worker.address) as channel:
        action = await upload_action(channel, ["/bin/sleep", "20"])
        call = execution(channel).Execute(re_pb2.ExecuteRequest(action_digest=action.to_proto()))
        name = (await anext(aiter(call))).name
        operations = operations_pb2_grpc.OperationsStub(channel)
        waited = await operations.WaitOperation(
            operations_pb2.WaitOperationRequest(
                name=name, timeout=duration_pb2.Duration(nanos=200_000_000)
            )
        )
        assert not waited.done
        await operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
        final = [op async for op in call][-1]
        response = re_pb2.ExecuteResponse()
        final.response.Unpack(response)
        assert final.done and response.status.code == code_pb2.CANCELLED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await operations.GetOperation(operations_pb2.GetOperationRequest(name="operations/x"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        # The worker was told to stop, and is free for the next action.
        quick = await upload_action(channel, ["/bin/true"])
        _ops, after = await asyncio.wait_for(execute(channel, quick), 15)
        assert after.status.code == code_pb2.OK


async def test_lower_priority_value_runs_first(one_worker: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(one_worker.address) as channel:
        blocker = await upload_action(channel, ["/bin/sleep", "1"])
        late = await upload_action(channel, ["/bin/true"], salt=b"late")
        urgent = await upload_action(channel, ["/bin/true"], salt=b"urgent")
        first = asyncio.create_task(execute(channel, blocker))
        await asyncio.sleep(0.5)  # the blocker holds the only slot
        results = await asyncio.gather(
            execute(channel, late, execution_policy=re_pb2.ExecutionPolicy(priority=10)),
            execute(channel, urgent, execution_policy=re_pb2.ExecutionPolicy(priority=-10)),
        )
        await first
    (_l, late_response), (_u, urgent_response) = results
    late_start = late_response.result.execution_metadata.execution_start_timestamp
    urgent_start = urgent_response.result.execution_metadata.execution_start_timestamp
    assert urgent_start.ToNanoseconds() < late_start.ToNanoseconds()


async def test_silent_worker_loses_its_lease(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "storage", "--heartbeat-timeout", "3")
    workers = [WorkerProcess(server, f"w{n}", tmp_path / f"w{n}") for n in range(2)]
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            action = await upload_action(channel, ["/bin/sh", "-c", "sleep 1; echo done"])
            running = asyncio.create_task(execute(channel, action))
            deadline = time.monotonic() + 30
            while not (frozen := [w for w in workers if "running" in w.log()]):
                assert time.monotonic() < deadline, "no worker picked the action up"
                await asyncio.sleep(0.05)
            frozen[0].process.send_signal(signal.SIGSTOP)  # alive, but silent
            _ops, response = await asyncio.wait_for(running, 60)
        assert response.status.code == code_pb2.OK, response.status
        assert response.result.execution_metadata.worker != frozen[0].name
        assert "no heartbeat for 3s" in server.log()
        frozen[0].process.send_signal(signal.SIGCONT)
    finally:
        for worker in workers:
            worker.stop(signal.SIGKILL)
        server.stop()


async def test_sandbox_none_runs_and_says_so(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "storage", "--sandbox", "none", workers=1)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            action = await upload_action(channel, ["/usr/bin/env"], env={"ONLY": "this"})
            _ops, response = await execute(channel, action, inline_stdout=True)
        # The Command's environment, and the worker's default PATH it does not set.
        assert sorted(response.result.stdout_raw.splitlines()) == [
            b"ONLY=this",
            b"PATH=/usr/local/bin:/usr/bin:/bin",
        ]
    finally:
        server.stop()
    assert "sandbox 'none': actions run unconfined" in server.log()


async def test_worker_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "storage")
    worker = WorkerProcess(first, "steady", tmp_path / "steady")
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            action = await upload_action(channel, ["/bin/echo", "one"])
            _ops, response = await asyncio.wait_for(execute(channel, action), 30)
            assert response.status.code == code_pb2.OK
        assert first.stop() == 0
        second = ServerProcess(tmp_path / "storage", "--listen", first.address)
        try:
            async with grpc.aio.insecure_channel(second.address) as channel:
                action = await upload_action(channel, ["/bin/echo", "two"])
                _ops, response = await asyncio.wait_for(execute(channel, action), 60)
            assert response.status.code == code_pb2.OK
            assert worker.process.poll() is None, worker.log()
        finally:
            second.stop()
    finally:
        worker.stop()


async def test_a_worker_moves_to_its_next_server_when_one_dies(tmp_path: Path) -> None:
    """`--server A --server B`: A killed, the worker connects to B at once
    and runs B's actions; when B dies too, back to A (started again)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = ServerProcess(tmp_path / "a" / "storage")
    second = ServerProcess(tmp_path / "b" / "storage")
    worker = WorkerProcess(
        first, "roams", tmp_path / "roams", extra=["--server", f"grpc://{second.address}"]
    )
    try:
        worker.wait_connected()
        for server, word in ((first, "one"), (second, "two")):
            if server is second:
                first.kill()
            async with grpc.aio.insecure_channel(server.address) as channel:
                action = await upload_action(channel, ["/bin/echo", word])
                _ops, response = await asyncio.wait_for(execute(channel, action), 30)
            assert response.status.code == code_pb2.OK, response.status
            assert response.result.execution_metadata.worker == "roams"
        assert "worker roams connected (" in second.log()
        second.kill()
        again = ServerProcess(tmp_path / "a" / "storage", "--listen", first.address)
        try:
            async with grpc.aio.insecure_channel(again.address) as channel:
                action = await upload_action(channel, ["/bin/echo", "three"])
                _ops, response = await asyncio.wait_for(execute(channel, action), 60)
            assert response.status.code == code_pb2.OK, response.status
            assert worker.process.poll() is None, worker.log()
        finally:
            again.stop()
    finally:
        worker.stop()
        for server in (first, second):
            if server.process.poll() is None:  # the test failed before killing it
                server.stop()


def test_local_workers_die_with_their_server(tmp_path: Path, reapi_home: Path) -> None:
    server = ServerProcess(tmp_path / "storage", workers=1, home=reapi_home)
    workdir = str(reapi_home / "worker")

    def local_workers() -> list[str]:
        found = subprocess.run(
            ["pgrep", "-f", f"reapi worker .*{workdir}"], capture_output=True, text=True
        ).stdout
        return found.split()

    deadline = time.monotonic() + 20
    while not local_workers():
        assert time.monotonic() < deadline, "the local worker never started"
        time.sleep(0.1)
    server.kill()  # no chance for the server to stop its workers
    deadline = time.monotonic() + 20
    while local_workers():
        assert time.monotonic() < deadline, "the orphaned local worker kept running"
        time.sleep(0.2)


async def test_instance_names_keep_results_and_operations_apart(one_worker: ServerProcess) -> None:
    """Two teams on one server: each instance name has its own action cache and
    its own operations; the CAS (content-addressed) is shared."""
    async with grpc.aio.insecure_channel(one_worker.address) as channel:
        action = await upload_action(channel, ["/bin/sh", "-c", "echo ran"], salt=b"teams")
        first_a, response = await execute(channel, action, instance_name="team-a")
        assert not response.cached_result and response.result.exit_code == 0
        _ops, again_a = await execute(channel, action, instance_name="team-a")
        assert again_a.cached_result
        first_b, response_b = await execute(channel, action, instance_name="team-b")
        assert not response_b.cached_result, "team-b was served team-a's result"
        _ops, default = await execute(channel, action)
        assert not default.cached_result

        cache = re_grpc.ActionCacheStub(channel)
        lookup = re_pb2.GetActionResultRequest(action_digest=action.to_proto())
        lookup.instance_name = "team-c"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await cache.GetActionResult(lookup)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        lookup.instance_name = "team-a"
        assert (await cache.GetActionResult(lookup)).exit_code == 0

        operations = operations_pb2_grpc.OperationsStub(channel)

        async def listed(instance: str) -> set[str]:
            request = operations_pb2.ListOperationsRequest(name=instance)
            return {op.name for op in (await operations.ListOperations(request)).operations}

        assert first_a[-1].name in await listed("team-a")
        assert first_a[-1].name not in await listed("team-b") | await listed("")
        assert first_b[-1].name in await listed("team-b")


async def test_workers_supply_environment_the_command_does_not_set(tmp_path: Path) -> None:
    """`reapi worker --env`: variables an action gets where its Command sets none
    of that name; a sensible PATH by default; the Command's own values win."""
    server = ServerProcess(tmp_path / "storage")
    worker = WorkerProcess(server, "env", tmp_path / "env", extra=["--env", "TEAM=blue"])
    script = "echo PATH=$PATH TEAM=$TEAM; ls /bin/sh >/dev/null && echo found"
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            bare = await upload_action(channel, ["sh", "-c", script], env={})
            _ops, response = await execute(channel, bare, inline_stdout=True)
            assert response.result.stdout_raw == (
                b"PATH=/usr/local/bin:/usr/bin:/bin TEAM=blue\nfound\n"
            ), response
            own = await upload_action(
                channel, ["sh", "-c", script], env={"PATH": "/bin", "TEAM": "red"}
            )
            _ops, response = await execute(channel, own, inline_stdout=True)
            assert response.result.stdout_raw == b"PATH=/bin TEAM=red\nfound\n", response
    finally:
        worker.stop()
        server.stop()
    bad = subprocess.run(
        [sys.executable, "-m", "reapi", "worker", "--server", "grpc://127.0.0.1:1", "--env", "=x"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "--env '=x': expected KEY=VALUE" in bad.stderr, bad.stderr
