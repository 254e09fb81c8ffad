"""`reapi serve --redis`: frontends that share the CAS and the action cache
through a real Redis (standalone and Cluster), as separate processes; and what
a client sees when Redis is unreachable at start or lost while serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from cas.gc import GRACE
from cas.remote import RemoteStore
from reapi.core.digests import DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests import redis_servers
from tests.actions import execute, execution, upload_action
from tests.helpers import ServerProcess, WorkerProcess, expect_status
from tests.integration.test_cas_lifecycle import upload
from tests.integration.test_server_process import one_line_error, run_reapi
from tests.redis.test_redis_lifecycle import age, cas_json, stored
from tests.redis_servers import RedisDeployment

SHA256 = DigestFunction.SHA256


def operations_stub(channel: grpc.aio.Channel) -> operations_pb2_grpc.OperationsStub:
    return operations_pb2_grpc.OperationsStub(channel)


@pytest.fixture
def frontends(tmp_path: Path, redis_flushed: RedisDeployment) -> Iterator[list[ServerProcess]]:
    """Frontends a and b on the shared Redis, without local workers; each that
    a test did not kill must stop cleanly."""
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            started.append(ServerProcess(tmp_path / name, redis=redis_flushed.urls))
        yield started
    finally:
        for server in started:
            assert server.stop() in (0, -signal.SIGKILL), server.log()


async def test_what_one_frontend_stores_the_other_serves(frontends: list[ServerProcess]) -> None:
    a, b = frontends
    small = [os.urandom(n) for n in (1, 100, 5000)]
    large = os.urandom(5 * 1024 * 1024 + 3)
    blobs = {SHA256.digest_of(data): data for data in [*small, large]}
    action = SHA256.digest_of(b"an action")
    stdout = SHA256.digest_of(small[0])
    result = re_pb2.ActionResult(exit_code=0, stdout_digest=stdout.to_proto())
    async with grpc.aio.insecure_channel(a.address) as channel:
        store = RemoteStore(channel)
        assert set(await store.find_missing(list(blobs))) == set(blobs)
        await store.put_many(list(blobs.items()))
        await re_grpc.ActionCacheStub(channel).UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action.to_proto(), action_result=result)
        )
    async with grpc.aio.insecure_channel(b.address) as channel:
        store = RemoteStore(channel)
        assert await store.find_missing(list(blobs)) == []
        assert await store.get_many(list(blobs)) == blobs  # the large one by ByteStream
        found = await re_grpc.ActionCacheStub(channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=action.to_proto(), inline_stdout=True)
        )
        assert found.stdout_raw == small[0] and found.exit_code == 0
    assert "Redis redis://" in a.log()


def test_unreachable_redis_at_start_is_one_line(tmp_path: Path) -> None:
    (port,) = redis_servers.free_ports(1)
    result = run_reapi("serve", "--listen", "127.0.0.1:0", "--redis", f"redis://127.0.0.1:{port}")
    assert f"cannot reach Redis at redis://127.0.0.1:{port}" in one_line_error(result)


def test_bad_redis_options_are_one_line(tmp_path: Path) -> None:
    assert "expected redis://" in one_line_error(
        run_reapi("serve", "--listen", "127.0.0.1:0", "--redis", "http://127.0.0.1:1")
    )
    both = run_reapi("serve", "--redis", "redis://127.0.0.1:1", "--storage", str(tmp_path))
    assert "exclude each other" in one_line_error(both)
    config = tmp_path / "reapi.toml"
    config.write_text("redis = 5\n")
    assert "redis: expected a URL" in one_line_error(run_reapi("serve", "--config", str(config)))


def test_a_redis_that_evicts_is_refused(tmp_path: Path) -> None:
    with redis_servers.standalone(tmp_path, ("--maxmemory-policy", "allkeys-lru")) as redis:
        result = run_reapi("serve", "--listen", "127.0.0.1:0", "--redis", redis.urls[0])
    assert "maxmemory-policy allkeys-lru" in one_line_error(result)


async def test_redis_lost_while_serving_then_back(tmp_path: Path) -> None:
    """UNAVAILABLE while Redis is down (FindMissingBlobs never guesses; reads of
    what the frontend's read tier holds go on), and service back without a
    restart once Redis is; password and TOML config too."""
    with redis_servers.standalone(tmp_path, ("--requirepass", "s3cret")) as redis:
        node = redis.nodes[0]
        config = tmp_path / "reapi.toml"
        config.write_text(f'redis = ["redis://:s3cret@127.0.0.1:{node.port}"]\n')
        server = ServerProcess(tmp_path / "frontend", "--config", str(config), redis=())
        try:
            assert "s3cret" not in server.log()
            digest = SHA256.digest_of(b"blob")
            request = re_pb2.FindMissingBlobsRequest(blob_digests=[digest.to_proto()])
            async with grpc.aio.insecure_channel(server.address) as channel:
                cas = re_grpc.ContentAddressableStorageStub(channel)
                await RemoteStore(channel).put_many([(digest, b"blob")])
                assert not (await cas.FindMissingBlobs(request)).missing_blob_digests
                for _ in range(2):  # read twice: this frontend keeps a copy
                    assert await RemoteStore(channel).get_many([digest]) == {digest: b"blob"}
                node.kill()
                await expect_status(
                    cas.FindMissingBlobs(request), grpc.StatusCode.UNAVAILABLE, "Redis unreachable"
                )
                # What this frontend read is in its read tier: still served.
                assert await RemoteStore(channel).get_many([digest]) == {digest: b"blob"}
                redis.restart(node)
                deadline = time.monotonic() + 30
                while True:
                    try:
                        answer = await cas.FindMissingBlobs(request)
                        break
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.UNAVAILABLE
                        assert time.monotonic() < deadline, "no service after Redis came back"
                # Persistence is off in these tests: the restarted Redis is empty.
                assert list(answer.missing_blob_digests) == [digest.to_proto()]
        finally:
            assert server.stop() == 0, server.log()


def test_background_gc_keeps_redis_under_max_size(
    tmp_path: Path, redis_flushed: RedisDeployment
) -> None:
    """`serve --redis --max-size`: blobs past the grace period are evicted down to
    90% of the size; those inside it stay."""
    server = ServerProcess(
        tmp_path / "frontend", "--max-size", "100K", "--gc-interval", "0.5",
        redis=redis_flushed.urls,
    )  # fmt: skip
    try:
        old = upload(server.address, [os.urandom(10_000) for _ in range(30)])
        age(redis_flushed, old, 2 * GRACE)
        recent = upload(server.address, [os.urandom(10_000) for _ in range(3)])
        deadline = time.monotonic() + 30
        while cas_json(redis_flushed)["bytes"] > 90 * 1024:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.5)
        assert stored(redis_flushed, recent) == recent
        assert "background gc: evicted" in server.log()
    finally:
        assert server.stop() == 0, server.log()


async def test_one_queue_and_operations_seen_from_every_frontend(
    tmp_path: Path, frontends: list[ServerProcess]
) -> None:
    """An action submitted on a runs on the worker connected to b; b answers
    WaitExecution and GetOperation for a's operation; the same action sent to
    both at once runs once."""
    a, b = frontends
    worker = WorkerProcess(b, "on-b", tmp_path / "worker-b", extra=["--sandbox", "none"])
    try:
        worker.wait_connected()
        time.sleep(2.5)  # a learns of b's worker (the registry is read every 2 s)
        async with (
            grpc.aio.insecure_channel(a.address) as on_a,
            grpc.aio.insecure_channel(b.address) as on_b,
        ):
            action = await upload_action(on_a, ["sh", "-c", "echo hi"])
            operations, response = await execute(on_a, action)
            assert response.result.exit_code == 0 and response.status.code == 0
            name = operations[-1].name
            waited = [op async for op in execution(on_b).WaitExecution(
                re_pb2.WaitExecutionRequest(name=name))]  # fmt: skip
            assert waited[-1].done and waited[-1].response == operations[-1].response
            got = await operations_stub(on_b).GetOperation(
                operations_pb2.GetOperationRequest(name=name)
            )
            assert got.done
            once = await upload_action(on_a, ["sh", "-c", "sleep 1; echo once"], salt=b"1")
            both = await asyncio.gather(execute(on_a, once), execute(on_b, once))
            assert both[0][0][-1].name == both[1][0][-1].name, "one operation, one run"
        assert worker.log().count("running ") == 2, worker.log()
    finally:
        worker.stop()


async def test_a_frontend_killed_mid_action_costs_only_a_retry(
    tmp_path: Path, frontends: list[ServerProcess], redis_flushed: RedisDeployment
) -> None:
    """The worker is on a, the client's Execute stream on a. kill -9 a: the
    worker moves to b, the lease expires and b queues the action again; the
    client asks b (WaitExecution) and gets the result."""
    a, b = frontends
    worker = WorkerProcess(
        a, "w", tmp_path / "worker", extra=["--sandbox", "none", "--server", f"grpc://{b.address}"]
    )
    try:
        worker.wait_connected()
        async with grpc.aio.insecure_channel(a.address) as on_a:
            action = await upload_action(
                on_a, ["sh", "-c", "sleep 2; echo finished"], outputs=[], salt=b"kill"
            )
            call = execution(on_a).Execute(re_pb2.ExecuteRequest(action_digest=action.to_proto()))
            first = await anext(aiter(call))
            deadline = time.monotonic() + 20
            while "running " not in worker.log():
                assert time.monotonic() < deadline, worker.log()
                await asyncio.sleep(0.05)
            a.kill()
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in call:
                    pass
        async with grpc.aio.insecure_channel(b.address) as on_b:
            waited = [op async for op in execution(on_b).WaitExecution(
                re_pb2.WaitExecutionRequest(name=first.name))]  # fmt: skip
        response = re_pb2.ExecuteResponse()
        waited[-1].response.Unpack(response)
        assert response.status.code == 0 and response.result.exit_code == 0
        assert worker.log().count("running ") == 2, "ran again after the lease expired"
        # The killed frontend's read tier is left behind; the next frontend to
        # start with that REAPI_HOME removes it.
        left = tmp_path / "home" / f"read-tier-{a.process.pid}"
        assert left.is_dir()
        c = ServerProcess(tmp_path / "c", redis=redis_flushed.urls)
        assert not left.exists() and (tmp_path / "home" / f"read-tier-{c.process.pid}").is_dir()
        assert c.stop() == 0
        assert not (tmp_path / "home" / f"read-tier-{c.process.pid}").exists()
    finally:
        worker.stop()


async def test_a_worker_killed_mid_action_its_action_runs_on_another(
    tmp_path: Path, frontends: list[ServerProcess]
) -> None:
    """Two workers, one on each frontend; the one running the action is killed
    (kill -9): its frontend puts the action back in the shared queue and the
    other worker, on the other frontend, runs it."""
    a, b = frontends
    workers = [
        WorkerProcess(server, f"w{n}", tmp_path / f"w{n}", extra=["--sandbox", "none"])
        for n, server in enumerate((a, b))
    ]
    try:
        for worker in workers:
            worker.wait_connected()
        async with grpc.aio.insecure_channel(a.address) as channel:
            action = await upload_action(channel, ["sh", "-c", "sleep 1; echo done"], salt=b"w")
            running = asyncio.create_task(execute(channel, action))
            deadline = time.monotonic() + 20
            while not (busy := [w for w in workers if "running " in w.log()]):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            busy[0].stop(signal.SIGKILL)
            _, response = await asyncio.wait_for(running, 60)
        assert response.status.code == 0 and response.result.exit_code == 0
        (other,) = [w for w in workers if w is not busy[0]]
        assert "running " in other.log()
    finally:
        for worker in workers:
            worker.stop()
