"""The scheduler on its own, driven by fake workers (no grpc, no processes)."""

from __future__ import annotations

import asyncio

import pytest
from google.rpc import code_pb2

from executor.scheduler import (
    COMPLETED,
    EXECUTING,
    KEEP_COMPLETED,
    MAX_ATTEMPTS,
    QUEUED,
    Job,
    Scheduler,
)
from reapi.core.digests import DigestFunction
from reapi.core.errors import FailedPrecondition, NotFound
from reapi.protos import remote_execution_pb2 as re_pb2

NONE: frozenset[tuple[str, str]] = frozenset()


async def submit(
    scheduler: Scheduler,
    name: str,
    priority: int = 0,
    requirements: frozenset[tuple[str, str]] = NONE,
    do_not_cache: bool = False,
) -> Job:
    digest = DigestFunction.SHA256.digest_of(name.encode())
    action = re_pb2.Action(do_not_cache=do_not_cache)
    return await scheduler.submit(
        digest, action, re_pb2.Command(arguments=["x"]), "", requirements, priority
    )


def ok() -> re_pb2.ExecuteResponse:
    return re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=0))


async def test_identical_cacheable_actions_share_a_job() -> None:
    scheduler = Scheduler()
    first, second = await submit(scheduler, "a"), await submit(scheduler, "a")
    assert first is second
    loners = [await submit(scheduler, "b", do_not_cache=True) for _ in range(2)]
    assert loners[0] is not loners[1]


async def test_priority_then_arrival_order() -> None:
    scheduler = Scheduler()
    late = await submit(scheduler, "late", priority=5)
    early = await submit(scheduler, "early", priority=5)  # same priority, arrived later
    urgent = await submit(scheduler, "urgent", priority=-1)
    worker = await scheduler.connect("w", NONE, slots=3)
    assert [await scheduler.next_job(worker) for _ in range(3)] == [urgent, late, early]


async def test_properties_decide_where_a_job_runs() -> None:
    scheduler = Scheduler()
    plain = await scheduler.connect("plain", NONE, 1)
    gpu = await scheduler.connect("gpu", frozenset({("gpu", "yes"), ("os", "linux")}), 1)
    job = await submit(scheduler, "train", requirements=frozenset({("gpu", "yes")}))
    taken = asyncio.create_task(scheduler.next_job(plain))
    assert await scheduler.next_job(gpu) is job
    await asyncio.sleep(0)
    assert not taken.done()
    taken.cancel()
    with pytest.raises(FailedPrecondition, match="no worker matches"):
        await submit(scheduler, "x", requirements=frozenset({("tpu", "v5")}))


async def test_instance_scoped_workers_run_only_their_instances() -> None:
    scheduler = Scheduler()
    team = await scheduler.connect("team-a only", NONE, 1, instances=frozenset({"team-a"}))
    digest = DigestFunction.SHA256.digest_of(b"build")
    action, command = re_pb2.Action(), re_pb2.Command(arguments=["x"])
    with pytest.raises(FailedPrecondition, match="no connected worker runs actions of instance"):
        await scheduler.submit(digest, action, command, "team-b", NONE)
    job = await scheduler.submit(digest, action, command, "team-a", NONE, owner="me")
    assert await scheduler.next_job(team) is job and job.owners == {"me"}
    everyone = await scheduler.connect("any", NONE, 1)
    other = await scheduler.submit(digest, action, command, "team-b", NONE)
    assert await scheduler.next_job(everyone) is other


async def test_lost_worker_requeues_then_gives_up() -> None:
    scheduler = Scheduler()
    job = await submit(scheduler, "flaky")
    stages = []
    for attempt in range(MAX_ATTEMPTS):
        worker = await scheduler.connect(f"w{attempt}", NONE, 1)
        assert await scheduler.next_job(worker) is job
        stages.append(job.stage)
        await scheduler.disconnect(worker, "test")
    assert stages == [EXECUTING] * MAX_ATTEMPTS
    assert job.stage == COMPLETED
    assert job.response is not None and job.response.status.code == code_pb2.UNAVAILABLE


