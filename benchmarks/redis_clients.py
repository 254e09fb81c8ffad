#!/usr/bin/env python3
"""Async Redis clients for the shared state: redis-py's asyncio API against coredis.

Starts its own Redis processes on free loopback ports in a temporary directory: one
standalone server, and a Redis Cluster of 3 masters with a replica each (made with
``redis-cli --cluster create``). Then drives each with both clients from asyncio, in
the shapes the CAS and the scheduler would use:

- exists-batch: EXISTS of 1,000 keys a call in one pipeline, one answer per key (what
  FindMissingBlobs needs); on the cluster with the keys spread over slots, and with
  every key under the hash tag ``{x}``;
- exists-script: the same answers from one EVAL of a Lua script running EXISTS on each
  key (standalone, and on the cluster under ``{x}``: a script's keys share a slot);
- exists-count: the same 1,000 keys in one multi-key EXISTS, which only says how many
  exist (on the cluster the client has to split it by slot);
- small-get: single GETs of 1 KiB values from 64 concurrent tasks;
- small-set-pipeline: 100 SETs of 4 KiB values a pipeline;
- large-value: SET then GET of one 1 MiB, and one 16 MiB, value.

Every figure is the median of 3 repetitions (the order of the clients alternates).
Commands per operation come from the masters' ``INFO commandstats`` before and after
each measurement, and the connections the client holds from their ``INFO clients`` at
its end. Last, a check that each client follows MOVED once slots have moved under it
(``redis-cli --cluster reshard``).

    python benchmarks/redis_clients.py           # about 2.5 minutes on 2 cores
    python benchmarks/redis_clients.py --quick   # one short repetition, a check that it works

Needs ``redis-server`` and ``redis-cli`` (Debian: redis-server, redis-tools) and
``pip install redis coredis``. Only 127.0.0.1 is used. Every Redis process is stopped at
the end, on error, on Ctrl-C and on SIGTERM. The table goes to stdout, progress to
stderr; see benchmarks/README.md for a run.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.processes import log_tail, supervised
from tests.redis_servers import RedisStartError, free_ports, wait_until

HOST = "127.0.0.1"
KIB = 1024
MIB = 1024 * 1024
REDIS_PY = "redis-py"
COREDIS = "coredis"
LIBRARIES = (REDIS_PY, COREDIS)
# Commands the benchmark itself sends (INFO) or that replicas send (REPLCONF ACK).
NOT_COUNTED = {"info", "replconf"}
# One EXISTS a key inside the server: one command, one answer a key.
EXISTS_EACH_LUA = """\
local found = {}
for i, key in ipairs(KEYS) do found[i] = redis.call('EXISTS', key) end
return found
"""


class BenchError(Exception):
    """Redis could not be started, or a client returned a wrong answer."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load(module: str) -> Any:
    """Import a client library untyped.

    mypy checks benchmarks/ in CI, where neither client is installed, so they are not
    imported by name.
    """
    return importlib.import_module(module)


# --------------------------------------------------------------------------- servers


def server_argv(port: int, directory: Path, cluster: bool) -> list[str]:
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--dir", str(directory)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    if cluster:
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        argv += ["--cluster-node-timeout", "5000"]
    return argv


@contextlib.contextmanager
def redis_server(workdir: Path, port: int, cluster: bool) -> Iterator[subprocess.Popen[bytes]]:
    """Run one redis-server for the duration of the block; SIGTERM (then SIGKILL) it after."""
    directory = workdir / f"redis-{port}"
    directory.mkdir()
    with supervised(server_argv(port, directory, cluster), directory / "redis.log") as proc:
        yield proc


class Admin:
    """Synchronous redis-py connections to every node, for set-up and counters only."""

    def __init__(self) -> None:
        self.clients: dict[int, Any] = {}

    def __call__(self, port: int) -> Any:
        if port not in self.clients:
            redis = load("redis")
            self.clients[port] = redis.Redis(
                host=HOST, port=port, decode_responses=True, socket_timeout=30
            )
        return self.clients[port]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    ports: list[int]
    masters: list[int]

    @property
    def cluster(self) -> bool:
        return len(self.ports) > 1


