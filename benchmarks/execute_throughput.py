#!/usr/bin/env python3
"""Execute throughput of trivial actions from many concurrent clients, with the
scheduler's state in Redis, on one frontend and on two.

Starts one standalone redis-server, then for each configuration its own
frontends (`reapi serve --workers 0`) and W external workers
(`reapi worker --sandbox none --slots S`):

- embedded (with --embedded, for reference): one `reapi serve --storage DIR`,
  no Redis, every worker connected to it;
- 1 frontend: one `reapi serve --redis URL`, every worker connected to it;
- 2 frontends: two `reapi serve --redis URL` on the same Redis, the workers
  split between them (each given both addresses, its own frontend first), and
  the clients too.

Each configuration uploads N + warmup distinct Actions (`/bin/true`, differing
only in their salt, so each one really runs), runs the warmup ones, then times
N Execute calls made by --clients asyncio tasks over --channels gRPC channels.
Reported, the median of --repeats runs (the order of the configurations
alternates from one repetition to the next):

- actions/s;
- CPU milliseconds per action of the frontend(s), redis-server, the workers
  (with the actions they ran: utime + stime + cutime + cstime of
  /proc/PID/stat) and this benchmark's client (utime + stime), from before to
  after the timed phase;
- Redis commands per action: the `calls` of `INFO commandstats`, every command
  but INFO, before and after the timed phase. Commands a Lua script runs count
  too, as well as the script's EVALSHA; so does any background work of the
  frontends (lease renewals, heartbeats) during the phase;
- on the single frontend, the Redis commands of one FindMissingBlobs of 1,000
  digests, all absent and all present.

    python benchmarks/execute_throughput.py [--actions 2000] [--repeats 3] [--embedded]
    python benchmarks/execute_throughput.py --actions 100 --repeats 1   # a check that it works

Needs redis-server (Debian: redis-server). Only 127.0.0.1 is used. Every process is
stopped at the end, on error, on Ctrl-C and on SIGTERM. The table goes to stdout,
progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import grpc
import redis

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cas.remote import RemoteStore  # noqa: E402
from reapi.core.digests import Digest, DigestFunction  # noqa: E402
from tests.actions import execute, upload_action  # noqa: E402
from tests.helpers import ServerProcess, WorkerProcess  # noqa: E402
from tests.redis_servers import standalone  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
COMPONENTS = ("frontends", "redis", "workers", "client")
FIND_MISSING_DIGESTS = 1000


class BenchError(Exception):
    """An action failed, or a FindMissingBlobs answer was wrong."""


@dataclasses.dataclass(frozen=True)
class Config:
    key: str
    label: str
    frontends: int
    redis: bool


EMBEDDED = Config("embedded", "embedded, no Redis", 1, False)
ONE = Config("one", "1 frontend + Redis", 1, True)
TWO = Config("two", "2 frontends + Redis", 2, True)


@dataclasses.dataclass
class Result:
    rate: float  # actions/s
    cpu: dict[str, float]  # component -> CPU seconds per action
    redis_commands: float | None  # per action
    find_missing: tuple[int, int] | None = None  # commands: all absent, all present
    # What the frontends send Redis (a script counts once; MONITOR's view): per
    # Execute, and per FindMissingBlobs of 1,000 digests.
    sent_per_action: float | None = None
    sent_per_find_missing: int | None = None


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_seconds(pid: int, children: bool) -> float:
    """utime + stime (+ cutime + cstime: fields 14-17) of /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as file:
        # After the command name (in parentheses, may hold spaces): field 3 on.
        fields = file.read().rsplit(")", 1)[1].split()
    ticks = fields[11:15] if children else fields[11:13]
    return sum(int(tick) for tick in ticks) / CLOCK_TICKS


