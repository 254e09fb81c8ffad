"""RedisScheduler: the scheduler's state in Redis, shared by every frontend.

The same API and rules as the in-memory Scheduler (executor/scheduler.py):
priorities then arrival, platform properties and instance names decide where a
job runs, identical cacheable actions in flight share one job, a job whose
worker is lost is queued again up to MAX_ATTEMPTS times. What changes is where
the state lives: any frontend may take a job another queued, complete one it
did not lease, or answer for an operation it never saw.

Keys. Every key carries the hash tag {s}, so on a Cluster they share one
slot and one Lua script changes a job, the queue and the leases together,
atomically (each script names the queue's key, which routes it to that
slot). The price: one master does all the scheduling, ample for thousands of
actions a second (see benchmarks/README.md).

    sched:{s}:job:NAME       hash: the job (fields below); expires after completion
    sched:{s}:owners:NAME    set: the callers who asked for it
    sched:{s}:queue          sorted set: NAME -> priority, then arrival
    sched:{s}:running        sorted set: NAME -> its lease's expiry (ms since the epoch)
    sched:{s}:inflight:INSTANCE:ACTION   NAME of the job of a cacheable action in flight
    sched:{s}:ops            sorted set: NAME -> when it was queued (ListOperations)
    sched:{s}:workers        hash: worker id -> JSON (properties, instances, directories, expiry)

Job fields: action, instance, req (JSON [[name, value], ...]), score,
cacheable, queued_at, stage, attempts, worker, lease, response (an
ExecuteResponse), completed_at, inflight (its inflight key), assign (a
worker_pb2.Assign with the action, command and input directories).

Leases. The frontend a worker is connected to renews its leases every
RENEW_EVERY seconds; every frontend puts back in the queue the jobs whose
lease has expired (LEASE_SECONDS): so a job survives the death of its worker,
of its worker's frontend, and of every frontend but one.

What is process-local stays so: a stream watching an operation waits on an
asyncio.Event, woken by a message on the channel sched:{s}:changed (Redis
pub/sub) and, should a message be lost, by polling every POLL_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import string
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import redis.asyncio
import redis.exceptions
from google.rpc import code_pb2, status_pb2

from cas.redis_conn import Arg, Client, RedisTarget, redis_errors
from executor.scheduler import (
    COMPLETED,
    EXECUTING,
    KEEP_COMPLETED,
    MAX_ATTEMPTS,
    QUEUED,
    Job,
    OnComplete,
    Properties,
    WorkerHandle,
    common_provided,
    placeable,
)
from reapi.core.conventions import PROVIDED_DIRS
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import NotFound, ReapiError, Unavailable
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import worker_pb2

log = logging.getLogger(__name__)

PREFIX = "sched:{s}:"
QUEUE, RUNNING, OPS = PREFIX + "queue", PREFIX + "running", PREFIX + "ops"
WORKERS, SEQ = PREFIX + "workers", PREFIX + "seq"
CHANGED, QUEUED_CHANNEL = PREFIX + "changed", PREFIX + "queued"
# Stands for "no inflight key" (never set): every key of a script shares the slot.
NO_INFLIGHT = PREFIX + "no-inflight"
# Seconds: a lease not renewed for this long is taken for lost; leases are
# renewed, expired ones reclaimed and the worker registry refreshed this often.
LEASE_SECONDS = 10.0
RENEW_EVERY = 2.0
# A watcher or an idle worker looks again this often even without a message.
POLL_SECONDS = 2.0
# How far down the queue a worker's take looks for a job it matches.
TAKE_SCAN = 200
# Input directories up to this many bytes in all are kept with the job, for
# the lease; the worker reads the rest from the CAS.
KEPT_INPUT_BYTES = 256 << 10
# Seconds between attempts to store a result while Redis is unavailable.
FINISH_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0)
# Operations are listed (ListOperations) for at most this long after being
# queued (completed ones only while kept), read this many at a time.
LISTED_SECONDS = 86400.0
LIST_BATCH = 500
# ListOperations sees at most this many operations, the newest, and not the
# payload their leases carry (a job's action, command and input directories).
LISTED = 10_000
LISTED_FIELDS = [
    "action", "instance", "req", "cacheable", "priority", "stage", "attempts",
    "queued_at", "completed_at", "worker", "lease", "response",
]  # fmt: skip
# Priorities are clamped to this range in the queue's score (arrival fills the rest).
PRIORITY_LIMIT = 8000
ARRIVAL_SPAN = 10**12


def job_key(name: str) -> str:
    return f"{PREFIX}job:{name}"


def owners_key(name: str) -> str:
    return f"{PREFIX}owners:{name}"


def inflight_key(action: Digest, instance_name: str) -> str:
    instance = urllib.parse.quote(instance_name, safe="")
    return f"{PREFIX}inflight:{instance}:{digest_text(action)}"


def digest_text(digest: Digest) -> str:
    return f"{digest.function.path_name}/{digest.hash}/{digest.size}"


# KEYS: inflight key (NO_INFLIGHT when not cacheable), job, owners, queue, ops, seq.
# ARGV: name, owner, priority, now, then the job's fields as name, value pairs.
# Returns {the name of the job that will run the action, 1 if it is this new one}.
_SUBMIT = """
local name, owner, priority, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if KEYS[1] ~= '${no_inflight}' then
  local existing = redis.call('GET', KEYS[1])
  local stage = existing and redis.call('HGET', '${job}' .. existing, 'stage')
  if stage and stage ~= '${completed}' then
    redis.call('SADD', '${owners}' .. existing, owner)
    return {existing, 0}
  end
  redis.call('SET', KEYS[1], name)