@dataclasses.dataclass(frozen=True)
class Counters:
    commands: int  # processed so far, but INFO and REPLCONF
    connections: int  # client connections open now, but our own (replicas are not counted)


def counters(admin: Admin, ports: Sequence[int]) -> Counters:
    """The counters summed over the ports (the masters: replicas only replay writes)."""
    commands = connections = 0
    for port in ports:
        info = admin(port).info("clients", "commandstats")
        connections += int(info["connected_clients"]) - 1
        for name, stats in info.items():
            if name.startswith("cmdstat_") and name[8:].split("|")[0] not in NOT_COUNTED:
                commands += int(stats["calls"])
    return Counters(commands, connections)


def check_call(argv: list[str], log_path: Path) -> None:
    with open(log_path, "ab") as log_file:
        status = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        ).returncode
    if status != 0:
        raise BenchError(f"{shlex.join(argv)} exited with {status}:\n" + log_tail(log_path))


def answers(admin: Admin, port: int) -> bool:
    return bool(admin(port).ping())


def cluster_ready(admin: Admin, ports: Sequence[int]) -> bool:
    """Every node says cluster_state:ok and knows every node; every replica is in sync."""
    for port in ports:
        info = admin(port).execute_command("CLUSTER", "INFO")
        text = info if isinstance(info, str) else str(info)
        if "cluster_state:ok" not in text or f"cluster_known_nodes:{len(ports)}" not in text:
            return False
        replication = admin(port).info("replication")
        if replication["role"] != "master" and replication["master_link_status"] != "up":
            return False
    return True


def start_standalone(stack: contextlib.ExitStack, workdir: Path, admin: Admin) -> Topology:
    (port,) = free_ports(1)
    stack.enter_context(redis_server(workdir, port, cluster=False))
    wait_until(f"redis-server on {port}", functools.partial(answers, admin, port), 30)
    return Topology("standalone", [port], [port])


def start_cluster(stack: contextlib.ExitStack, workdir: Path, admin: Admin) -> Topology:
    """Six nodes, then `redis-cli --cluster create` with one replica a master."""
    ports = free_ports(6)
    for port in ports:
        stack.enter_context(redis_server(workdir, port, cluster=True))
    for port in ports:
        wait_until(f"redis-server on {port}", functools.partial(answers, admin, port), 30)
    addresses = [f"{HOST}:{port}" for port in ports]
    log(f"creating the cluster on {' '.join(addresses)}")
    argv = ["redis-cli", "--cluster", "create", *addresses]
    check_call([*argv, "--cluster-replicas", "1", "--cluster-yes"], workdir / "cluster.log")
    wait_until("the cluster", lambda: cluster_ready(admin, ports), 60)
    masters = [p for p in ports if admin(p).info("replication")["role"] == "master"]
    return Topology("cluster", ports, masters)


def flush(admin: Admin, topology: Topology) -> None:
    for port in topology.masters:
        admin(port).flushall()


def redis_server_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("v", out.strip())


# --------------------------------------------------------------------------- clients