def redis_commands(client: redis.Redis | None) -> int:
    """Commands Redis has run so far, INFO (ours) not counted."""
    if client is None:
        return 0
    stats = client.info("commandstats")
    return sum(int(stat["calls"]) for name, stat in stats.items() if name != "cmdstat_info")


@dataclasses.dataclass
class SharedRedis:
    pid: int
    url: str
    client: redis.Redis


@dataclasses.dataclass
class Measured:
    """What the timed phase reads before and after."""

    pids: dict[str, list[int]]  # frontends, redis, workers
    redis_client: redis.Redis | None
    url: str = ""

    def snapshot(self) -> tuple[float, dict[str, float], int]:
        cpu = {
            component: sum(cpu_seconds(pid, children=True) for pid in pids)
            for component, pids in self.pids.items()
        }
        cpu["client"] = cpu_seconds(os.getpid(), children=False)
        return time.perf_counter(), cpu, redis_commands(self.redis_client)


async def upload_all(
    channels: Sequence[grpc.aio.Channel], salts: list[bytes], tasks: int
) -> list[Digest]:
    """The Actions of `/bin/true` with these salts, uploaded by `tasks` tasks."""
    digests: dict[int, Digest] = {}
    pending = iter(enumerate(salts))

    async def uploader(channel: grpc.aio.Channel) -> None:
        for index, salt in pending:
            digests[index] = await upload_action(channel, ["/bin/true"], salt=salt)

    await asyncio.gather(*(uploader(channels[n % len(channels)]) for n in range(tasks)))
    return [digests[index] for index in range(len(salts))]


async def execute_all(
    channels: Sequence[grpc.aio.Channel], actions: list[Digest], clients: int
) -> None:
    """`clients` tasks, spread over the channels, execute the actions, each the next one left."""
    pending = iter(actions)

    async def client(channel: grpc.aio.Channel) -> None:
        for action in pending:
            _operations, response = await execute(channel, action)
            if response.status.code or response.result.exit_code or response.cached_result:
                raise BenchError(f"action {action}: unexpected response {response}")

    await asyncio.gather(*(client(channels[n % len(channels)]) for n in range(clients)))


async def find_missing_commands(
    channel: grpc.aio.Channel, client: redis.Redis, salt: str
) -> tuple[int, int]:
    """Redis commands of one FindMissingBlobs of 1,000 absent, then 1,000 present, digests."""
    store = RemoteStore(channel)
    found = []
    for present in (False, True):
        blobs = [f"{salt}-{present}-{n}".encode() for n in range(FIND_MISSING_DIGESTS)]
        digests = [DigestFunction.SHA256.digest_of(blob) for blob in blobs]
        if present:
            await store.put_many(list(zip(digests, blobs, strict=True)))
        before = redis_commands(client)
        missing = await store.find_missing(digests)
        found.append(redis_commands(client) - before)
        if len(missing) != (0 if present else len(digests)):
            raise BenchError(f"FindMissingBlobs: {len(missing)} missing of {len(digests)}")
    return found[0], found[1]


MONITORED_ACTIONS = 50


@contextlib.contextmanager
def monitored(url: str, log: Path) -> Iterator[Callable[[], int]]:
    """`redis-cli monitor` for the block; yields a function counting the
    commands clients sent so far (not those a script ran: MONITOR marks them
    "[0 lua]"), the monitor's own connection aside."""
    port = url.rsplit(":", 1)[1]
    with open(log, "wb") as out:
        monitor = subprocess.Popen(
            ["redis-cli", "-h", "127.0.0.1", "-p", port, "monitor"], stdout=out
        )
    try:
        time.sleep(0.3)  # its "OK", before anything is counted

        def sent() -> int:
            lines = log.read_text(errors="replace").splitlines()
            return sum(1 for line in lines if '"' in line and " lua]" not in line)

        yield sent
    finally:
        monitor.terminate()
        monitor.wait()