async def test_finish_completes_and_stores_once() -> None:
    stored: list[Job] = []

    async def store(job: Job) -> None:
        stored.append(job)

    scheduler = Scheduler(on_complete=store)
    job = await submit(scheduler, "build")
    seen = []

    async def follow() -> None:
        async for snapshot in scheduler.watch(job):
            seen.append(snapshot.stage)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)
    worker = await scheduler.connect("w", NONE, 1)
    await scheduler.next_job(worker)
    await asyncio.sleep(0)
    await scheduler.finish(worker, job.lease_id, ok())
    await follower
    assert seen[0] == QUEUED and seen[-1] == COMPLETED and EXECUTING in seen
    assert stored == [job]
    assert await submit(scheduler, "build") is not job  # done jobs are not merged into


async def test_a_job_completed_while_its_watcher_sends_an_update_is_seen_done() -> None:
    """The Execute stream must end with the completed operation even when the
    job completed while the previous update was on its way."""
    scheduler = Scheduler()
    job = await submit(scheduler, "raced")
    worker = await scheduler.connect("w", NONE, 1)
    seen = []
    async for snapshot in scheduler.watch(job):
        seen.append(snapshot.stage)
        if len(seen) == 1:
            await scheduler.next_job(worker)
            await scheduler.finish(worker, job.lease_id, ok())
    assert seen == [QUEUED, COMPLETED]


async def test_a_quiet_watch_sees_a_quick_job_once_completed() -> None:
    scheduler = Scheduler()
    job = await submit(scheduler, "quick")
    worker = await scheduler.connect("w", NONE, 1)

    async def run() -> None:
        await scheduler.next_job(worker)
        await scheduler.finish(worker, job.lease_id, ok())

    running = asyncio.create_task(run())
    seen = [snapshot.stage async for snapshot in scheduler.watch(job, quiet=60)]
    await running
    assert seen == [COMPLETED]


async def test_a_quiet_watch_reports_a_slow_job_after_the_quiet_time() -> None:
    scheduler = Scheduler()
    job = await submit(scheduler, "slow")
    worker = await scheduler.connect("w", NONE, 1)
    await scheduler.next_job(worker)
    seen = []
    async for snapshot in scheduler.watch(job, quiet=0.01):
        seen.append(snapshot.stage)
        if not snapshot.done:  # the job ends only after its first report
            await scheduler.finish(worker, job.lease_id, ok())
    assert seen == [EXECUTING, COMPLETED]


async def test_cancel_a_queued_job() -> None:
    scheduler = Scheduler()
    job = await submit(scheduler, "never")
    await scheduler.cancel(job.name)
    assert job.response is not None and job.response.status.code == code_pb2.CANCELLED
    worker = await scheduler.connect("w", NONE, 1)
    waiting = asyncio.create_task(scheduler.next_job(worker))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # nothing left to run
    waiting.cancel()
    with pytest.raises(NotFound):
        await scheduler.job("operations/unknown")


async def test_shutdown_completes_everything_unfinished() -> None:
    scheduler = Scheduler()
    queued, running = await submit(scheduler, "queued"), await submit(scheduler, "running")
    worker = await scheduler.connect("w", NONE, 1)
    assert await scheduler.next_job(worker) is queued
    await scheduler.shutdown()
    for job in (queued, running):
        assert job.done and job.response is not None
        assert job.response.status.code == code_pb2.UNAVAILABLE


async def test_completed_jobs_are_forgotten_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("executor.scheduler.time.time", lambda: clock[0])
    scheduler = Scheduler()
    worker = await scheduler.connect("w", NONE, slots=3)
    old, recent, running = [await submit(scheduler, n) for n in ("old", "recent", "running")]
    for job in (old, recent, running):
        assert await scheduler.next_job(worker) is job
    await scheduler.finish(worker, old.lease_id, ok())
    clock[0] += KEEP_COMPLETED / 2
    await scheduler.finish(worker, recent.lease_id, ok())
    clock[0] += KEEP_COMPLETED / 2 + 1  # `old` is past keeping, `recent` is not
    await submit(scheduler, "new")  # forgetting happens as work comes in
    with pytest.raises(NotFound):
        await scheduler.job(old.name)
    assert await scheduler.job(recent.name) is recent
    assert await scheduler.job(running.name) is running
    clock[0] += KEEP_COMPLETED
    await submit(scheduler, "newer")
    with pytest.raises(NotFound):
        await scheduler.job(recent.name)
    assert await scheduler.job(running.name) is running  # unfinished jobs stay