class Client(abc.ABC):
    """What the benchmark needs from a client library: the same calls on both
    (single GET and SET are spelled alike in both libraries)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @abc.abstractmethod
    async def exists_each(self, keys: Sequence[bytes]) -> list[bool]:
        """One EXISTS a key, in one pipeline."""

    @abc.abstractmethod
    async def exists_script(self, keys: Sequence[bytes]) -> list[bool]:
        """One EVAL of EXISTS_EACH_LUA over the keys."""

    @abc.abstractmethod
    async def exists_count(self, keys: Sequence[bytes]) -> int:
        """One multi-key EXISTS: how many of the keys exist."""

    async def get(self, key: bytes) -> bytes | None:
        value: bytes | None = await self.client.get(key)
        return value

    async def set(self, key: bytes, value: bytes) -> None:
        await self.client.set(key, value)

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """One GET a key, in one pipeline."""

    @abc.abstractmethod
    async def set_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """One SET a key, in one pipeline."""


class RedisPyClient(Client):
    """redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster: the same calls."""

    async def exists_each(self, keys: Sequence[bytes]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [bool(n) for n in await pipe.execute()]

    async def exists_script(self, keys: Sequence[bytes]) -> list[bool]:
        return [bool(n) for n in await self.client.eval(EXISTS_EACH_LUA, len(keys), *keys)]

    async def exists_count(self, keys: Sequence[bytes]) -> int:
        return int(await self.client.exists(*keys))

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return list(await pipe.execute())

    async def set_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value)
        await pipe.execute()


class CoredisClient(Client):
    """coredis.Redis or coredis.RedisCluster: a pipeline runs when its block exits."""

    async def exists_each(self, keys: Sequence[bytes]) -> list[bool]:
        async with self.client.pipeline(transaction=False) as pipe:
            requests = [pipe.exists([key]) for key in keys]
        return [bool(await r) for r in requests]

    async def exists_script(self, keys: Sequence[bytes]) -> list[bool]:
        return [bool(n) for n in await self.client.eval(EXISTS_EACH_LUA, keys=keys)]

    async def exists_count(self, keys: Sequence[bytes]) -> int:
        return int(await self.client.exists(keys))

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        async with self.client.pipeline(transaction=False) as pipe:
            requests = [pipe.get(key) for key in keys]
        return [await r for r in requests]

    async def set_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(key, value)


@contextlib.asynccontextmanager
async def open_client(library: str, topology: Topology) -> AsyncIterator[Client]:
    """A fresh client of the library for the topology, closed after the block."""
    port = topology.ports[0]
    if library == REDIS_PY:
        if topology.cluster:
            client = load("redis.asyncio.cluster").RedisCluster(host=HOST, port=port)
        else:
            client = load("redis.asyncio").Redis(host=HOST, port=port)
        try:
            yield RedisPyClient(client)
        finally:
            await client.aclose()
    else:
        coredis = load("coredis")
        if topology.cluster:
            client = coredis.RedisCluster(host=HOST, port=port)
        else:
            client = coredis.Redis(host=HOST, port=port)
        # coredis 6 runs its connections in a task group: the client is a context manager.
        async with client:
            yield CoredisClient(client)


def library_versions() -> dict[str, str]:
    hiredis = load("redis.utils").HIREDIS_AVAILABLE
    return {
        REDIS_PY: load("redis").__version__ + (" (hiredis)" if hiredis else " (no hiredis)"),
        COREDIS: load("coredis").__version__,
    }


# --------------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Params:
    exists_keys: int  # keys per EXISTS call
    exists_calls: int
    get_tasks: int
    gets_per_task: int
    get_keys: int  # distinct keys the GETs read
    get_value: int
    set_batch: int  # SETs per pipeline
    set_value: int
    set_pipelines: int
    large: tuple[tuple[int, int], ...]  # (value size, SET+GET pairs)


FULL = Params(
    exists_keys=1000,
    exists_calls=60,
    get_tasks=64,
    gets_per_task=200,
    get_keys=1000,
    get_value=1 * KIB,
    set_batch=100,
    set_value=4 * KIB,
    set_pipelines=60,
    large=((1 * MIB, 20), (16 * MIB, 4)),
)
QUICK = dataclasses.replace(
    FULL, exists_calls=10, gets_per_task=20, set_pipelines=10, large=((MIB, 4), (16 * MIB, 1))
)
WARMUP = dataclasses.replace(
    FULL, exists_calls=2, gets_per_task=2, set_pipelines=2, large=((MIB, 1), (16 * MIB, 1))
)


@dataclasses.dataclass
class Meter:
    """The measured window: wall time and the masters' counters around it."""

    admin: Admin
    topology: Topology
    seconds: float = 0.0
    commands: int = 0
    connections: int = 0
    _start: float = 0.0
    _before: Counters | None = None

    def start(self) -> None:
        self._before = counters(self.admin, self.topology.masters)
        self._start = time.perf_counter()

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self._start
        after = counters(self.admin, self.topology.masters)
        assert self._before is not None
        self.commands = after.commands - self._before.commands
        self.connections = after.connections


