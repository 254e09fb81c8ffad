"""The scheduler: a priority queue of jobs, the operations clients watch, and
the leases that hand jobs to workers.

One Job is one execution of an action. Identical cacheable actions submitted
while one is queued or running share its Job (and its operation name), so N
clients cause one run and all N see it complete. A job goes QUEUED ->
EXECUTING -> COMPLETED; it may go back to QUEUED when its worker is lost, a
bounded number of times.

Workers are matched by platform properties: an action runs only on a worker
that advertised every property the action requires, with the same value.

No I/O here and no grpc: the Execution and Workers services drive it, and the
unit tests drive it with fake workers.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.rpc import code_pb2, status_pb2

from cas.existence import ExistenceCache
from reapi.core.conventions import PROVIDED_DIRS, is_under, provided_by
from reapi.core.digests import Digest
from reapi.core.errors import FailedPrecondition, NotFound
from reapi.protos import remote_execution_pb2 as re_pb2

log = logging.getLogger(__name__)

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING
COMPLETED = re_pb2.ExecutionStage.COMPLETED

# A job whose worker is lost this many times completes with an error.
MAX_ATTEMPTS = 3
# Completed jobs stay visible to GetOperation/WaitExecution this long (seconds).
KEEP_COMPLETED = 600.0
# How many input files the server remembers a worker holds (about 100 bytes each).
HELD_FILES = 200_000

Properties = frozenset[tuple[str, str]]


@dataclass(eq=False)
class Job:
    """One execution of an action, shared by every client that asked for it."""

    name: str
    action_digest: Digest
    action: re_pb2.Action
    command: re_pb2.Command
    instance_name: str
    requirements: Properties
    priority: int
    cacheable: bool
    # The input tree's Directory blobs and file digests, for the lease (a worker
    # need not read from the CAS what comes with it).
    input_directories: Sequence[bytes] = ()
    input_files: Sequence[Digest] = ()
    stage: int = QUEUED
    response: re_pb2.ExecuteResponse | None = None
    attempts: int = 0
    queued_at: float = field(default_factory=time.time)
    completed_at: float = 0.0
    worker: str = ""
    lease_id: str = ""
    # The callers who asked for it (reapi/frontend/access.py names them): only they and
    # an admin see the operation.
    owners: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Resolved when the job completes (created on the running loop).
    finished: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def done(self) -> bool:
        return self.stage == COMPLETED


@dataclass(eq=False)
class WorkerHandle:
    """A connected worker, as the scheduler sees it."""

    name: str
    properties: Properties
    slots: int
    leases: dict[str, Job] = field(default_factory=dict)
    # Cancellations for the worker's Work stream to send.
    cancels: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    # Input files of this worker's earlier leases: its cache has them (or fetched
    # them itself), so no lease needs to carry them again.
    held: ExistenceCache = field(default_factory=lambda: ExistenceCache(HELD_FILES))
    # The directories it mounts for every action (reapi/core/conventions.py).
    provided: tuple[str, ...] = PROVIDED_DIRS
    # The instance names whose actions it may run; None: every one.
    instances: frozenset[str] | None = None

    def matches(self, job: Job) -> bool:
        if self.instances is not None and job.instance_name not in self.instances:
            return False
        return job.requirements <= self.properties


OnComplete = Callable[[Job], Awaitable[None]]


class Scheduling(Protocol):
    """What the Execution, Operations and Workers services ask of a scheduler:
    `Scheduler` below keeps its state in memory, `RedisScheduler`
    (executor/redis_scheduler.py) in Redis, shared by frontends. Both keep the
    rules described above; tests/contract/test_scheduling.py runs both."""

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    def check_placeable(self, requirements: Properties, instance_name: str = "") -> None: ...
    async def submit(
        self,
        action_digest: Digest,
        action: re_pb2.Action,
        command: re_pb2.Command,
        instance_name: str,
        requirements: Properties,
        priority: int = 0,
        input_directories: Sequence[bytes] = (),
        input_files: Sequence[Digest] = (),
        owner: str = "",
    ) -> Job: ...
    async def job(self, name: str) -> Job: ...
    async def jobs(self) -> list[Job]: ...
    def watch(self, job: Job, quiet: float = 0.0) -> AsyncIterator[Job]: ...
    async def cancel(self, name: str, owner: str | None = None) -> None: ...
    async def connect(
        self,
        name: str,
        properties: Properties,
        slots: int,
        provided: tuple[str, ...] = PROVIDED_DIRS,
        instances: frozenset[str] | None = None,
    ) -> WorkerHandle: ...
    def provided(self) -> tuple[str, ...]: ...
    async def next_job(self, worker: WorkerHandle) -> Job: ...
    async def finish(
        self, worker: WorkerHandle, lease_id: str, response: re_pb2.ExecuteResponse
    ) -> None: ...
    async def disconnect(self, worker: WorkerHandle, reason: str) -> None: ...


class Scheduler:
    def __init__(self, on_complete: OnComplete | None = None) -> None:
        """`on_complete` runs once for each job that finishes with a result
        (e.g. to store it in the action cache), before watchers are told."""
        self._on_complete = on_complete
        self._jobs: dict[str, Job] = {}
        # Done jobs in the order they completed, so forgetting old ones looks
        # only at those it forgets (the whole table per Execute was quadratic).
        self._completed: collections.deque[Job] = collections.deque()
        self._in_flight: dict[tuple[Digest, str], Job] = {}
        # (priority, arrival, job); read in that order by _take.
        self._queue: list[tuple[int, int, Job]] = []
        self._sequence = itertools.count()
        self._workers: set[WorkerHandle] = set()
        self._work_available = asyncio.Condition()

    async def start(self) -> None:
        """Nothing to start: everything is in this process."""

    # ------------------------------------------------------------ clients

    def check_placeable(self, requirements: Properties, instance_name: str = "") -> None:
        """Raise FailedPrecondition if no connected worker could ever run an
        action with these requirements in that instance (see `placeable`)."""
        placeable([(w.properties, w.instances) for w in self._workers], requirements, instance_name)

    async def submit(
        self,
        action_digest: Digest,
        action: re_pb2.Action,
        command: re_pb2.Command,
        instance_name: str,
        requirements: Properties,
        priority: int = 0,
        input_directories: Sequence[bytes] = (),
        input_files: Sequence[Digest] = (),
        owner: str = "",
    ) -> Job:
        """The job that will run the action: an identical one already queued
        or running, unless the action may not be cached (then always new).
        `owner` joins the job's owners."""
        self.check_placeable(requirements, instance_name)
        cacheable = not action.do_not_cache
        key = (action_digest, instance_name)
        if cacheable and (existing := self._in_flight.get(key)) is not None:
            existing.owners.add(owner)
            return existing
        self._forget_old()
        job = Job(
            name=f"operations/{uuid.uuid4()}",
            action_digest=action_digest,
            action=action,
            command=command,
            instance_name=instance_name,
            requirements=requirements,
            priority=priority,
            cacheable=cacheable,
            input_directories=input_directories,
            input_files=input_files,
            owners={owner},
        )
        self._jobs[job.name] = job
        if cacheable:
            self._in_flight[key] = job
        await self._enqueue(job)
        return job

    async def job(self, name: str) -> Job:
        job = self._jobs.get(name)
        if job is None:
            raise NotFound(f"operation {name!r} not found; it may have expired")
        return job

    async def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    async def watch(self, job: Job, quiet: float = 0.0) -> AsyncIterator[Job]:
        """Yield `job` now and after each change, until it has been yielded
        done. With `quiet` (seconds), the first yield waits that long or until
        the job is done: a quick job is then seen once, completed."""
        if quiet > 0:
            await asyncio.wait([job.finished], timeout=quiet)
        while True:
            changed, done = job.changed, job.done
            yield job
            if done:
                return
            # Set already if the job changed while the caller had it (sending it).
            await changed.wait()

    async def cancel(self, name: str, owner: str | None = None) -> None:
        """Cancel the job; with `owner`, only that owner's interest in it: the
        job runs on while another owner still wants it."""
        job = await self.job(name)
        if job.done:
            return
        if owner is not None:
            job.owners.discard(owner)
            if job.owners:
                return
        for worker in self._workers:
            if job.lease_id in worker.leases:
                del worker.leases[job.lease_id]
                worker.cancels.put_nowait(job.lease_id)
        await self._complete(job, _error_response(code_pb2.CANCELLED, "cancelled by a client"))

    async def shutdown(self) -> None:
        """Complete every unfinished job with UNAVAILABLE: the server is stopping
        and nothing will run them (clients then retry elsewhere or later)."""
        for job in [job for job in self._jobs.values() if not job.done]:
            await self._complete(job, _error_response(code_pb2.UNAVAILABLE, "server stopping"))

    # ------------------------------------------------------------ workers

    async def connect(
        self,
        name: str,
        properties: Properties,
        slots: int,
        provided: tuple[str, ...] = PROVIDED_DIRS,
        instances: frozenset[str] | None = None,
    ) -> WorkerHandle:
        worker = WorkerHandle(
            name, properties, max(1, slots), provided=provided, instances=instances
        )
        self._workers.add(worker)
        async with self._work_available:
            self._work_available.notify_all()
        log.info("worker %s connected (%d slots, %s)", name, worker.slots, sorted(properties))
        return worker

    def provided(self) -> tuple[str, ...]:
        return common_provided([w.provided for w in self._workers])

    async def next_job(self, worker: WorkerHandle) -> Job:
        """Wait for a free slot and a queued job this worker matches; lease it."""
        async with self._work_available:
            while True:
                if len(worker.leases) < worker.slots:
                    job = self._take(worker)
                    if job is not None:
                        break
                await self._work_available.wait()
        job.attempts += 1
        job.lease_id = str(uuid.uuid4())
        job.worker = worker.name
        worker.leases[job.lease_id] = job
        self._set_stage(job, EXECUTING)
        return job

    async def finish(
        self, worker: WorkerHandle, lease_id: str, response: re_pb2.ExecuteResponse
    ) -> None:
        job = worker.leases.pop(lease_id, None)
        async with self._work_available:
            self._work_available.notify_all()  # a slot is free
        if job is None or job.done:
            return  # cancelled or re-queued meanwhile
        await self._complete(job, response)

    async def disconnect(self, worker: WorkerHandle, reason: str) -> None:
        """The worker is gone: put its unfinished jobs back in the queue."""
        self._workers.discard(worker)
        leases, worker.leases = list(worker.leases.values()), {}
        log.warning("worker %s lost (%s); %d job(s) to re-run", worker.name, reason, len(leases))
        for job in leases:
            if job.done:
                continue
            if job.attempts >= MAX_ATTEMPTS:
                message = f"worker lost {job.attempts} times while running this action ({reason})"
                await self._complete(job, _error_response(code_pb2.UNAVAILABLE, message))
            else:
                job.lease_id = job.worker = ""
                await self._enqueue(job)
        async with self._work_available:
            self._work_available.notify_all()

    # ------------------------------------------------------------ inside

    async def _enqueue(self, job: Job) -> None:
        self._queue.append((job.priority, next(self._sequence), job))
        self._set_stage(job, QUEUED)
        async with self._work_available:
            self._work_available.notify_all()

    def _take(self, worker: WorkerHandle) -> Job | None:
        """The most urgent queued job the worker matches, removed from the queue."""
        for entry in sorted(self._queue):  # (priority, arrival, job): lowest first
            if worker.matches(entry[2]):
                self._queue.remove(entry)
                return entry[2]
        return None

    async def _complete(self, job: Job, response: re_pb2.ExecuteResponse) -> None:
        self._in_flight.pop((job.action_digest, job.instance_name), None)
        self._queue = [entry for entry in self._queue if entry[2] is not job]
        if response.HasField("result"):  # the worker cannot know when it was queued
            metadata = response.result.execution_metadata
            metadata.queued_timestamp.FromNanoseconds(int(job.queued_at * 1e9))
        job.response = response
        job.completed_at = time.time()
        self._completed.append(job)
        job.input_directories = job.input_files = ()  # no worker needs them now
        if self._on_complete is not None and response.status.code == code_pb2.OK:
            try:
                await self._on_complete(job)
            except Exception:
                log.exception("storing the result of %s failed", job.action_digest)
        self._set_stage(job, COMPLETED)
        if not job.finished.done():
            job.finished.set_result(None)

    def _set_stage(self, job: Job, stage: int) -> None:
        job.stage = stage
        changed, job.changed = job.changed, asyncio.Event()
        changed.set()

    def _forget_old(self) -> None:
        horizon = time.time() - KEEP_COMPLETED
        while self._completed and self._completed[0].completed_at < horizon:
            self._jobs.pop(self._completed.popleft().name, None)


