#!/usr/bin/env python3
"""CAS benchmark: our server and BuildGrid side by side, one client, one run.

Starts both servers on loopback ports with fresh disk storage in a temporary directory
(or, with ``--backend redis``, each on a standalone redis-server of its own), drives them
with the same grpc.aio client (our generated stubs, SHA256, instance name ""), and prints
a markdown table of medians with the ratio ours/BuildGrid.

    python benchmarks/cas_bench.py                  # both servers, 5 repetitions
    python benchmarks/cas_bench.py --only buildgrid # one server only
    python benchmarks/cas_bench.py --backend redis  # both servers storing in Redis

BuildGrid is installed on first use into its own venv (``--buildgrid-venv``). Repetitions
alternate which server goes first, so slow drifts of a noisy machine hit both alike.
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402

from benchmarks.processes import log_tail, supervised  # noqa: E402
from reapi.protos import bytestream_pb2, bytestream_pb2_grpc  # noqa: E402
from reapi.protos import remote_execution_pb2 as re_pb2  # noqa: E402
from reapi.protos import remote_execution_pb2_grpc as re_grpc  # noqa: E402
from tests.redis_servers import RedisNode, RedisStartError, standalone  # noqa: E402

OURS = "ours"
BUILDGRID = "BuildGrid"
KIB = 1024
MIB = 1024 * 1024

DEFAULT_OURS_CMD = {
    "disk": "{python} -m reapi serve --listen {listen} --storage {storage} --workers 0",
    "redis": "{python} -m reapi serve --listen {listen} --redis {redis} --workers 0",
}

# Only what the benchmark needs: CAS, ByteStream and the action cache (Capabilities comes
# with them). No scheduler, so BuildGrid needs no database.
BUILDGRID_CONFIG = """\
server:
  - !channel
    address: {address}
    insecure-mode: true

{storages}
caches:
  - !lru-action-cache &action-cache
    storage: *cas-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true

instances:
  - name: ""
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
      - !action-cache
        cache: *action-cache
"""

BUILDGRID_STORAGES = {
    "disk": """\
storages:
  - !disk-storage &cas-storage
    path: {storage}
""",
    # BuildGrid's RedisStorage: one key per blob, whole blobs in one value.
    "redis": """\
connections:
  - !redis-connection &redis
    host: "127.0.0.1"
    port: {port}

storages:
  - !redis-storage &cas-storage
    redis: *redis