@dataclasses.dataclass(frozen=True)
class Timing:
    ops: int
    amount: float  # keys, values or MB: what the throughput counts
    latencies: list[float]  # seconds, one per operation


def make_key(tagged: bool) -> bytes:
    """A key like the CAS's: a SHA-256 in hex, under the hash tag {x} when tagged."""
    digest = os.urandom(32).hex().encode()
    return b"cas:{x}:" + digest if tagged else b"cas:" + digest


async def populate(client: Client, items: Sequence[tuple[bytes, bytes]]) -> None:
    for i in range(0, len(items), 500):
        await client.set_many(items[i : i + 500])


def exists_batches(p: Params, present: list[bytes], tagged: bool) -> list[list[bytes]]:
    """Batches of p.exists_keys keys, half of them present, in random order."""
    batches = []
    for _ in range(p.exists_calls):
        half = p.exists_keys // 2
        batch = random.sample(present, half)
        batch += [make_key(tagged) for _ in range(p.exists_keys - half)]
        random.shuffle(batch)
        batches.append(batch)
    return batches


async def answer_each(
    client: Client,
    call: Callable[[Sequence[bytes]], Awaitable[list[bool]]],
    p: Params,
    tagged: bool,
    meter: Meter,
) -> Timing:
    """Answers for every key of a batch, through `call`; they are checked after the timing."""
    present = [make_key(tagged) for _ in range(p.exists_keys * 2)]
    await populate(client, [(key, b"1") for key in present])
    batches = exists_batches(p, present, tagged)
    answers, latencies = [], []
    meter.start()
    for batch in batches:
        start = time.perf_counter()
        answers.append(await call(batch))
        latencies.append(time.perf_counter() - start)
    meter.stop()
    stored = set(present)
    for batch, found in zip(batches, answers, strict=True):
        if found != [key in stored for key in batch]:
            raise BenchError("EXISTS: wrong answers")
    return Timing(len(batches), p.exists_keys * len(batches), latencies)


async def exists_batch(client: Client, p: Params, tagged: bool, meter: Meter) -> Timing:
    return await answer_each(client, client.exists_each, p, tagged, meter)


async def exists_script(client: Client, p: Params, tagged: bool, meter: Meter) -> Timing:
    return await answer_each(client, client.exists_script, p, tagged, meter)