def placeable(
    workers: Sequence[tuple[Properties, frozenset[str] | None]],
    requirements: Properties,
    instance_name: str,
) -> None:
    """Raise FailedPrecondition if none of `workers` (properties, instances
    or None for all) could ever run an action with these requirements in that
    instance. With no worker connected at all (the server just started),
    anything may still come."""
    if not workers:
        return
    allowed = [
        props for props, instances in workers if instances is None or instance_name in instances
    ]
    if not allowed:
        raise FailedPrecondition(
            f"no connected worker runs actions of instance name {instance_name!r}"
        )
    if any(requirements <= props for props in allowed):
        return
    known = sorted({name for props in allowed for name, _ in props})
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(requirements))
    raise FailedPrecondition(
        f"no worker matches platform properties {{{wanted}}}; workers offer the "
        f"property names {known or '(none)'}"
    )


def common_provided(provided: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The directories every one of the workers (their `provided`) provides,
    PROVIDED_DIRS when there is none: what a client may rely on wherever its
    action runs."""
    if not provided:
        return PROVIDED_DIRS
    candidates = {d for dirs in provided for d in dirs}
    common = {d for d in candidates if all(provided_by(d, dirs) for dirs in provided)}
    return tuple(sorted(d for d in common if not any(d != c and is_under(d, c) for c in common)))


def _error_response(code: int, message: str) -> re_pb2.ExecuteResponse:
    return re_pb2.ExecuteResponse(status=status_pb2.Status(code=code, message=message))
