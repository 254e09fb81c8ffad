"""`reapi cas gc | stats | verify --redis` against real redis-servers: least
recently used first, never inside the grace period, one gc at a time, corrupt
blobs found and repaired, and a real make build through reapi-cc against a
`reapi serve --redis` frontend while gc runs in a loop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cas.gc import GRACE
from cas.redis_lifecycle import GC_LOCK, GcRunning, collect_redis, stats_redis
from cas.redis_store import CHUNK, RedisActionResultStore, RedisStore, atime_key, blob_key
from cas.store import put_blob
from reapi.core.digests import Digest, DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2
from tests.helpers import ServerProcess
from tests.integration.test_cas_lifecycle import upload
from tests.integration.test_server_process import one_line_error, run_reapi
from tests.redis_servers import RedisDeployment, client_of
from tests.shim.test_real_projects import (
    debian_source,
    objects,
    run,
    shim_env_for,
    stats,
    stop_agents,
)

SHA256 = DigestFunction.SHA256
KIB = 1024


def age(deployment: RedisDeployment, digests: list[Digest], seconds_ago: float) -> None:
    """Make the blobs last used `seconds_ago`."""
    with deployment.client() as client:
        for digest in digests:
            member = blob_key(digest).split(":", 2)[2]
            client.zadd(atime_key(digest.hash[:2]), {member: time.time() - seconds_ago})


def age_everything(deployment: RedisDeployment, seconds_ago: float) -> None:
    with deployment.client() as client:
        for key in deployment.keys("cas:*:atime"):
            members = client.zrange(key, 0, -1)
            if members:
                client.zadd(key, dict.fromkeys(members, time.time() - seconds_ago))


def cas_json(deployment: RedisDeployment) -> dict[str, Any]:
    result = run_reapi("cas", "stats", *redis_args(deployment), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def stored(deployment: RedisDeployment, digests: list[Digest]) -> list[Digest]:
    """Those of `digests` stored, looked at without counting as a use."""
    with deployment.client() as client:
        return [d for d in digests if client.exists(blob_key(d))]


def redis_args(deployment: RedisDeployment) -> list[str]:
    return [f"--redis={url}" for url in deployment.urls]


async def test_gc_evicts_least_recently_used_outside_the_grace_period(
    redis_flushed: RedisDeployment,
) -> None:
    client = await client_of(redis_flushed)
    store = RedisStore(client)
    blobs = [os.urandom(10 * KIB) for _ in range(30)]
    digests = [SHA256.digest_of(b) for b in blobs]
    assert await store.put_many(list(zip(digests, blobs, strict=True))) == [None] * 30
    # Ten used days ago (oldest first), ten hours ago, ten just now.
    for n, digest in enumerate(digests[:10]):
        age(redis_flushed, [digest], 10 * 86400 - n * 60)
    age(redis_flushed, digests[10:20], 3 * 3600)
    report = await collect_redis(client, 25 * 10 * KIB, grace=GRACE)
    assert (report.blobs_before, report.evicted_blobs) == (30, 5)
    assert stored(redis_flushed, digests) == digests[5:], "the five oldest went"
    # Down to nothing: everything outside the grace period goes, the rest stays and is reported.
    report = await collect_redis(client, 0, grace=GRACE)
    assert report.evicted_blobs == 15 and report.kept_recent_bytes == 10 * 10 * KIB
    assert stored(redis_flushed, digests) == digests[20:]
    assert await store.total_size() == 10 * 10 * KIB
    dry = await collect_redis(client, 0, grace=0, dry_run=True, now=time.time() + 1)
    assert dry.evicted_blobs == 10 and stored(redis_flushed, digests) == digests[20:]
    # A use refreshes an old blob: gc then keeps it.
    age(redis_flushed, digests[20:], 2 * GRACE)
    assert await store.find_missing(digests[20:22]) == []
    report = await collect_redis(client, 0, grace=GRACE)
    assert stored(redis_flushed, digests) == digests[20:22]
    await client.aclose()


async def test_one_gc_at_a_time(redis_flushed: RedisDeployment) -> None:
    client = await client_of(redis_flushed)
    await put_blob(RedisStore(client), SHA256.digest_of(b"x"), b"x")
    await client.set(GC_LOCK, "someone else", ex=60)
    with pytest.raises(GcRunning):
        await collect_redis(client, 0, grace=0)
    refused = run_reapi("cas", "gc", *redis_args(redis_flushed), "--max-size", "0")
    assert "another reapi cas gc is running" in one_line_error(refused)
    await client.delete(GC_LOCK)
    report = await collect_redis(client, 0, grace=0, now=time.time() + 1)
    assert report.evicted_blobs == 1
    assert not await client.exists(GC_LOCK), "freed at the end"
    await client.aclose()


async def test_stats_while_a_gc_empties_a_set(
    redis_flushed: RedisDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stats reads each tag's set in several steps; a gc emptying the set in
    between (seen in CI) must not break it."""
    client = await client_of(redis_flushed)
    store = RedisStore(client)
    digest = SHA256.digest_of(b"soon gone")
    await put_blob(store, digest, b"soon gone")
    tag = atime_key(digest.hash[:2])
    reads = 0
    zrange = client.zrange

    async def gc_between_reads(key: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        found = await zrange(key, *args, **kwargs)
        if key == tag:
            reads += 1
            await collect_redis(client, 0, grace=0, now=time.time() + 1)
        return found

    monkeypatch.setattr(client, "zrange", gc_between_reads)
    shown = await stats_redis(client, "here")
    assert reads == 2 and shown["oldest_access"] is not None
    assert shown["newest_access"] is None, "gone before the second read"
    assert await store.total_size() == 0
    await client.aclose()


async def test_stats_and_verify_find_and_repair(redis_flushed: RedisDeployment) -> None:
    client = await client_of(redis_flushed)
    store = RedisStore(client)
    good, bad = os.urandom(3000), os.urandom(2 * 1024 * 1024 + 1)
    digests = [SHA256.digest_of(good), SHA256.digest_of(bad)]
    await store.put_many([(digests[0], good), (digests[1], bad)])
    results = RedisActionResultStore(client)
    # Two action results: one names only the good blob, one names the bad one too;
    # and one that is not a protobuf at all.
    actions = [SHA256.digest_of(name) for name in (b"good", b"bad", b"garbage")]
    for action, outputs in zip(actions[:2], ([digests[0]], digests), strict=True):
        result = re_pb2.ActionResult(
            output_files=[
                re_pb2.OutputFile(path=f"out{n}", digest=d.to_proto())
                for n, d in enumerate(outputs)
            ]
        )
        await results.put(action, result.SerializeToString(), "team-a")
    await results.put(actions[2], b"\xff not a protobuf")
    found = cas_json(redis_flushed)
    assert (found["blobs"], found["bytes"]) == (2, len(good) + len(bad))
    assert found["action_results_by_instance"] == {"team-a": 2, "": 1}
    assert run_reapi("cas", "verify", *redis_args(redis_flushed)).returncode == 1
    with redis_flushed.client() as sync:  # a flipped byte in the second chunk of `bad`
        flipped = bytes([bad[CHUNK + 5] ^ 0xFF])
        sync.setrange(blob_key(digests[1]) + ":1", 5, flipped)
    await client.aclose()
    checked = run_reapi("cas", "verify", *redis_args(redis_flushed))
    assert checked.returncode == 1 and "1 corrupt, 1 unreadable and 1 incomplete" in (
        checked.stdout
    ), checked.stdout
    assert digests[1].hash in checked.stdout
    repaired = run_reapi("cas", "verify", *redis_args(redis_flushed), "--repair")
    assert repaired.returncode == 0, repaired.stdout
    assert "removed 1 blobs and 2 action results" in repaired.stdout, repaired.stdout
    assert cas_json(redis_flushed)["blobs"] == 1
    client = await client_of(redis_flushed)
    results = RedisActionResultStore(client)
    assert await results.get(actions[0], "team-a") is not None, "the good one stays"
    assert await results.get(actions[1], "team-a") is None
    assert await results.get(actions[2]) is None
    await client.aclose()


@pytest.mark.slow
def test_a_make_build_through_the_shim_while_gc_runs(
    tmp_path: Path, redis_cluster: RedisDeployment
) -> None:
    """zlib through reapi-cc against a frontend on the Redis Cluster while
    `reapi cas gc --redis ... --max-size 0` runs in a loop. Yesterday's build
    and old junk are aged past the grace period: gc evicts, and the build sees
    no missing blob, no failed action, and gives the objects plain gcc gives."""
    redis_cluster.emptied()
    source = debian_source("zlib")
    plain = shutil.copytree(source, tmp_path / "plain")
    run(["./configure"], plain)
    run(["make", "-j2", "libz.a"], plain)
    expected = objects(plain)
    server = ServerProcess(tmp_path / "frontend", workers=2, redis=redis_cluster.urls)

    def shim_env(home: str) -> dict[str, str]:
        return shim_env_for(server.address, tmp_path / home)

    try:
        yesterday = shutil.copytree(source, tmp_path / "yesterday")
        run(["./configure"], yesterday, shim_env("home1"))
        run(["make", "-j2", "libz.a"], yesterday, shim_env("home1"))
        upload(server.address, [os.urandom(5000) for _ in range(200)])  # junk
        age_everything(redis_cluster, 2 * GRACE)
        before = cas_json(redis_cluster)["blobs"]
        stop = threading.Event()
        runs: list[subprocess.CompletedProcess[str]] = []

        def collect_again_and_again() -> None:
            while not stop.is_set():
                gc = run_reapi("cas", "gc", *redis_args(redis_cluster), "--max-size", "0")
                runs.append(gc)

        collector = threading.Thread(target=collect_again_and_again)
        collector.start()
        try:
            today = shutil.copytree(source, tmp_path / "today")
            env = shim_env("home2")
            run(["./configure"], today, env)
            run(["make", "-j2", "libz.a"], today, env)
            run(["make", "clean"], today, env)
            (today / "adler32.c").write_text((today / "adler32.c").read_text() + "\n/* x */\n")
            run(["make", "-j2", "libz.a"], today, env)
        finally:
            stop.set()
            collector.join()
        assert len(runs) >= 3 and all(r.returncode == 0 for r in runs), runs[-1:]
        assert cas_json(redis_cluster)["blobs"] < before  # gc really evicted
        assert objects(today) == expected
        found = stats(env)
        assert not {"remote-error", "remote-output-missing"} & set(found["local_reasons"]), found
        assert found["remote_executions"] >= 1 and found["cache_hits"] >= len(expected) - 1, found
    finally:
        assert server.stop() == 0, server.log()
        stop_agents(tmp_path / "home1", tmp_path / "home2")