async def exists_count(client: Client, p: Params, tagged: bool, meter: Meter) -> Timing:
    present = [make_key(tagged) for _ in range(p.exists_keys * 2)]
    await populate(client, [(key, b"1") for key in present])
    batches = exists_batches(p, present, tagged)
    answers, latencies = [], []
    meter.start()
    for batch in batches:
        start = time.perf_counter()
        answers.append(await client.exists_count(batch))
        latencies.append(time.perf_counter() - start)
    meter.stop()
    if any(n != p.exists_keys // 2 for n in answers):
        raise BenchError(f"multi-key EXISTS: counted {answers[:3]}, expected {p.exists_keys // 2}")
    return Timing(len(batches), p.exists_keys * len(batches), latencies)


async def small_get(client: Client, p: Params, tagged: bool, meter: Meter) -> Timing:
    values = {make_key(tagged): os.urandom(p.get_value) for _ in range(p.get_keys)}
    await populate(client, list(values.items()))
    keys = list(values)
    shares = [random.choices(keys, k=p.gets_per_task) for _ in range(p.get_tasks)]
    latencies: list[float] = []
    wrong = 0

    async def task(share: list[bytes]) -> None:
        nonlocal wrong
        for key in share:
            start = time.perf_counter()
            value = await client.get(key)
            latencies.append(time.perf_counter() - start)
            wrong += value != values[key]

    meter.start()
    async with asyncio.TaskGroup() as tasks:
        for share in shares:
            tasks.create_task(task(share))
    meter.stop()
    if wrong:
        raise BenchError(f"GET: {wrong} wrong values")
    return Timing(len(latencies), len(latencies), latencies)


async def small_set_pipeline(client: Client, p: Params, tagged: bool, meter: Meter) -> Timing:
    batches = [
        [(make_key(tagged), os.urandom(p.set_value)) for _ in range(p.set_batch)]
        for _ in range(p.set_pipelines)
    ]
    latencies = []
    meter.start()
    for batch in batches:
        start = time.perf_counter()
        await client.set_many(batch)
        latencies.append(time.perf_counter() - start)
    meter.stop()
    sample = random.choice(batches)
    if await client.get_many([k for k, _ in sample]) != [v for _, v in sample]:
        raise BenchError("SET pipeline: values read back differ")
    return Timing(len(batches), p.set_batch * len(batches), latencies)


async def large_value(client: Client, size: int, count: int, tagged: bool, meter: Meter) -> Timing:
    items = [(make_key(tagged), os.urandom(size)) for _ in range(count)]
    latencies = []
    wrong = 0
    meter.start()
    for key, value in items:
        start = time.perf_counter()
        await client.set(key, value)
        wrong += await client.get(key) != value
        latencies.append(time.perf_counter() - start)
    meter.stop()
    if wrong:
        raise BenchError(f"large values: {wrong} read back wrong")
    return Timing(count, 2 * size * count / 1e6, latencies)


Run = Callable[[Client, Params, bool, Meter], Awaitable[Timing]]


@dataclasses.dataclass(frozen=True)
class Case:
    workload: str
    layout: str  # "standalone", "cluster, spread" or "cluster, {x}"
    op: str  # what one operation is
    unit: str  # what the throughput counts, per second
    tagged: bool
    run: Run


def size_name(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def large_run(size: int, count: int) -> Run:
    async def run(client: Client, p: Params, tagged: bool, meter: Meter) -> Timing:
        return await large_value(client, size, count, tagged, meter)

    return run


def cases(topology: Topology, p: Params) -> list[Case]:
    """Every measurement on the topology: the cluster also with every key under {x}."""
    layouts = [("cluster, spread", False), ("cluster, {x}", True)]
    if not topology.cluster:
        layouts = [("standalone", False)]
    spread = layouts[:1]
    exists = f"EXISTS x{p.exists_keys}"
    found: list[Case] = []
    for layout, tagged in layouts:
        found.append(
            Case("exists-batch", layout, f"{exists}, pipeline", "keys", tagged, exists_batch)
        )
        if layout != "cluster, spread":  # a script's keys must share a slot
            op = f"{exists}, one Lua script"
            found.append(Case("exists-script", layout, op, "keys", tagged, exists_script))
        op = f"{exists}, one command (a count)"
        found.append(Case("exists-count", layout, op, "keys", tagged, exists_count))
    for layout, tagged in spread:
        found.append(
            Case(
                "small-get",
                layout,
                f"GET {size_name(p.get_value)}, {p.get_tasks} tasks",
                "GETs",
                tagged,
                small_get,
            )
        )
    for layout, tagged in layouts:
        op = f"SET {size_name(p.set_value)} x{p.set_batch}, pipeline"
        found.append(Case("small-set-pipeline", layout, op, "values", tagged, small_set_pipeline))
    for layout, tagged in spread:
        for size, count in p.large:
            op = f"SET+GET {size_name(size)}"
            found.append(Case("large-value", layout, op, "MB", tagged, large_run(size, count)))
    return found


# --------------------------------------------------------------------------- measuring


@dataclasses.dataclass(frozen=True)
class Sample:
    ops_per_s: float
    amount_per_s: float
    p50_ms: float
    p99_ms: float
    commands_per_op: float
    connections: float


# (topology, workload, layout, op) -> library -> one sample per repetition
RowKey = tuple[str, str, str, str]
Results = dict[RowKey, dict[str, list[Sample]]]
Errors = dict[RowKey, dict[str, str]]


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def sample(timing: Timing, meter: Meter) -> Sample:
    return Sample(
        ops_per_s=timing.ops / meter.seconds,
        amount_per_s=timing.amount / meter.seconds,
        p50_ms=percentile(timing.latencies, 50) * 1e3,
        p99_ms=percentile(timing.latencies, 99) * 1e3,
        commands_per_op=meter.commands / timing.ops,
        connections=meter.connections,
    )


def row_keys(topology: Topology, p: Params) -> list[RowKey]:
    return [(topology.name, c.workload, c.layout, c.op) for c in cases(topology, p)]


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:160]


async def run_cases(
    library: str,
    topology: Topology,
    admin: Admin,
    p: Params,
    results: Results,
    errors: Errors,
) -> None:
    """Each case once with a fresh client, warmed up first (its connections, its slot map).

    A failing case is recorded in `errors` and the rest go on.
    """
    async with open_client(library, topology) as client:
        for params, record in ((WARMUP, False), (p, True)):
            for case, key in zip(cases(topology, params), row_keys(topology, p), strict=True):
                flush(admin, topology)
                meter = Meter(admin, topology)
                try:
                    timing = await case.run(client, params, case.tagged, meter)
                except Exception as e:  # a client failing is a result too
                    errors.setdefault(key, {})[library] = describe(e)
                    log(f"  {library} {' '.join(key)}: {describe(e)}")
                    continue
                if record:
                    measured = sample(timing, meter)
                    results.setdefault(key, {}).setdefault(library, []).append(measured)
                    log(f"  {' '.join(key[1:])}: {fmt(measured.ops_per_s)} ops/s")
    flush(admin, topology)


async def benchmark(
    topologies: list[Topology], admin: Admin, p: Params, repeats: int
) -> tuple[Results, Errors]:
    results: Results = {}
    errors: Errors = {}
    for rep in range(repeats):
        # Alternate who goes first, so a drift of the machine's speed hits both alike.
        for library in LIBRARIES if rep % 2 == 0 else LIBRARIES[::-1]:
            for topology in topologies:
                log(f"rep {rep + 1}/{repeats}: {library} on {topology.name}")
                await run_cases(library, topology, admin, p, results, errors)
    return results, errors


# --------------------------------------------------------------------------- MOVED


def node_id(admin: Admin, port: int) -> str:
    return str(admin(port).execute_command("CLUSTER", "MYID"))


async def reshard(admin: Admin, topology: Topology, slots: int, workdir: Path) -> int:
    """Move `slots` slots (and their keys) between two masters; return the keys moved."""
    source, target = topology.masters[0], topology.masters[1]
    before = admin(source).dbsize()
    argv = ["redis-cli", "--cluster", "reshard", f"{HOST}:{source}"]
    argv += ["--cluster-from", node_id(admin, source), "--cluster-to", node_id(admin, target)]
    argv += ["--cluster-slots", str(slots), "--cluster-yes"]
    log(f"moving {slots} slots from {source} to {target}")
    await asyncio.to_thread(check_call, argv, workdir / "reshard.log")
    await asyncio.to_thread(
        wait_until, "the cluster", lambda: cluster_ready(admin, topology.ports), 60
    )
    return int(before - admin(source).dbsize())


async def check_moved(topology: Topology, admin: Admin, workdir: Path) -> list[str]:
    """Warm two clients of each library, move slots under them, read every key back.

    One client reads with single GETs and the other with one pipeline, each with the
    slot map it had before the move.
    """
    values = {make_key(False): os.urandom(64) for _ in range(2000)}
    keys = list(values)
    expected = [values[k] for k in keys]
    lines = []
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            (library, way): await stack.enter_async_context(open_client(library, topology))
            for library in LIBRARIES
            for way in ("single GETs", "one pipeline")
        }
        await populate(clients[(REDIS_PY, "single GETs")], list(values.items()))
        for client in clients.values():
            if await client.get_many(keys) != expected:
                raise BenchError("MOVED check: wrong values before the move")
        moved = await reshard(admin, topology, 4000, workdir)
        lines.append(f"{moved} of {len(keys)} keys moved with their slots")
        for (library, way), client in clients.items():
            try:
                if way == "single GETs":
                    got = [await client.get(k) for k in keys]
                else:
                    got = await client.get_many(keys)
                verdict = "all values right" if got == expected else "**wrong values**"
            except Exception as e:  # what the client did is the result
                verdict = f"**failed**: {describe(e)}"
            lines.append(f"{library}, {way} after the move: {verdict}")
    flush(admin, topology)
    return lines


