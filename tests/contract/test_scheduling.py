"""The contract both schedulers keep (executor/scheduler.py `Scheduling`): the
in-memory one, and the Redis one on a real standalone Redis and a real Cluster.
Jobs are compared by name: the Redis scheduler hands out snapshots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.rpc import code_pb2

from cas.redis_conn import RedisTarget, connect
from executor.redis_scheduler import RedisScheduler
from executor.scheduler import (
    COMPLETED,
    EXECUTING,
    MAX_ATTEMPTS,
    QUEUED,
    Job,
    Scheduler,
    Scheduling,
)
from reapi.core.digests import DigestFunction
from reapi.core.errors import FailedPrecondition, NotFound
from reapi.protos import remote_execution_pb2 as re_pb2
from tests.redis_servers import RedisDeployment

NONE: frozenset[tuple[str, str]] = frozenset()


@pytest.fixture(params=["memory", "redis-standalone", "redis-cluster"])
async def scheduler(request: pytest.FixtureRequest) -> AsyncIterator[Scheduling]:
    if request.param == "memory":
        memory = Scheduler()
        await memory.start()
        yield memory
        await memory.shutdown()
        return
    deployment: RedisDeployment = request.getfixturevalue(request.param.replace("-", "_"))
    deployment.emptied()
    target = RedisTarget(tuple(deployment.urls))
    client = await connect(target)
    shared = RedisScheduler(client, target)
    await shared.start()
    yield shared
    await shared.shutdown()
    await client.aclose()


async def submit(
    scheduler: Scheduling,
    name: str,
    priority: int = 0,
    requirements: frozenset[tuple[str, str]] = NONE,
    do_not_cache: bool = False,
    instance: str = "",
    owner: str = "",
) -> Job:
    digest = DigestFunction.SHA256.digest_of(name.encode())
    action = re_pb2.Action(do_not_cache=do_not_cache)
    command = re_pb2.Command(arguments=["x"])
    return await scheduler.submit(
        digest, action, command, instance, requirements, priority, owner=owner
    )


def ok(code: int = 0) -> re_pb2.ExecuteResponse:
    return re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=code))


async def test_identical_cacheable_actions_share_a_job(scheduler: Scheduling) -> None:
    first, second = await submit(scheduler, "a", owner="x"), await submit(scheduler, "a", owner="y")
    assert first.name == second.name
    assert (await scheduler.job(first.name)).owners == {"x", "y"}
    loners = [await submit(scheduler, "b", do_not_cache=True) for _ in range(2)]
    assert loners[0].name != loners[1].name


async def test_priority_then_arrival_order(scheduler: Scheduling) -> None:
    late = await submit(scheduler, "late", priority=5)
    early = await submit(scheduler, "early", priority=5)
    urgent = await submit(scheduler, "urgent", priority=-1)
    worker = await scheduler.connect("w", NONE, slots=3)
    taken = [(await scheduler.next_job(worker)).name for _ in range(3)]
    assert taken == [urgent.name, late.name, early.name]


async def test_properties_and_instances_decide_where_a_job_runs(scheduler: Scheduling) -> None:
    plain = await scheduler.connect("plain", NONE, 1)
    gpu = await scheduler.connect("gpu", frozenset({("gpu", "yes"), ("os", "linux")}), 1)
    job = await submit(scheduler, "train", requirements=frozenset({("gpu", "yes")}))
    waiting = asyncio.create_task(scheduler.next_job(plain))
    leased = await scheduler.next_job(gpu)
    assert leased.name == job.name and leased.command.arguments == ["x"]
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(FailedPrecondition, match="no worker matches"):
        await submit(scheduler, "x", requirements=frozenset({("tpu", "v5")}))
    team = await scheduler.connect("team-a", NONE, 1, instances=frozenset({"team-a"}))
    mine = await submit(scheduler, "build", instance="team-a")
    assert (await scheduler.next_job(team)).name == mine.name


async def test_a_job_runs_to_completion_and_watchers_see_each_stage(
    scheduler: Scheduling,
) -> None:
    job = await submit(scheduler, "build")
    seen: list[int] = []

    async def follow() -> None:
        async for snapshot in scheduler.watch(job):
            seen.append(snapshot.stage)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    worker = await scheduler.connect("w", NONE, 1)
    leased = await scheduler.next_job(worker)
    assert (await scheduler.job(job.name)).stage == EXECUTING
    await asyncio.sleep(0.05)
    await scheduler.finish(worker, leased.lease_id, ok(3))
    await asyncio.wait_for(follower, 10)
    assert seen[0] == QUEUED and seen[-1] == COMPLETED and EXECUTING in seen
    done = await scheduler.job(job.name)
    assert done.done and done.response is not None and done.response.result.exit_code == 3
    again = await submit(scheduler, "build")
    assert again.name != job.name, "a completed job is not merged into"


async def test_a_quiet_watch_sees_a_quick_job_once_completed(scheduler: Scheduling) -> None:
    job = await submit(scheduler, "quick")
    worker = await scheduler.connect("w", NONE, 1)

    async def run() -> None:
        leased = await scheduler.next_job(worker)
        await scheduler.finish(worker, leased.lease_id, ok())

    running = asyncio.create_task(run())
    seen = [snapshot.stage async for snapshot in scheduler.watch(job, quiet=30)]
    await running
    assert seen == [COMPLETED]


async def test_lost_worker_requeues_then_gives_up(scheduler: Scheduling) -> None:
    job = await submit(scheduler, "flaky")
    for attempt in range(MAX_ATTEMPTS):
        worker = await scheduler.connect(f"w{attempt}", NONE, 1)
        assert (await scheduler.next_job(worker)).name == job.name
        await scheduler.disconnect(worker, "test")
    done = await scheduler.job(job.name)
    assert done.stage == COMPLETED and done.attempts == MAX_ATTEMPTS
    assert done.response is not None and done.response.status.code == code_pb2.UNAVAILABLE


async def test_cancel(scheduler: Scheduling) -> None:
    queued = await submit(scheduler, "never", owner="a")
    await submit(scheduler, "never", owner="b")
    await scheduler.cancel(queued.name, owner="a")
    assert not (await scheduler.job(queued.name)).done, "b still wants it"
    await scheduler.cancel(queued.name, owner="b")
    cancelled = await scheduler.job(queued.name)
    assert cancelled.response is not None
    assert cancelled.response.status.code == code_pb2.CANCELLED
    worker = await scheduler.connect("w", NONE, 1)
    waiting = asyncio.create_task(scheduler.next_job(worker))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "nothing left to run"
    waiting.cancel()
    with pytest.raises(NotFound):
        await scheduler.job("operations/unknown")
    assert queued.name in {job.name for job in await scheduler.jobs()}