async def count_sent(
    channels: Sequence[grpc.aio.Channel], url: str, workdir: Path, salt: str
) -> tuple[float, int]:
    """Commands sent to Redis per Execute (MONITORED_ACTIONS of them, one at a
    time, so background work is a small share) and per FindMissingBlobs of
    FIND_MISSING_DIGESTS present digests. MONITOR slows Redis: only here."""
    salts = [f"{salt}-monitored-{n}".encode() for n in range(MONITORED_ACTIONS)]
    actions = await upload_all(channels, salts, 1)
    store = RemoteStore(channels[0])
    blobs = [f"{salt}-monitored-{n}".encode() for n in range(FIND_MISSING_DIGESTS)]
    digests = [DigestFunction.SHA256.digest_of(blob) for blob in blobs]
    await store.put_many(list(zip(digests, blobs, strict=True)))
    with monitored(url, workdir / "monitor.log") as sent:
        before = sent()
        await execute_all(channels[:1], actions, 1)
        await asyncio.sleep(0.3)
        per_action = (sent() - before) / MONITORED_ACTIONS
        before = sent()
        await store.find_missing(digests)
        await asyncio.sleep(0.3)
        per_find_missing = sent() - before
    return per_action, per_find_missing


async def drive(
    config: Config,
    args: argparse.Namespace,
    addresses: list[str],
    measured: Measured,
    salt: str,
    workdir: Path,
) -> Result:
    channels = [
        grpc.aio.insecure_channel(addresses[n % len(addresses)]) for n in range(args.channels)
    ]
    try:
        salts = [f"{salt}-{n}".encode() for n in range(args.warmup + args.actions)]
        actions = await upload_all(channels, salts, args.clients)
        await execute_all(channels, actions[: args.warmup], args.clients)
        start, cpu_before, commands_before = measured.snapshot()
        await execute_all(channels, actions[args.warmup :], args.clients)
        end, cpu_after, commands_after = measured.snapshot()
        result = Result(
            rate=args.actions / (end - start),
            cpu={c: (cpu_after[c] - cpu_before[c]) / args.actions for c in COMPONENTS},
            redis_commands=(commands_after - commands_before) / args.actions
            if config.redis
            else None,
        )
        if config is ONE and measured.redis_client is not None:
            result.find_missing = await find_missing_commands(
                channels[0], measured.redis_client, salt
            )
            result.sent_per_action, result.sent_per_find_missing = await count_sent(
                channels, measured.url, workdir, salt
            )
        return result
    finally:
        for channel in channels:
            await channel.close()


def stop_worker(worker: WorkerProcess) -> None:
    try:
        worker.stop()
    except subprocess.TimeoutExpired:
        worker.process.kill()
        worker.process.wait()


def run(
    config: Config,
    args: argparse.Namespace,
    workdir: Path,
    shared: SharedRedis,
) -> Result:
    """Start the configuration's frontends and workers, measure, stop them."""
    workdir.mkdir()
    redis_used = shared if config.redis else None
    with contextlib.ExitStack() as stack:
        frontends = []
        for n in range(config.frontends):
            storage = workdir / f"frontend{n}"
            urls = [redis_used.url] if redis_used else None
            frontend = ServerProcess(storage, workers=0, home=workdir / f"home{n}", redis=urls)
            stack.callback(frontend.stop)
            frontends.append(frontend)
        workers = []
        for n in range(args.workers):
            own = frontends[n % len(frontends)]
            extra = ["--sandbox", "none"]
            for other in frontends:
                if other is not own:
                    extra += ["--server", f"grpc://{other.address}"]
            name = f"worker{n}"
            worker = WorkerProcess(own, name, workdir / name, slots=args.slots, extra=extra)
            stack.callback(stop_worker, worker)
            workers.append(worker)
        for worker in workers:
            worker.wait_connected()
        pids = {
            "frontends": [frontend.process.pid for frontend in frontends],
            "redis": [redis_used.pid] if redis_used else [],
            "workers": [worker.process.pid for worker in workers],
        }
        measured = Measured(
            pids, redis_used.client if redis_used else None, redis_used.url if redis_used else ""
        )
        addresses = [frontend.address for frontend in frontends]
        salt = f"{os.getpid()}-{workdir}"
        return asyncio.run(drive(config, args, addresses, measured, salt, workdir))