# --------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def median_sample(samples: list[Sample]) -> Sample:
    fields = [f.name for f in dataclasses.fields(Sample)]
    return Sample(**{name: statistics.median(getattr(s, name) for s in samples) for name in fields})


def table(topologies: list[Topology], p: Params, results: Results, errors: Errors) -> str:
    header = ["workload", "topology", "operation", "client", "ops/s", "throughput"]
    header += ["p50 ms", "p99 ms", "cmds/op", "conns"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * 6]
    for topology in topologies:
        for case, key in zip(cases(topology, p), row_keys(topology, p), strict=True):
            for library in LIBRARIES:
                cells = [case.workload, case.layout, case.op, library]
                samples = results.get(key, {}).get(library)
                error = errors.get(key, {}).get(library)
                if error or not samples:
                    cells += [f"**failed**: {error}", "", "", "", "", ""]
                else:
                    m = median_sample(samples)
                    cells += [
                        fmt(m.ops_per_s),
                        f"{fmt(m.amount_per_s)} {case.unit}/s",
                        fmt(m.p50_ms),
                        fmt(m.p99_ms),
                        fmt(m.commands_per_op),
                        f"{m.connections:.0f}",
                    ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="redis-py's asyncio API against coredis, on Redis and Redis Cluster."
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="one short repetition: a check that it works")
    add("--repeats", type=int, help="repetitions; medians are reported (default 3, quick 1)")
    add("--no-moved-check", action="store_true", help="skip the MOVED check at the end")
    return parser.parse_args(argv)