end
local score = priority * ${span} + redis.call('INCR', KEYS[6])
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], 'score', score, 'stage', '${queued}', 'attempts', 0,
           'queued_at', now, 'inflight', KEYS[1], unpack(fields))
redis.call('SADD', KEYS[3], owner)
redis.call('ZADD', KEYS[4], score, name)
redis.call('ZADD', KEYS[5], now, name)
redis.call('PUBLISH', '${queued_channel}', name)
redis.call('PUBLISH', '${changed}', name)
return {name, 1}
"""

# ARGV: worker, lease id, lease expiry (ms), instances (JSON list, '' for any),
# properties (JSON [[name, value], ...]). Returns {name, the job's fields as
# HGETALL gives them} or false.
_TAKE = """
local have = {}
for _, p in ipairs(cjson.decode(ARGV[5])) do have[p[1] .. '\\0' .. p[2]] = true end
local instances = nil
if ARGV[4] ~= '' then
  instances = {}
  for _, n in ipairs(cjson.decode(ARGV[4])) do instances[n] = true end
end
for _, name in ipairs(redis.call('ZRANGE', '${queue}', 0, ${scan})) do
  local key = '${job}' .. name
  local job = redis.call('HMGET', key, 'req', 'instance', 'stage')
  if not job[1] or job[3] ~= '${queued}' then
    redis.call('ZREM', '${queue}', name)  -- expired or no longer queued
  else
    local fits = instances == nil or instances[job[2]] ~= nil
    if fits then
      for _, r in ipairs(cjson.decode(job[1])) do
        if not have[r[1] .. '\\0' .. r[2]] then fits = false break end
      end
    end
    if fits then
      redis.call('ZREM', '${queue}', name)
      redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('HSET', key, 'stage', '${executing}', 'worker', ARGV[1], 'lease', ARGV[2])
      redis.call('ZADD', '${running}', ARGV[3], name)
      redis.call('PUBLISH', '${changed}', name)
      return {name, redis.call('HGETALL', key)}
    end
  end