""",
}

# INFO commandstats entries not counted: our own INFO calls.
NOT_COUNTED = {"info"}

T = TypeVar("T")
# server name -> measurement key -> one rate per repetition
Results = dict[str, dict[str, list[float]]]


class BenchError(Exception):
    """A server misbehaved or could not be started; the run stops."""


def make_stub(stub_class: Any, channel: grpc.aio.Channel) -> Any:
    """Build a generated gRPC stub; they are untyped, and this is the one place that says so."""
    return stub_class(channel)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- servers


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    address: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running(spec: ServerSpec) -> Iterator[subprocess.Popen[bytes]]:
    """Run the server for the duration of the block; SIGTERM (then SIGKILL) it on exit."""
    log(f"starting {spec.name}: {shlex.join(spec.argv)}")
    with supervised(spec.argv, spec.log_path, spec.cwd, spec.env) as proc:
        yield proc


async def wait_ready(spec: ServerSpec, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once GetCapabilities answers; BenchError if the server exits or times out."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(spec.address) as channel:
        stub = make_stub(re_grpc.CapabilitiesStub, channel)
        while True:
            if proc.poll() is not None:
                raise BenchError(
                    f"{spec.name} exited with status {proc.returncode}; log {spec.log_path}:\n"
                    + log_tail(spec.log_path)
                )
            try:
                await stub.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=1.0)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{spec.name} did not answer on {spec.address} within {timeout:.0f}s; "
                        f"log {spec.log_path}:\n" + log_tail(spec.log_path)
                    ) from None
                await asyncio.sleep(0.2)


def ensure_buildgrid(venv: Path, requirement: str, backend: str) -> str:
    """Create the BuildGrid venv unless it exists, or install into it again if the Redis
    backend needs redis-py (BuildGrid's [redis] extra) and it has none; return the
    installed BuildGrid version."""
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if not (venv / "bin" / "bgd").exists():
        log(f"installing {requirement} into {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, requirement], check=True)
    elif backend == "redis":
        probe = subprocess.run([str(python), "-c", "import redis"], stderr=subprocess.DEVNULL)
        if probe.returncode != 0:
            log(f"installing {requirement} into {venv} again: it has no redis-py")
            subprocess.run([*pip, requirement], check=True)
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('buildgrid'))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return version.stdout.strip()


def buildgrid_spec(venv: Path, workdir: Path, redis_node: RedisNode | None) -> ServerSpec:
    """BuildGrid on disk storage, or on `redis_node` if given."""
    address = f"127.0.0.1:{free_port()}"
    storage = workdir / "buildgrid-storage"
    config = workdir / "buildgrid.yml"
    # JSON strings are valid YAML scalars, which quotes paths safely.
    if redis_node is None:
        storages = BUILDGRID_STORAGES["disk"].format(storage=json.dumps(str(storage)))
    else:
        storages = BUILDGRID_STORAGES["redis"].format(port=redis_node.port)
    config.write_text(BUILDGRID_CONFIG.format(address=json.dumps(address), storages=storages))
    return ServerSpec(
        name=BUILDGRID,
        argv=[str(venv / "bin" / "bgd"), "server", "start", str(config)],
        env=dict(os.environ),
        cwd=workdir,
        log_path=workdir / "buildgrid.log",
        address=address,
    )


def ours_spec(command: str, workdir: Path, redis_node: RedisNode | None) -> ServerSpec:
    """Our server; `command`'s {redis} is `redis_node`'s URL."""
    listen = f"127.0.0.1:{free_port()}"
    storage = workdir / "ours-storage"
    home = workdir / "ours-home"
    home.mkdir()
    url = redis_node.url if redis_node else ""
    argv = [
        part.format(python=sys.executable, listen=listen, storage=storage, redis=url)
        for part in shlex.split(command)
    ]
    env = dict(os.environ, REAPI_HOME=str(home))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return ServerSpec(
        name=OURS,
        argv=argv,
        env=env,
        cwd=REPO_ROOT,
        log_path=workdir / "ours.log",
        address=listen,
    )


def command_count(client: redis.Redis) -> int:
    """Commands the Redis has processed so far (INFO commandstats), but our INFO calls."""
    stats = client.info("commandstats")
    return sum(
        int(entry["calls"])
        for name, entry in stats.items()
        if name.removeprefix("cmdstat_").split("|")[0] not in NOT_COUNTED
    )


# --------------------------------------------------------------------------- workload


@dataclasses.dataclass(frozen=True)
class Params:
    find_batch: int  # digests per FindMissingBlobs request
    find_requests: int
    blob_size: int
    batch_blobs: int  # blobs per BatchUpdateBlobs / BatchReadBlobs request
    batch_requests: int  # uploads; reads then cycle over the uploaded blobs
    read_requests: int
    streams: int  # concurrent ByteStream calls
    stream_blob_size: int
    stream_blobs: int  # blobs each stream writes, per chunk size
    chunk_sizes: tuple[int, ...]  # one ByteStream Write measurement per chunk size
    read_passes: int  # times each stream reads back every blob it wrote
    concurrency: int  # batch RPCs in flight


@dataclasses.dataclass(frozen=True)
class StreamBlob:
    digest: re_pb2.Digest
    data: bytes
    writes: list[bytestream_pb2.WriteRequest]


@dataclasses.dataclass(frozen=True)
class Workload:
    """Fresh random data for one repetition; every request is built before timing starts."""

    missing: list[re_pb2.FindMissingBlobsRequest]
    present: list[re_pb2.FindMissingBlobsRequest]
    uploads: list[re_pb2.BatchUpdateBlobsRequest]
    reads: list[re_pb2.BatchReadBlobsRequest]
    blobs: dict[str, bytes]
    # chunk size -> one list of blobs per stream
    streams: dict[int, list[list[StreamBlob]]]


def batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def cycled(items: Sequence[T], count: int) -> list[T]:
    return [items[i % len(items)] for i in range(count)]


def write_requests(
    digest: re_pb2.Digest, data: bytes, chunk: int
) -> list[bytestream_pb2.WriteRequest]:
    name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
    return [
        bytestream_pb2.WriteRequest(
            resource_name=name if offset == 0 else "",
            write_offset=offset,
            data=data[offset : offset + chunk],
            finish_write=offset + chunk >= len(data),
        )
        for offset in range(0, len(data), chunk)
    ]


def stream_blob(size: int, chunk: int) -> StreamBlob:
    data = os.urandom(size)
    digest = re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=size)
    return StreamBlob(digest, data, write_requests(digest, data, chunk))


def make_workload(p: Params) -> Workload:
    missing = [
        re_pb2.Digest(hash=os.urandom(32).hex(), size_bytes=p.blob_size)
        for _ in range(p.find_batch * p.find_requests)
    ]
    blobs = {}
    for _ in range(p.batch_blobs * p.batch_requests):
        data = os.urandom(p.blob_size)
        blobs[hashlib.sha256(data).hexdigest()] = data
    uploaded = [re_pb2.Digest(hash=h, size_bytes=len(d)) for h, d in blobs.items()]
    present = cycled(uploaded, len(missing))
    reads = cycled(uploaded, p.batch_blobs * p.read_requests)
    return Workload(
        missing=[
            re_pb2.FindMissingBlobsRequest(blob_digests=b) for b in batches(missing, p.find_batch)
        ],
        present=[
            re_pb2.FindMissingBlobsRequest(blob_digests=b) for b in batches(present, p.find_batch)
        ],
        uploads=[
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=blobs[d.hash])
                    for d in batch
                ]
            )
            for batch in batches(uploaded, p.batch_blobs)
        ],
        reads=[re_pb2.BatchReadBlobsRequest(digests=b) for b in batches(reads, p.batch_blobs)],
        blobs=blobs,
        streams={
            chunk: [
                [stream_blob(p.stream_blob_size, chunk) for _ in range(p.stream_blobs)]
                for _ in range(p.streams)
            ]
            for chunk in p.chunk_sizes
        },
    )


# --------------------------------------------------------------------------- measurements


@dataclasses.dataclass(frozen=True)
class Measurement:
    key: str
    title: str
    unit: str
    target: float | None  # minimum ratio ours/BuildGrid


def size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB and n % MIB == 0 else f"{n // KIB} KiB"


def measurements(p: Params, backend: str) -> list[Measurement]:
    fmb = f"FindMissingBlobs, {p.find_batch} digests/request"
    batch = f"{size(p.blob_size)} blobs, {p.batch_blobs}/request"
    streams = f"{p.streams} streams, {size(p.stream_blob_size)} blobs"
    commands = [
        Measurement(f"{key}_cmds", f"Redis commands: {title}", "commands/request", None)
        for key, title in [
            ("fmb_missing", f"{fmb}, all missing"),
            ("fmb_present", f"{fmb}, all present"),
            ("batch_update", f"BatchUpdateBlobs, {batch}"),
        ]
    ]
    # Targets: on disk as before; on Redis those of issue 21 (against BuildGrid on Redis).
    fmb_target, update_target, read_target = (
        (5.0, 2.0, 1.0) if backend == "redis" else (3.0, 3.0, 1.5)
    )
    return [
        Measurement("fmb_missing", f"{fmb}, all missing", "digests/s", fmb_target),
        Measurement("fmb_present", f"{fmb}, all present", "digests/s", fmb_target),
        Measurement("batch_update", f"BatchUpdateBlobs, {batch}", "blobs/s", update_target),
        Measurement("batch_read", f"BatchReadBlobs, {batch}", "blobs/s", read_target),
        *(
            Measurement(
                f"bs_write_{c}", f"ByteStream Write, {streams}, {size(c)} chunks", "MB/s", 1.0
            )
            for c in p.chunk_sizes
        ),
        Measurement("bs_read", f"ByteStream Read, {streams}", "MB/s", 1.0),
        *(commands if backend == "redis" else []),
    ]


async def timed_concurrently(
    requests: Sequence[T], call: Callable[[T], Awaitable[None]], concurrency: int
) -> float:
    """Send every request, `concurrency` at a time; return the elapsed seconds."""

    async def worker(share: Sequence[T]) -> None:
        for request in share:
            await call(request)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for i in range(concurrency):
            tasks.create_task(worker(requests[i::concurrency]))
    return time.perf_counter() - start


async def timed_streams(
    streams: list[list[StreamBlob]], transfer: Callable[[StreamBlob], Awaitable[None]]
) -> float:
    """Run one task per stream, each transferring its blobs in turn; return the seconds."""

    async def stream(blobs: list[StreamBlob]) -> None:
        for blob in blobs:
            await transfer(blob)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for blobs in streams:
            tasks.create_task(stream(blobs))
    return time.perf_counter() - start


class Client:
    """The one client used for every server: each method checks the answers, returns a rate."""

    def __init__(self, channel: grpc.aio.Channel, concurrency: int) -> None:
        self.cas = make_stub(re_grpc.ContentAddressableStorageStub, channel)
        self.bytestream = make_stub(bytestream_pb2_grpc.ByteStreamStub, channel)
        self.concurrency = concurrency

    async def find_missing(
        self, requests: list[re_pb2.FindMissingBlobsRequest], all_missing: bool
    ) -> float:
        async def call(request: re_pb2.FindMissingBlobsRequest) -> None:
            response = await self.cas.FindMissingBlobs(request)
            expected = len(request.blob_digests) if all_missing else 0
            if len(response.missing_blob_digests) != expected:
                raise BenchError(
                    f"FindMissingBlobs: {len(response.missing_blob_digests)} missing "
                    f"of {len(request.blob_digests)}, expected {expected}"
                )

        elapsed = await timed_concurrently(requests, call, self.concurrency)
        return sum(len(r.blob_digests) for r in requests) / elapsed

    async def batch_update(self, requests: list[re_pb2.BatchUpdateBlobsRequest]) -> float:
        async def call(request: re_pb2.BatchUpdateBlobsRequest) -> None:
            response = await self.cas.BatchUpdateBlobs(request)
            failed = [r for r in response.responses if r.status.code != 0]
            if failed or len(response.responses) != len(request.requests):
                raise BenchError(f"BatchUpdateBlobs: {len(failed)} failed, e.g. {failed[:1]}")

        elapsed = await timed_concurrently(requests, call, self.concurrency)
        return sum(len(r.requests) for r in requests) / elapsed

    async def batch_read(
        self, requests: list[re_pb2.BatchReadBlobsRequest], blobs: dict[str, bytes]
    ) -> float:
        async def call(request: re_pb2.BatchReadBlobsRequest) -> None:
            response = await self.cas.BatchReadBlobs(request)
            good = sum(
                1
                for r in response.responses
                if r.status.code == 0 and r.data == blobs[r.digest.hash]
            )
            if good != len(request.digests):
                raise BenchError(f"BatchReadBlobs: {good} of {len(request.digests)} blobs read")

        elapsed = await timed_concurrently(requests, call, self.concurrency)
        return sum(len(r.digests) for r in requests) / elapsed

    async def bytestream_write(self, streams: list[list[StreamBlob]]) -> float:
        async def write(blob: StreamBlob) -> None:
            response = await self.bytestream.Write(iter(blob.writes))
            if response.committed_size != blob.digest.size_bytes:
                raise BenchError(f"Write: committed {response.committed_size} bytes")

        elapsed = await timed_streams(streams, write)
        return sum(b.digest.size_bytes for s in streams for b in s) / elapsed / 1e6

    async def bytestream_read(self, streams: list[list[StreamBlob]], passes: int) -> float:
        async def read(blob: StreamBlob) -> None:
            name = f"blobs/{blob.digest.hash}/{blob.digest.size_bytes}"
            request = bytestream_pb2.ReadRequest(resource_name=name)
            position = 0
            async for response in self.bytestream.Read(request):
                chunk = response.data
                # startswith(chunk, position) compares in place: no copy, little client CPU.
                if not blob.data.startswith(chunk, position):
                    raise BenchError(f"Read: wrong data at offset {position} of {name}")
                position += len(chunk)
            if position != blob.digest.size_bytes:
                raise BenchError(f"Read: {position} bytes of {name}")

        streams = [s * passes for s in streams]
        elapsed = await timed_streams(streams, read)
        return sum(b.digest.size_bytes for s in streams for b in s) / elapsed / 1e6


# Counts the commands the server's Redis has processed so far (None: no Redis).
CommandCount = Callable[[], int] | None


async def run_all(
    name: str, client: Client, work: Workload, read_passes: int, commands: CommandCount
) -> dict[str, float]:
    """One pass of every measurement; a failed RPC or check is a BenchError naming the server."""
    try:
        return await measure_all(client, work, read_passes, commands)
    except grpc.aio.AioRpcError as e:
        raise BenchError(f"{name}: {e.code().name}: {e.details()}") from e
    except BenchError as e:
        raise BenchError(f"{name}: {e}") from e


async def measure_all(
    client: Client, work: Workload, read_passes: int, commands: CommandCount
) -> dict[str, float]:
    """One pass of every measurement, in an order where each finds the data it needs.
    With `commands`, FindMissingBlobs and BatchUpdateBlobs also count the Redis commands
    each request cost ("KEY_cmds"), from the counts before and after (outside the timing)."""
    rates: dict[str, float] = {}

    async def counted(key: str, requests: int, measure: Awaitable[float]) -> None:
        before = commands() if commands else 0
        rates[key] = await measure
        if commands:
            rates[f"{key}_cmds"] = (commands() - before) / requests

    await counted(
        "fmb_missing", len(work.missing), client.find_missing(work.missing, all_missing=True)
    )
    await counted("batch_update", len(work.uploads), client.batch_update(work.uploads))
    await counted(
        "fmb_present", len(work.present), client.find_missing(work.present, all_missing=False)
    )
    rates["batch_read"] = await client.batch_read(work.reads, work.blobs)
    for chunk, streams in work.streams.items():
        rates[f"bs_write_{chunk}"] = await client.bytestream_write(streams)
    # Each stream reads back what it wrote under every chunk size.
    by_chunk = list(work.streams.values())
    per_stream = [[b for streams in by_chunk for b in streams[i]] for i in range(len(by_chunk[0]))]
    rates["bs_read"] = await client.bytestream_read(per_stream, read_passes)
    return rates


# --------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def table(rows: list[Measurement], results: Results, servers: list[str]) -> str:
    both = servers == [OURS, BUILDGRID]
    header = ["Measurement", "unit", *servers]
    if both:
        header += ["ours/BuildGrid", "target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for m in rows:
        medians = {s: statistics.median(results[s][m.key]) for s in servers}
        cells = [m.title, m.unit, *(fmt(medians[s]) for s in servers)]
        if both:
            ratio = medians[OURS] / medians[BUILDGRID]
            if m.target is None:
                target = ""
            else:
                target = f">= {m.target:g}x " + ("met" if ratio >= m.target else "**missed**")
            cells += [f"{ratio:.2f}x", target]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CAS benchmark: our server and BuildGrid side by side."
    )
    add = parser.add_argument
    add("--only", choices=["ours", "buildgrid"], help="benchmark one server (default: both)")
    add(
        "--backend",
        choices=["disk", "redis"],
        default="disk",
        help="where both servers store blobs: fresh directories, or a standalone "
        "redis-server each (default: disk)",
    )
    add("--repeats", type=int, default=5, help="repetitions; medians are reported")
    add("--concurrency", type=int, default=4, help="batch RPCs in flight")
    add("--find-batch", type=int, default=1000, help="digests per FindMissingBlobs")
    add("--find-requests", type=int, default=100, help="FindMissingBlobs calls per figure")
    add("--blob-size", type=int, default=4 * KIB, help="bytes per small blob")
    add("--batch-blobs", type=int, default=256, help="blobs per BatchUpdate/BatchRead")
    add("--batch-requests", type=int, default=40, help="BatchUpdateBlobs calls")
    add("--read-requests", type=int, default=120, help="BatchReadBlobs calls")
    add("--streams", type=int, default=4, help="concurrent ByteStream calls")
    add("--stream-blob-mib", type=int, default=8, help="ByteStream blob size")
    add("--stream-blobs", type=int, default=3, help="blobs written per stream and chunk size")
    add("--chunk-kib", default="64,1024", help="ByteStream Write chunk sizes, comma separated")
    add("--read-passes", type=int, default=2, help="ByteStream reads of each blob")
    add("--buildgrid-venv", type=Path, default=Path("/tmp/reapi-bench/buildgrid-venv"))
    add(
        "--buildgrid-requirement",
        default="buildgrid[redis]==0.4.4",
        help="what pip installs (--backend redis needs the [redis] extra)",
    )
    add(
        "--ours-cmd",
        help="command that starts our server; {python}, {listen}, {storage}, {redis} (a URL) "
        f"are filled in (default: {DEFAULT_OURS_CMD['disk']!r}, with --backend redis "
        f"{DEFAULT_OURS_CMD['redis']!r})",
    )
    add("--startup-timeout", type=float, default=60.0, help="seconds for a server to answer")
    return parser.parse_args(argv)


def params(args: argparse.Namespace) -> Params:
    return Params(
        find_batch=args.find_batch,
        find_requests=args.find_requests,
        blob_size=args.blob_size,
        batch_blobs=args.batch_blobs,
        batch_requests=args.batch_requests,
        read_requests=args.read_requests,
        streams=args.streams,
        stream_blob_size=args.stream_blob_mib * MIB,
        stream_blobs=args.stream_blobs,
        chunk_sizes=tuple(int(c) * KIB for c in args.chunk_kib.split(",")),
        read_passes=args.read_passes,
        concurrency=args.concurrency,
    )


async def benchmark(args: argparse.Namespace, workdir: Path) -> tuple[list[str], Results]:
    """Start the servers, run warm-up and repetitions, stop the servers; return results."""
    p = params(args)
    servers = [name for name in (OURS, BUILDGRID) if args.only in (None, name.lower())]
    results: Results = {s: {} for s in servers}

    async with contextlib.AsyncExitStack() as stack:
        # With --backend redis, each server gets a standalone redis-server of its own.
        nodes: dict[str, RedisNode | None] = dict.fromkeys(servers)
        commands: dict[str, CommandCount] = dict.fromkeys(servers)
        if args.backend == "redis":
            for name in servers:
                deployment = stack.enter_context(standalone(workdir / f"redis-{name.lower()}"))
                node = nodes[name] = deployment.nodes[0]
                admin = stack.enter_context(node.client())
                commands[name] = functools.partial(command_count, admin)
        specs = []
        if OURS in servers:
            command = args.ours_cmd or DEFAULT_OURS_CMD[args.backend]
            specs.append(ours_spec(command, workdir, nodes[OURS]))
        if BUILDGRID in servers:
            specs.append(buildgrid_spec(args.buildgrid_venv, workdir, nodes[BUILDGRID]))

        clients = {}
        for spec in specs:
            proc = stack.enter_context(running(spec))
            await wait_ready(spec, proc, args.startup_timeout)
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(spec.address))
            clients[spec.name] = Client(channel, p.concurrency)

        log("warming up")
        warmup = dataclasses.replace(
            p, find_requests=4, batch_requests=4, read_requests=4, stream_blobs=1
        )
        for name in servers:
            await run_all(name, clients[name], make_workload(warmup), p.read_passes, commands[name])

        for rep in range(args.repeats):
            work = make_workload(p)
            # Alternate who goes first, so a drift of the machine's speed hits both alike.
            for name in servers if rep % 2 == 0 else servers[::-1]:
                rates = await run_all(name, clients[name], work, p.read_passes, commands[name])
                for key, rate in rates.items():
                    results[name].setdefault(key, []).append(rate)
                figures = " ".join(f"{k}={fmt(v)}" for k, v in rates.items())
                log(f"rep {rep + 1}/{args.repeats} {name}: {figures}")
            del work  # a workload holds a few hundred MB; free it before making the next
    return servers, results


def redis_version() -> str:
    """The version of the installed redis-server ("Redis server v=7.0.15 sha=...")."""
    done = subprocess.run(["redis-server", "--version"], check=True, capture_output=True, text=True)
    return done.stdout.split("v=", 1)[1].split()[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    p = params(args)
    host = (
        f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.2f} at start), "
        f"{platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )
    if args.only != "ours":
        try:
            version = ensure_buildgrid(
                args.buildgrid_venv, args.buildgrid_requirement, args.backend
            )
        except subprocess.CalledProcessError as e:
            log(f"error: could not set up BuildGrid in {args.buildgrid_venv}: {e}")
            return 1
        host += f", BuildGrid {version}"
    if args.backend == "redis":
        try:
            storage = f"Redis {redis_version()}, a standalone redis-server per server"
        except (OSError, subprocess.CalledProcessError) as e:
            log(f"error: redis-server --version: {e}")
            return 1
    else:
        storage = "disk, a fresh directory per server"

    with tempfile.TemporaryDirectory(prefix="reapi-bench-") as tmp:

        async def run() -> tuple[list[str], Results]:
            # SIGTERM unwinds like Ctrl-C does, so the servers are stopped either way.
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            return await benchmark(args, Path(tmp))

        try:
            servers, results = asyncio.run(run())
        except (BenchError, RedisStartError) as e:
            log(f"error: {e}")
            return 1
        except (KeyboardInterrupt, asyncio.CancelledError):
            log("interrupted")
            return 130

    print(f"Command: `{shlex.join(['python', 'benchmarks/cas_bench.py', *argv])}`")
    print()
    print(f"Host: {host}. Storage: {storage}.")
    print(f"Median of {args.repeats} repetitions; MB = 10^6 bytes.")
    print()
    print(table(measurements(p, args.backend), results, servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