def median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def table(configs: list[Config], results: dict[Config, list[Result]]) -> Iterator[str]:
    yield (
        "| configuration | actions/s | frontend(s) CPU | redis-server CPU | workers CPU "
        "| client CPU | Redis commands/action |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|"
    for config in configs:
        runs = results[config]
        rate = median(r.rate for r in runs) or 0.0
        cpu = [median(r.cpu[c] for r in runs) or 0.0 for c in COMPONENTS]
        commands = median(r.redis_commands for r in runs)
        cells = [config.label, f"{rate:.0f}"] + [f"{seconds * 1000:.2f} ms" for seconds in cpu]
        if not config.redis:
            cells[3] = "n/a"
        cells.append("n/a" if commands is None else f"{commands:.1f}")
        yield "| " + " | ".join(cells) + " |"


def terminate(_signal: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: every process is stopped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=2000, help="timed actions a run")
    parser.add_argument("--warmup", type=int, default=50, help="untimed actions first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--slots", type=int, default=4, help="slots a worker")
    parser.add_argument("--clients", type=int, default=32, help="concurrent Execute calls")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels of the clients")
    parser.add_argument(
        "--embedded", action="store_true", help="also the embedded server, without Redis"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, terminate)
    configs = ([EMBEDDED] if args.embedded else []) + [ONE, TWO]
    results: dict[Config, list[Result]] = {config: [] for config in configs}
    with (
        tempfile.TemporaryDirectory(prefix="reapi-throughput-") as tmp,
        standalone(Path(tmp) / "redis") as deployment,
        deployment.nodes[0].client() as client,
    ):
        shared = SharedRedis(deployment.nodes[0].process.pid, deployment.nodes[0].url, client)
        for repeat in range(args.repeats):
            order = configs if repeat % 2 == 0 else configs[::-1]
            for config in order:
                progress(f"repetition {repeat + 1}/{args.repeats}: {config.label}")
                client.flushall()  # no state left by the previous configuration
                result = run(config, args, Path(tmp) / f"{config.key}-{repeat}", shared)
                progress(f"  {result.rate:.0f} actions/s")
                results[config].append(result)
    options = f"--actions {args.actions} --warmup {args.warmup} --repeats {args.repeats}"
    options += f" --workers {args.workers} --slots {args.slots} --clients {args.clients}"
    options += f" --channels {args.channels}" + (" --embedded" if args.embedded else "")
    print(f"Command: `python benchmarks/execute_throughput.py {options}`")
    print()
    print(
        f"{os.cpu_count()} cores, Python {platform.python_version()}; median of "
        f"{args.repeats}; CPU is per action."
    )
    print()
    for line in table(configs, results):
        print(line)
    absent = median(r.find_missing[0] for r in results[ONE] if r.find_missing)
    present = median(r.find_missing[1] for r in results[ONE] if r.find_missing)
    print()
    print(
        f"One FindMissingBlobs of {FIND_MISSING_DIGESTS:,} digests: {absent:.0f} Redis "
        f"commands when all are absent, {present:.0f} when all are present."
    )
    per_action = median(r.sent_per_action for r in results[ONE])
    per_find = median(r.sent_per_find_missing for r in results[ONE])
    if per_action is not None and per_find is not None:
        print()
        print(
            f"Sent to Redis (MONITOR, a script counted once; {MONITORED_ACTIONS} Executes "
            f"one at a time, one frontend): {per_action:.1f} commands per Execute, "
            f"{per_find:.0f} per FindMissingBlobs of {FIND_MISSING_DIGESTS:,} digests."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