end
return false
"""

# ARGV: name, lease ('' to complete whatever runs it), response, now, seconds to keep.
# Returns 1 if this completed the job.
_COMPLETE = """
local name = ARGV[1]
local key = '${job}' .. name
local job = redis.call('HMGET', key, 'lease', 'stage', 'inflight')
if not job[2] or job[2] == '${completed}' then return 0 end
if ARGV[2] ~= '' and job[1] ~= ARGV[2] then return 0 end
redis.call('HSET', key, 'stage', '${completed}', 'response', ARGV[3], 'completed_at', ARGV[4],
           'lease', '')
redis.call('ZREM', '${running}', name)
redis.call('ZREM', '${queue}', name)
if job[3] and job[3] ~= '' and redis.call('GET', job[3]) == name then redis.call('DEL', job[3]) end
redis.call('EXPIRE', key, ARGV[5])
redis.call('EXPIRE', '${owners}' .. name, ARGV[5])
redis.call('PUBLISH', '${changed}', name)
return 1
"""

# ARGV: now (ms), response for a job given up, now (s), seconds to keep, then
# name, lease pairs to reclaim at once (a worker that disconnected) whether
# expired or not. Jobs whose lease expired are queued again, or completed with
# the given response after MAX_ATTEMPTS. Returns how many were queued again.
_RECLAIM = """
for i = 5, #ARGV, 2 do
  if redis.call('HGET', '${job}' .. ARGV[i], 'lease') == ARGV[i + 1] then
    redis.call('ZADD', '${running}', 'XX', 0, ARGV[i])
  end