async def run(
    args: argparse.Namespace, workdir: Path
) -> tuple[list[Topology], Results, Errors, list[str]]:
    """Start both topologies, measure, check MOVED; stop every Redis process after."""
    p = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    admin = Admin()
    with contextlib.ExitStack() as stack:
        stack.callback(admin.close)
        topologies = [start_standalone(stack, workdir, admin), start_cluster(stack, workdir, admin)]
        results, errors = await benchmark(topologies, admin, p, repeats)
        moved = [] if args.no_moved_check else await check_moved(topologies[1], admin, workdir)
    return topologies, results, errors, moved


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    p = QUICK if args.quick else FULL
    try:
        versions = library_versions()
    except ImportError as e:
        log(f"error: {e}; pip install redis coredis")
        return 1
    host = (
        f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.2f} at start), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"Redis {redis_server_version()}, "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="redis-bench-") as tmp:

        async def main_task() -> tuple[list[Topology], Results, Errors, list[str]]:
            # SIGTERM unwinds like Ctrl-C does, so the servers are stopped either way.
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            return await run(args, Path(tmp))

        try:
            topologies, results, errors, moved = asyncio.run(main_task())
        except (BenchError, RedisStartError) as e:
            log(f"error: {e}")
            return 1
        except (KeyboardInterrupt, asyncio.CancelledError):
            log("interrupted")
            return 130

    repeats = args.repeats or (1 if args.quick else 3)
    print(f"Command: `{shlex.join(['python', 'benchmarks/redis_clients.py', *argv])}`")
    print()
    print(f"Host: {host}. Median of {repeats}; run took {time.monotonic() - started:.0f} s.")
    print()
    print(table(topologies, p, results, errors))
    if moved:
        print()
        print("MOVED check: " + "; ".join(moved) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
