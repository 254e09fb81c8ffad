"""`reapi serve --redis`: frontends that share the CAS and the action cache
through a real Redis (standalone and Cluster), as separate processes; and what
a client sees when Redis is unreachable at start or lost while serving."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cas.gc import GRACE
from cas.remote import RemoteStore
from reapi.digests import DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests import redis_servers
from tests.helpers import ServerProcess, expect_status
from tests.integration.test_cas_lifecycle import upload
from tests.integration.test_server_process import one_line_error, run_reapi
from tests.redis.test_redis_lifecycle import age, cas_json, stored
from tests.redis_servers import RedisDeployment

SHA256 = DigestFunction.SHA256


@pytest.fixture
def frontends(tmp_path: Path, redis_flushed: RedisDeployment) -> Iterator[list[ServerProcess]]:
    """Two `reapi serve` processes on the same Redis."""
    started = []
    try:
        for name in ("a", "b"):
            started.append(ServerProcess(tmp_path / name, redis=redis_flushed.urls))
        yield started
    finally:
        for server in started:
            assert server.stop() == 0, server.log()


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
    """UNAVAILABLE while Redis is down (FindMissingBlobs never guesses), and
    service back without a restart once Redis is; password and TOML config too."""
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
                node.kill()
                await expect_status(
                    cas.FindMissingBlobs(request), grpc.StatusCode.UNAVAILABLE, "Redis unreachable"
                )
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