end
local requeued = 0
local expired = redis.call('ZRANGEBYSCORE', '${running}', '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, name in ipairs(expired) do
  local key = '${job}' .. name
  redis.call('ZREM', '${running}', name)
  local job = redis.call('HMGET', key, 'attempts', 'score', 'stage', 'inflight')
  if job[3] == '${executing}' then
    if tonumber(job[1]) >= ${max_attempts} then
      redis.call('HSET', key, 'stage', '${completed}', 'response', ARGV[2],
                 'completed_at', ARGV[3], 'lease', '')
      if job[4] ~= '' and redis.call('GET', job[4]) == name then redis.call('DEL', job[4]) end
      redis.call('EXPIRE', key, ARGV[4])
      redis.call('EXPIRE', '${owners}' .. name, ARGV[4])
    else
      redis.call('HSET', key, 'stage', '${queued}', 'lease', '', 'worker', '')
      redis.call('ZADD', '${queue}', job[2], name)
      requeued = requeued + 1
    end
    redis.call('PUBLISH', '${changed}', name)
  end
end
if requeued > 0 then redis.call('PUBLISH', '${queued_channel}', '') end
return requeued
"""

# ARGV: expiry (ms), then name, lease pairs. Renews the leases still held;
# returns the names of those that are not (cancelled, or reclaimed meanwhile).
_RENEW = """
local lost = {}
for i = 2, #ARGV, 2 do
  if redis.call('HGET', '${job}' .. ARGV[i], 'lease') == ARGV[i + 1] then
    redis.call('ZADD', '${running}', 'XX', ARGV[1], ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

_NAMES = {
    "job": PREFIX + "job:",
    "owners": PREFIX + "owners:",
    "queue": QUEUE,
    "running": RUNNING,
    "changed": CHANGED,
    "queued_channel": QUEUED_CHANNEL,
    "queued": QUEUED,
    "executing": EXECUTING,
    "completed": COMPLETED,
    "span": ARRIVAL_SPAN,
    "scan": TAKE_SCAN - 1,
    "max_attempts": MAX_ATTEMPTS,
    "no_inflight": NO_INFLIGHT,
}
SUBMIT, TAKE, COMPLETE, RECLAIM, RENEW = (
    string.Template(script).substitute(_NAMES)
    for script in (_SUBMIT, _TAKE, _COMPLETE, _RECLAIM, _RENEW)
)


@dataclass(frozen=True)
class RemoteWorker:
    """A worker connected to some frontend, as the registry lists it."""

    properties: Properties
    instances: frozenset[str] | None
    provided: tuple[str, ...]


class RedisScheduler:
    """The Scheduler's API (see executor/scheduler.py) on state kept in Redis."""

    def __init__(
        self, client: Client, target: RedisTarget, on_complete: OnComplete | None = None
    ) -> None:
        self._client = client
        self._target = target
        self._on_complete = on_complete
        self._id = uuid.uuid4().hex[:12]  # this frontend, in worker ids
        self._local: dict[WorkerHandle, str] = {}  # connected here -> registry id
        self._registry: list[RemoteWorker] = []
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._work = asyncio.Event()  # set when a job may have been queued or a slot freed
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        """Start listening for changes and keeping leases: call once, on the serving loop."""
        try:
            await self._keep()  # the workers other frontends have, before the first call
        except ReapiError as error:
            log.warning("scheduler: %s", error.message)
        self._tasks = [
            asyncio.create_task(self._listen(), name="scheduler-listen"),
            asyncio.create_task(self._keep_forever(), name="scheduler-keep"),
        ]

    async def shutdown(self) -> None:
        """This frontend stops: its workers' jobs go back to the queue for the
        others (unlike the in-memory scheduler, the jobs outlive it)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for worker in list(self._local):
            with contextlib.suppress(ReapiError):
                await self.disconnect(worker, "server stopping")

    # ------------------------------------------------------------ clients

    def check_placeable(self, requirements: Properties, instance_name: str = "") -> None:
        placeable(
            [(w.properties, w.instances) for w in self._registry], requirements, instance_name
        )

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
        """The job that will run the action, possibly queued by another frontend.
        (`input_files` are not kept: a worker reads what it lacks from the CAS.)"""
        self.check_placeable(requirements, instance_name)
        cacheable = not action.do_not_cache
        assign = worker_pb2.Assign(
            action_digest=action_digest.to_proto(),
            digest_function=action_digest.function.value,
            action=action,
            command=command,
            instance_name=instance_name,
        )
        budget = KEPT_INPUT_BYTES
        for blob in input_directories:
            if len(blob) <= budget:
                assign.input_directories.append(blob)
                budget -= len(blob)
        name = f"operations/{uuid.uuid4()}"
        inflight = inflight_key(action_digest, instance_name) if cacheable else NO_INFLIGHT
        fields: list[Arg] = [
            "action", digest_text(action_digest), "instance", instance_name,
            "req", json.dumps(sorted(requirements)), "cacheable", int(cacheable),
            "priority", priority,
            "assign", assign.SerializeToString(),
        ]  # fmt: skip
        keys = [inflight, job_key(name), owners_key(name), QUEUE, OPS, SEQ]
        clamped = max(-PRIORITY_LIMIT, min(PRIORITY_LIMIT, priority))
        now = repr(time.time())
        args: list[Arg] = [name, owner, clamped, now, *fields]
        with redis_errors("queueing an action"):
            chosen, created = await self._client.eval(SUBMIT, len(keys), *keys, *args)
        if not created:  # an identical action in flight: its job, as it is now
            return await self.job(_text(chosen))
        return Job(
            name=name,
            action_digest=action_digest,
            action=action,
            command=command,
            instance_name=instance_name,
            requirements=requirements,
            priority=priority,
            cacheable=cacheable,
            queued_at=float(now),
            owners={owner},
        )

    async def job(self, name: str) -> Job:
        with redis_errors("reading an operation"):
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(job_key(name))
            pipe.smembers(owners_key(name))
            fields, owners = await pipe.execute()
        if not fields:
            raise NotFound(f"operation {name!r} not found; it may have expired")
        return _job_of(name, fields, owners)

    async def jobs(self) -> list[Job]:
        """The LISTED newest operations still kept, from every frontend (read
        LIST_BATCH at a time, pipelined, without their leases' payload; names
        whose job has expired are dropped from the list): memory stays bounded
        however busy the service is."""
        with redis_errors("listing operations"):
            names = [_text(n) for n in await self._client.zrevrange(OPS, 0, LISTED - 1)]
        found, gone = [], []
        for start in range(0, len(names), LIST_BATCH):
            batch = names[start : start + LIST_BATCH]
            with redis_errors("listing operations"):
                pipe = self._client.pipeline(transaction=False)
                for name in batch:
                    pipe.hmget(job_key(name), LISTED_FIELDS)
                    pipe.smembers(owners_key(name))
                answers = await pipe.execute()
            for name, values, owners in zip(batch, answers[::2], answers[1::2], strict=True):
                fields = {
                    f.encode(): v
                    for f, v in zip(LISTED_FIELDS, values, strict=True)
                    if v is not None
                }
                if fields:
                    found.append(_job_of(name, fields, owners))
                else:
                    gone.append(name)
        if gone:
            with redis_errors("listing operations"):
                await self._client.zrem(OPS, *gone)
        return found

    async def watch(self, job: Job, quiet: float = 0.0) -> AsyncIterator[Job]:
        """Yield the job now and at each change of stage, until it has been
        yielded done (see Scheduler.watch; `quiet` as there)."""
        event = asyncio.Event()
        self._watchers.setdefault(job.name, set()).add(event)
        try:
            current = job
            if quiet > 0:
                deadline = time.monotonic() + quiet
                while not current.done and (left := deadline - time.monotonic()) > 0:
                    await _wait(event, min(left, POLL_SECONDS))
                    current = await self.job(job.name)
            while True:
                yield current
                if current.done:
                    return
                while True:
                    await _wait(event, POLL_SECONDS)
                    latest = await self.job(job.name)
                    if latest.stage != current.stage or latest.worker != current.worker:
                        current = latest
                        break
        finally:
            watchers = self._watchers.get(job.name, set())
            watchers.discard(event)
            if not watchers:
                self._watchers.pop(job.name, None)

    async def cancel(self, name: str, owner: str | None = None) -> None:
        """As Scheduler.cancel; the frontend of the worker running it tells the
        worker when it next renews its leases."""
        if owner is not None:
            with redis_errors("cancelling an operation"):
                await self._client.srem(owners_key(name), owner)
                if await self._client.scard(owners_key(name)):
                    return
        await self._complete(name, "", _error(code_pb2.CANCELLED, "cancelled by a client"))

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
        self._local[worker] = f"{self._id}:{uuid.uuid4().hex[:8]}"
        await self._register(worker)
        self._registry.append(RemoteWorker(properties, instances, provided))
        self._wake_work()
        log.info("worker %s connected (%d slots, %s)", name, worker.slots, sorted(properties))
        return worker

    def provided(self) -> tuple[str, ...]:
        return common_provided([w.provided for w in self._registry])

    async def next_job(self, worker: WorkerHandle) -> Job:
        """Wait for a free slot and a queued job (from any frontend) this worker
        matches; lease it."""
        instances = "" if worker.instances is None else json.dumps(sorted(worker.instances))
        properties = json.dumps(sorted(worker.properties))
        while True:
            self._work.clear()
            if len(worker.leases) < worker.slots:
                lease = str(uuid.uuid4())
                expiry = int((time.time() + LEASE_SECONDS) * 1000)
                args: list[Arg] = [worker.name, lease, expiry, instances, properties]
                try:
                    with redis_errors("taking a job"):
                        taken = await self._client.eval(TAKE, 1, QUEUE, *args)
                except Unavailable as error:  # a failover: the worker waits, connected
                    log.warning("scheduler: %s", error.message)
                    taken = None
                if taken:
                    name, flat = _text(taken[0]), taken[1]
                    fields = dict(zip(flat[::2], flat[1::2], strict=True))
                    job = _job_of(name, fields, set())
                    _fill_from_assign(job, fields[b"assign"])
                    worker.leases[lease] = job
                    return job
            await _wait(self._work, POLL_SECONDS)

    async def finish(
        self, worker: WorkerHandle, lease_id: str, response: re_pb2.ExecuteResponse
    ) -> None:
        """Complete the job, if the lease still holds it. Through a Redis
        failover it tries again for a while: a result is worth keeping."""
        job = worker.leases.pop(lease_id, None)
        self._wake_work()  # a slot is free
        if job is None:
            return
        for pause in (*FINISH_RETRIES, None):
            try:
                await self._finish(job, lease_id, response)
                return
            except Unavailable as error:
                if pause is None:
                    raise
                log.warning("scheduler: %s; trying again in %gs", error.message, pause)
                await asyncio.sleep(pause)

    async def _finish(self, job: Job, lease_id: str, response: re_pb2.ExecuteResponse) -> None:
        """Store the result (a true result of the action, whoever leases it now),
        then complete the job if the lease still holds it: one script."""
        if response.HasField("result"):
            metadata = response.result.execution_metadata
            metadata.queued_timestamp.FromNanoseconds(int(job.queued_at * 1e9))
        if self._on_complete is not None and response.status.code == code_pb2.OK:
            job.response = response
            try:
                await self._on_complete(job)
            except Exception:
                log.exception("storing the result of %s failed", job.action_digest)
        await self._complete(job.name, lease_id, response)

    async def disconnect(self, worker: WorkerHandle, reason: str) -> None:
        """The worker is gone: its jobs go back in the queue at once. (Once:
        a worker handed back at shutdown is not handed back again.)"""
        registry_id = self._local.pop(worker, None)
        if registry_id is None:
            return
        leases, worker.leases = dict(worker.leases), {}
        log.warning("worker %s lost (%s); %d job(s) to re-run", worker.name, reason, len(leases))
        pairs = [x for lease, job in leases.items() for x in (job.name, lease)]
        self._wake_work()
        await self._reclaim(pairs)  # if Redis is unreachable, the leases expire instead
        with redis_errors("unregistering a worker"):
            await self._client.hdel(WORKERS, registry_id)

    # ------------------------------------------------------------ inside

    async def _complete(self, name: str, lease: str, response: re_pb2.ExecuteResponse) -> bool:
        args: list[Arg] = [name, lease, response.SerializeToString(), repr(time.time())]
        args.append(int(KEEP_COMPLETED))
        with redis_errors("completing an operation"):
            return bool(await self._client.eval(COMPLETE, 1, QUEUE, *args))

    async def _reclaim(self, pairs: Sequence[str] = ()) -> None:
        given_up = _error(code_pb2.UNAVAILABLE, f"worker lost {MAX_ATTEMPTS} times while running")
        args: list[Arg] = [int(time.time() * 1000), given_up.SerializeToString()]
        args += [repr(time.time()), int(KEEP_COMPLETED), *pairs]
        with redis_errors("reclaiming lost leases"):
            await self._client.eval(RECLAIM, 1, QUEUE, *args)

    async def _register(self, worker: WorkerHandle) -> None:
        entry = {
            "properties": sorted(worker.properties),
            "instances": None if worker.instances is None else sorted(worker.instances),
            "provided": list(worker.provided),
            "expires": time.time() + LEASE_SECONDS,
        }
        with redis_errors("registering a worker"):
            await self._client.hset(WORKERS, self._local[worker], json.dumps(entry))

    async def _keep(self) -> None:
        """Renew this frontend's leases and workers; reclaim expired leases
        (anyone's); refresh the view of every frontend's workers."""
        expiry = int((time.time() + LEASE_SECONDS) * 1000)
        for worker in list(self._local):
            if worker not in self._local:
                continue
            await self._register(worker)
            pairs = [x for lease, job in worker.leases.items() for x in (job.name, lease)]
            if not pairs:
                continue
            with redis_errors("renewing leases"):
                lost = {_text(n) for n in await self._client.eval(RENEW, 1, QUEUE, expiry, *pairs)}
            for lease, job in list(worker.leases.items()):
                if job.name in lost:  # cancelled or reclaimed: stop running it
                    del worker.leases[lease]
                    worker.cancels.put_nowait(lease)
        await self._reclaim()
        with redis_errors("forgetting old operations"):
            await self._client.zremrangebyscore(OPS, "-inf", time.time() - LISTED_SECONDS)
        with redis_errors("reading the workers"):
            entries = await self._client.hgetall(WORKERS)
        registry, stale, now = [], [], time.time()
        for key, value in entries.items():
            entry = json.loads(value)
            if entry["expires"] < now:
                stale.append(key)
                continue
            instances = entry["instances"]
            registry.append(
                RemoteWorker(
                    frozenset((k, v) for k, v in entry["properties"]),
                    None if instances is None else frozenset(instances),
                    tuple(entry["provided"]),
                )
            )
        if stale:
            with redis_errors("reading the workers"):
                await self._client.hdel(WORKERS, *stale)
        self._registry = registry

    async def _keep_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                await self._keep()
            except ReapiError as error:
                log.warning("scheduler: %s", error.message)

    async def _listen(self) -> None:
        """Wake local watchers and idle workers on the channels' messages; on
        losing Redis, try its nodes in turn (polling covers the gap)."""
        while True:
            for url in self._target.urls:
                subscriber = redis.asyncio.Redis.from_url(url, socket_connect_timeout=5)
                try:
                    async with subscriber.pubsub() as pubsub:
                        await pubsub.subscribe(CHANGED, QUEUED_CHANNEL)
                        async for message in pubsub.listen():
                            self._on_message(message)
                except (redis.exceptions.RedisError, OSError):
                    pass
                finally:
                    await subscriber.aclose()
                await asyncio.sleep(1.0)

    def _on_message(self, message: dict[str, object]) -> None:
        if message.get("type") != "message":
            return
        if _text(message.get("channel")) == QUEUED_CHANNEL:
            self._wake_work()
            return
        for event in self._watchers.get(_text(message.get("data")), ()):
            event.set()

    def _wake_work(self) -> None:
        self._work.set()


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    event.clear()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _error(code: int, message: str) -> re_pb2.ExecuteResponse:
    return re_pb2.ExecuteResponse(status=status_pb2.Status(code=code, message=message))


def _job_of(name: str, fields: dict[bytes, bytes], owners: set[bytes]) -> Job:
    """A snapshot of the job from its Redis fields."""
    text = {_text(k): v for k, v in fields.items()}
    function, hash_, size = _text(text["action"]).split("/")
    digest_function = DigestFunction.from_path_name(function)
    assert digest_function is not None
    job = Job(
        name=name,
        action_digest=Digest(digest_function, hash_, int(size)),
        action=re_pb2.Action(),
        command=re_pb2.Command(),
        instance_name=_text(text["instance"]),
        requirements=frozenset((k, v) for k, v in json.loads(text["req"])),
        priority=int(text.get("priority", b"0")),
        cacheable=_text(text["cacheable"]) == "1",
        stage=int(text["stage"]),
        attempts=int(text.get("attempts", b"0")),
        queued_at=float(text["queued_at"]),
        completed_at=float(text.get("completed_at", b"0") or 0),
        worker=_text(text.get("worker", b"")),
        lease_id=_text(text.get("lease", b"")),
        owners={_text(o) for o in owners},
    )
    if job.stage == COMPLETED and text.get("response") is not None:
        job.response = re_pb2.ExecuteResponse.FromString(text["response"])
        if not job.finished.done():
            job.finished.set_result(None)
    return job


def _fill_from_assign(job: Job, data: bytes) -> None:
    assign = worker_pb2.Assign.FromString(data)
    job.action, job.command = assign.action, assign.command
    job.input_directories = list(assign.input_directories)
