"""CAS lifecycle benchmark: `reapi cas gc` and `stats` on a store of a million
small blobs, and the server's FindMissingBlobs rate while gc runs.

The store is built once in --work (blobs of 100-1000 random bytes, written
straight into the small-blob database, last uses spread over the week before
the grace period). Each gc round gets a fresh copy of it and evicts half its
bytes, least recently used first. The FindMissingBlobs phase runs our server
on a copy, with --clients concurrent clients each asking for 1000 digests at a
time (half stored, picked at random, so many need their last use refreshed;
half absent), first with the server idle, then while a gc evicts half the store.

    python benchmarks/gc_bench.py                   # 1M blobs, 3 rounds
    python benchmarks/gc_bench.py --blobs 100000    # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from cas.disk import DiskStore  # noqa: E402
from cas.gc import GRACE  # noqa: E402
from cas.small_blobs import SMALL_DB, SmallBlobs  # noqa: E402
from reapi.core.digests import Digest, DigestFunction  # noqa: E402
from reapi.protos import remote_execution_pb2 as re_pb2  # noqa: E402
from reapi.protos import remote_execution_pb2_grpc as re_grpc  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402

BATCH = 10_000
FIND_BATCH = 1000
WEEK = 7 * 86400


def build_store(root: Path, count: int) -> int:
    """A store of `count` small blobs, last used before the grace period; its bytes."""
    done = root / "complete"
    if done.exists() and int(done.read_text().split()[0]) == count:
        return int(done.read_text().split()[1])
    shutil.rmtree(root, ignore_errors=True)
    DiskStore(root).close()  # the layout
    small = SmallBlobs(root)
    rng = random.Random(1)
    total = 0
    start = time.monotonic()
    for first in range(0, count, BATCH):
        blobs = []
        for _ in range(min(BATCH, count - first)):
            data = rng.randbytes(rng.randint(100, 1000))
            blobs.append((DigestFunction.SHA256.digest_of(data), data))
            total += len(data)
        small.put(blobs)
        if first % 100_000 == 0:
            print(
                f"store: {first + len(blobs)} blobs, {time.monotonic() - start:.0f} s",
                file=sys.stderr,
            )
    small.close()
    db = sqlite3.connect(root / SMALL_DB, isolation_level=None)
    db.execute(
        "UPDATE blob_keys SET last_access = ? - abs(random() % ?)",
        (time.time() - 2 * GRACE, WEEK),
    )
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    done.write_text(f"{count} {total}")
    return total


def copy_store(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


def reapi(*args: str) -> tuple[float, int, str]:
    """Run `python -m reapi ARGS`: wall seconds, peak RSS in MiB, standard output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "reapi", *args], cwd=REPO_ROOT, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"gc_bench: reapi {' '.join(args)} failed: {err.read()}")
        return seconds, usage.ru_maxrss // 1024, out.read()


def sample_keys(root: Path, count: int) -> list[Digest]:
    with sqlite3.connect(root / SMALL_DB) as db:
        rows = db.execute(
            "SELECT hash, size FROM blob_keys ORDER BY random() LIMIT ?", (count,)
        ).fetchall()
    return [Digest(DigestFunction.SHA256, h.hex(), size) for h, size in rows]


async def find_rate(address: str, stored: list[Digest], clients: int, stop: asyncio.Event) -> float:
    """Digests per second answered by FindMissingBlobs until `stop` is set."""
    rng = random.Random(2)
    answered = 0

    async def client(channel: grpc.aio.Channel) -> None:
        nonlocal answered
        stub = re_grpc.ContentAddressableStorageStub(channel)
        while not stop.is_set():
            present = rng.sample(stored, FIND_BATCH // 2)
            absent = [
                DigestFunction.SHA256.digest_of(rng.randbytes(32)) for _ in range(FIND_BATCH // 2)
            ]
            request = re_pb2.FindMissingBlobsRequest(
                blob_digests=[d.to_proto() for d in present + absent]
            )
            response = await stub.FindMissingBlobs(request)
            assert len(response.missing_blob_digests) >= len(absent)
            answered += FIND_BATCH

    start = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel, asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(client(channel))
    return answered / (time.monotonic() - start)


async def rates(
    storage: Path, stored: list[Digest], half: int, clients: int, idle_seconds: float
) -> tuple[float, float, float]:
    """FindMissingBlobs rate idle, rate during a gc, and the gc's seconds."""
    server = ServerProcess(storage, workers=0)
    try:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(idle_seconds, stop.set)
        idle = await find_rate(server.address, stored, clients, stop)
        stop = asyncio.Event()
        start = time.monotonic()
        gc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reapi", "cas", "gc", "--storage", str(storage),
            "--max-size", str(half), cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

        async def stop_after_gc() -> None:
            await gc.communicate()
            stop.set()

        async with asyncio.TaskGroup() as group:
            group.create_task(stop_after_gc())
            during = group.create_task(find_rate(server.address, stored, clients, stop))
        if gc.returncode != 0:
            raise SystemExit("gc_bench: gc during FindMissingBlobs failed")
        return idle, during.result(), time.monotonic() - start
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gc-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / f"store-{args.blobs}"
    total = build_store(source, args.blobs)
    half = total // 2
    copy = args.work / "copy"
    stats_times, gc_times, peaks, idle_rates, busy_rates = [], [], [], [], []
    for round_ in range(args.rounds):
        copy_store(source, copy)
        seconds, _, _ = reapi("cas", "stats", "--storage", str(copy), "--json")
        stats_times.append(seconds)
        seconds, peak, result = reapi("cas", "gc", "--storage", str(copy), "--max-size", str(half))
        gc_times.append(seconds)
        peaks.append(peak)
        print(f"round {round_ + 1}: stats {stats_times[-1]:.2f} s, gc {seconds:.2f} s, "
              f"peak {peak} MiB\n{result}", file=sys.stderr, flush=True)  # fmt: skip
        copy_store(source, copy)
        stored = sample_keys(copy, 200_000)
        idle, busy, gc_seconds = asyncio.run(
            rates(copy, stored, half, args.clients, args.idle_seconds)
        )
        idle_rates.append(idle)
        busy_rates.append(busy)
        print(f"round {round_ + 1}: FindMissingBlobs idle {idle:.0f}/s, during gc {busy:.0f}/s "
              f"(gc took {gc_seconds:.1f} s under load)", file=sys.stderr, flush=True)  # fmt: skip
    shutil.rmtree(copy, ignore_errors=True)
    med = statistics.median
    mib = total / 2**20
    print(f"\n{args.blobs} small blobs ({mib:.0f} MiB), gc to half, medians of {args.rounds}")
    print(f"reapi cas stats        {med(stats_times):8.2f} s")
    print(f"reapi cas gc           {med(gc_times):8.2f} s   (target < 60 s)")
    print(f"gc peak memory         {med(peaks):8.0f} MiB")
    idle, busy = med(idle_rates), med(busy_rates)
    print(f"FindMissingBlobs idle  {idle:8.0f} digests/s")
    print(
        f"FindMissingBlobs in gc {busy:8.0f} digests/s   ({busy / idle:.2f} of idle, target >= 0.5)"
    )


if __name__ == "__main__":
    main()
