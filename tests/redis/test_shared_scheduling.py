"""Two RedisSchedulers on one real Redis, as two frontends would hold them:
one queue, one in-flight index, operations visible from both, and leases that
outlive the frontend that granted them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from google.rpc import code_pb2

from cas.redis_conn import RedisTarget, connect
from executor import redis_scheduler
from executor.redis_scheduler import RedisScheduler
from executor.scheduler import COMPLETED, EXECUTING, QUEUED
from reapi.core.digests import DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2
from tests.contract.test_scheduling import NONE, ok, submit
from tests.redis_servers import RedisDeployment


@pytest.fixture
async def frontends(
    redis_flushed: RedisDeployment, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[RedisScheduler]]:
    """Two schedulers with short leases (1 s, renewed every 0.2 s)."""
    monkeypatch.setattr(redis_scheduler, "LEASE_SECONDS", 1.0)
    monkeypatch.setattr(redis_scheduler, "RENEW_EVERY", 0.2)
    target = RedisTarget(tuple(redis_flushed.urls))
    clients = [await connect(target) for _ in range(2)]
    schedulers = [RedisScheduler(client, target) for client in clients]
    for scheduler in schedulers:
        await scheduler.start()
    yield schedulers
    for scheduler in schedulers:
        await scheduler.shutdown()
    for client in clients:
        await client.aclose()


async def test_queued_on_one_run_by_a_worker_of_the_other(
    frontends: list[RedisScheduler],
) -> None:
    a, b = frontends
    worker = await b.connect("on-b", NONE, 1)
    await a._keep()  # a sees b's worker (as it would within RENEW_EVERY)
    job = await submit(a, "build", owner="me")
    seen: list[int] = []

    async def follow() -> None:
        async for snapshot in a.watch(job):
            seen.append(snapshot.stage)

    follower = asyncio.create_task(follow())
    while not seen:
        await asyncio.sleep(0.01)
    leased = await asyncio.wait_for(b.next_job(worker), 10)
    assert leased.name == job.name and leased.command.arguments == ["x"]
    await b.finish(worker, leased.lease_id, ok(7))
    await asyncio.wait_for(follower, 10)  # woken through pub/sub, well before polling
    assert seen[0] == QUEUED and seen[-1] == COMPLETED
    found = await a.job(job.name)
    assert found.response is not None and found.response.result.exit_code == 7
    assert found.owners == {"me"}
    assert job.name in {j.name for j in await b.jobs()}


async def test_identical_actions_on_both_at_once_run_once(
    frontends: list[RedisScheduler],
) -> None:
    a, b = frontends
    jobs = await asyncio.gather(*(submit(s, "same", owner=n) for s, n in ((a, "x"), (b, "y"))))
    assert jobs[0].name == jobs[1].name
    assert (await b.job(jobs[0].name)).owners == {"x", "y"}
    worker = await a.connect("w", NONE, 2)
    assert (await a.next_job(worker)).name == jobs[0].name
    second = asyncio.create_task(a.next_job(worker))
    await asyncio.sleep(0.3)
    assert not second.done(), "one run only"
    second.cancel()


async def test_a_dead_frontends_leases_are_reclaimed_by_the_other(
    frontends: list[RedisScheduler],
) -> None:
    """Frontend a dies (its tasks stop, nothing is handed back): after the lease
    expires, b queues the job again and b's worker runs it."""
    a, b = frontends
    on_a = await a.connect("on-a", NONE, 1)
    job = await submit(b, "long")
    leased = await a.next_job(on_a)
    assert (await b.job(job.name)).stage == EXECUTING
    for task in a._tasks:  # kill -9, as far as Redis can tell
        task.cancel()
    a._local.clear()
    on_b = await b.connect("on-b", NONE, 1)
    again = await asyncio.wait_for(b.next_job(on_b), 10)
    assert again.name == job.name and again.attempts == 2
    await b.finish(on_b, again.lease_id, ok())
    await a.finish(on_a, leased.lease_id, ok(1))  # the old lease's result is not taken
    done = await b.job(job.name)
    assert done.response is not None and done.response.result.exit_code == 0


async def test_cancel_on_one_reaches_the_worker_on_the_other(
    frontends: list[RedisScheduler],
) -> None:
    a, b = frontends
    worker = await a.connect("on-a", NONE, 1)
    job = await submit(b, "cancel me", owner="me")
    leased = await a.next_job(worker)
    await b.cancel(job.name, owner="me")
    lease = await asyncio.wait_for(worker.cancels.get(), 10)
    assert lease == leased.lease_id and not worker.leases
    cancelled = await a.job(job.name)
    assert cancelled.response is not None
    assert cancelled.response.status.code == code_pb2.CANCELLED


async def test_what_workers_anywhere_offer_is_known_everywhere(
    frontends: list[RedisScheduler],
) -> None:
    a, b = frontends
    await b.connect("gpu", frozenset({("gpu", "yes")}), 1, provided=("/usr", "/opt/cuda"))
    await a._keep()
    digest = DigestFunction.SHA256.digest_of(b"train")
    command = re_pb2.Command(arguments=["x"])
    await a.submit(digest, re_pb2.Action(), command, "", frozenset({("gpu", "yes")}))
    assert a.provided() == ("/opt/cuda", "/usr")


async def test_listing_is_bounded_to_the_newest(
    frontends: list[RedisScheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = frontends
    monkeypatch.setattr(redis_scheduler, "LISTED", 2)
    names = [(await submit(s, f"job {n}")).name for n, s in enumerate((a, b, a))]
    listed = await b.jobs()
    assert {job.name for job in listed} == set(names[1:])
    assert all(job.action.ByteSize() == 0 for job in listed), "no lease payload read"
