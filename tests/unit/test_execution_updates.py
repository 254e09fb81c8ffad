"""Execute's updates (reapi/frontend/services/execution.py) built from the scheduler's
jobs, with the scheduler alone and a stand-in action cache (no grpc)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.longrunning import operations_pb2

from executor.scheduler import Job, Scheduler
from reapi.frontend.services.execution import ExecutionService, OperationsService
from reapi.protos import remote_execution_pb2 as re_pb2
from tests.unit.test_scheduler import NONE, ok, submit


async def test_a_job_completing_while_its_update_is_built_is_reported_done_once() -> None:
    """The job completes while an update is waiting for the action cache to
    inline outputs: that update must show the job as it was, and only the next
    one may say done."""
    stored = asyncio.Event()

    async def store(job: Job) -> None:  # the action-cache write, still under way
        await stored.wait()

    scheduler = Scheduler(on_complete=store)
    job = await submit(scheduler, "raced")
    worker = await scheduler.connect("w", NONE, 1)
    await scheduler.next_job(worker)
    finishing = asyncio.create_task(scheduler.finish(worker, job.lease_id, ok()))
    await asyncio.sleep(0)  # the response is set; the stage is still EXECUTING

    class Cache:
        async def inline(self, *args: Any) -> None:
            stored.set()  # the write ends and the job completes meanwhile
            await finishing

    service = ExecutionService(store=None, cache=Cache(), scheduler=scheduler)  # type: ignore[arg-type]
    request = re_pb2.ExecuteRequest(inline_stdout=True)
    operations = [
        await service._job_operation(snapshot, request) async for snapshot in scheduler.watch(job)
    ]
    assert [op.done for op in operations] == [False, True]


async def test_a_page_of_operations_ends_before_its_byte_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("reapi.frontend.services.execution.LIST_PAGE_BYTES", 25_000)
    scheduler = Scheduler()
    worker = await scheduler.connect("w", NONE, 1)
    for n in range(6):
        job = await submit(scheduler, f"job{n}")
        await scheduler.next_job(worker)
        big = re_pb2.ActionResult(stdout_raw=b"x" * 10_000)  # each about 10 kB listed
        await scheduler.finish(worker, job.lease_id, re_pb2.ExecuteResponse(result=big))
    service = OperationsService(scheduler)
    pages, token = [], ""
    while True:
        request = operations_pb2.ListOperationsRequest(page_token=token)
        page = await service.ListOperations(request, None)  # type: ignore[arg-type]
        pages.append(len(page.operations))
        token = page.next_page_token
        if not token:
            break
    assert pages == [2, 2, 2]
