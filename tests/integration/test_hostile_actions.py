"""Actions that attack the worker running them, against a root worker (as
`reapi serve` runs its local workers) with the real bubblewrap: each attack
fails, says why where the worker can tell, hurts nothing, and a normal action
run right after it succeeds."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from executor.limits import SANDBOX_UID_BASE, SANDBOX_UIDS
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.actions import execute, read_blob, upload_action
from tests.helpers import ServerProcess, WorkerProcess

MIB = 1024 * 1024
GIB = 1024 * MIB
# The tight limits of the battery's worker.
LIMITS = ["--max-processes", "64", "--max-memory", "256M", "--max-tmp", "16M"]
LIMITS += ["--max-tree", "64M"]
SECRET = "hunter2-worker-secret"  # in the worker's environment
MARKER = "marker-on-the-worker-command-line"


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root: they attack a root worker, as reapi serve runs one")


@pytest.fixture(scope="module")
def worker_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, WorkerProcess]]:
    """A server, and one worker of two slots with tight limits, a secret in
    its environment and a marker on its command line."""
    base = tmp_path_factory.mktemp("hostile")
    server = ServerProcess(base / "storage")
    os.environ["REAPI_TEST_SECRET"] = SECRET
    try:
        worker = WorkerProcess(
            server,
            "hostile",
            base / f"worker-{MARKER}",
            slots=2,
            extra=[*LIMITS, "--property", f"note={MARKER}"],
        )
    finally:
        del os.environ["REAPI_TEST_SECRET"]
    worker.wait_connected()
    yield server, worker
    worker.stop()
    assert server.stop() == 0, server.log()


@pytest.fixture
async def channel(
    worker_pair: tuple[ServerProcess, WorkerProcess],
) -> AsyncIterator[grpc.aio.Channel]:
    server, _worker = worker_pair
    async with grpc.aio.insecure_channel(server.address) as chan:
        yield chan


async def run(
    channel: grpc.aio.Channel,
    script: str,
    files: dict[str, bytes] | None = None,
    outputs: list[str] | None = None,
    timeout: float = 60,
    shell: str = "/bin/sh",
) -> re_pb2.ExecuteResponse:
    action = await upload_action(
        channel,
        [shell, "-c", script],
        files=files or {},
        outputs=outputs or [],
        timeout=timeout,
        do_not_cache=True,
    )
    _operations, response = await execute(channel, action, skip_cache_lookup=True)
    return response


async def output(channel: grpc.aio.Channel, response: re_pb2.ExecuteResponse) -> str:
    result = response.result
    out = await read_blob(channel, result.stdout_digest)
    err = await read_blob(channel, result.stderr_digest)
    return (out + err).decode(errors="replace")


async def normal_action_succeeds(channel: grpc.aio.Channel) -> None:
    """What every attack is followed by: an ordinary action, with an output."""
    response = await run(channel, "echo fine > out; cat in", {"in": b"input\n"}, ["out"])
    assert response.status.code == 0, response.status
    assert response.result.exit_code == 0, await output(channel, response)
    assert await read_blob(channel, response.result.output_files[0].digest) == b"fine\n"
    assert await output(channel, response) == "input\n"


async def test_the_hosts_root_only_files_are_unreadable(channel: grpc.aio.Channel) -> None:
    response = await run(channel, "id -u; cat /etc/shadow")
    text = await output(channel, response)
    assert response.result.exit_code != 0, text
    assert "Permission denied" in text
    uid = int(text.split()[0])
    assert SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UIDS, text
    assert "root:" not in text
    await normal_action_succeeds(channel)


async def test_cached_inputs_stay_unwritable(channel: grpc.aio.Channel) -> None:
    """The input's hard link into the worker's cache can be neither written
    nor chmodded; the next action with the same input sees the original."""
    attack = "chmod 666 in; echo changed >> in; cat in; exec 3>>in"
    response = await run(channel, attack, {"in": b"input\n"})
    text = await output(channel, response)
    assert response.result.exit_code != 0, text
    assert "Operation not permitted" in text and "changed" not in text, text
    await normal_action_succeeds(channel)  # its `in` is the same cached file


async def test_nothing_of_the_workers_environment_or_command_line_is_visible(
    channel: grpc.aio.Channel,
) -> None:
    look = (
        "env; for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do "
        'echo "== $f"; tr "\\0" " " < $f; echo; done'
    )
    response = await run(channel, look)
    text = await output(channel, response)
    assert response.result.exit_code == 0, text
    assert "/proc/1/cmdline" in text  # the sandbox's first process is there to look at
    assert SECRET not in text and MARKER not in text, text
    await normal_action_succeeds(channel)


def _sandbox_processes() -> dict[int, int]:
    """Processes on this machine per sandbox user."""
    counts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            uid = os.stat(entry.path).st_uid
        except OSError:
            continue
        if SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UIDS:
            counts[uid] = counts.get(uid, 0) + 1
    return counts


async def test_a_fork_bomb_is_held_to_its_processes(channel: grpc.aio.Channel) -> None:
    """The bomb (bash's, which retries a fork that fails) runs until its
    timeout with at most 64 processes, the other slot of the same worker runs
    a normal action meanwhile, and nothing of it is left afterwards."""
    most: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for uid, count in _sandbox_processes().items():
                most[uid] = max(most.get(uid, 0), count)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        script = "bomb() { while :; do bomb & done; }; bomb"
        bomb = asyncio.ensure_future(run(channel, script, timeout=8, shell="/bin/bash"))
        await asyncio.sleep(3)
        await normal_action_succeeds(channel)  # in the other slot, while the bomb runs
        response = await bomb
    finally:
        stop.set()
        sampler.join()
    assert response.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], response.status
    assert most and max(most.values()) <= 64, most
    assert max(most.values()) >= 32, most  # it did try
    deadline = time.monotonic() + 10  # the kernel ends a dead namespace's processes
    while _sandbox_processes() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert _sandbox_processes() == {}
    await normal_action_succeeds(channel)


async def test_a_memory_hog_fails_on_its_own(channel: grpc.aio.Channel) -> None:
    hog = "awk 'BEGIN { s = \"x\"; while (1) s = s s }'"
    started = time.monotonic()
    response = await run(channel, hog)
    text = await output(channel, response)
    assert response.status.code == 0 and response.result.exit_code != 0, text
    assert "memory" in text, text
    assert time.monotonic() - started < 30  # it failed, not timed out
    await normal_action_succeeds(channel)


@pytest.mark.parametrize("scratch", ["/tmp", "/dev/shm"])
async def test_filling_tmp_fails_with_a_clear_message(
    channel: grpc.aio.Channel, scratch: str
) -> None:
    response = await run(channel, f"head -c 64M /dev/zero > {scratch}/big")
    text = await output(channel, response)
    assert response.result.exit_code != 0
    assert "No space left on device" in text, text
    assert "filled its /tmp or /dev/shm (16.0 MiB" in response.message, response.message
    assert response.message in text  # also on stderr, where every client shows it
    await normal_action_succeeds(channel)


async def test_one_file_past_the_tree_limit_ends_its_writer(channel: grpc.aio.Channel) -> None:
    response = await run(channel, "head -c 100M /dev/zero > big")
    text = await output(channel, response)
    assert response.result.exit_code == 128 + 25, text  # SIGXFSZ
    assert "a file of the action reached 64.0 MiB" in response.message
    await normal_action_succeeds(channel)


@pytest.mark.parametrize(
    "fill",
    [
        "for n in 1 2 3 4 5 6; do head -c 20M /dev/zero > f$n; done; sleep 60",
        # Sparse files take no disk, but would take as long to hash and send.
        "for n in 1 2; do truncate -s 60M f$n; done; sleep 60",
    ],
)
async def test_many_files_past_the_tree_limit_get_the_action_killed(
    channel: grpc.aio.Channel, fill: str
) -> None:
    started = time.monotonic()
    response = await run(channel, fill)
    text = await output(channel, response)
    assert response.result.exit_code == 128 + 9, text
    assert "wrote more than 64.0 MiB" in response.message
    assert response.message in text
    assert time.monotonic() - started < 30
    await normal_action_succeeds(channel)


async def test_stdout_past_the_tree_limit_ends_its_writer(channel: grpc.aio.Channel) -> None:
    response = await run(channel, "head -c 100M /dev/zero")
    assert response.result.exit_code == 128 + 25
    assert response.result.stdout_digest.size_bytes <= 64 * MIB
    await normal_action_succeeds(channel)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _zeros_digest(size: int) -> str:
    hasher = hashlib.sha256()
    block = bytes(MIB)
    for _ in range(size // MIB):
        hasher.update(block)
    return hasher.hexdigest()


async def test_huge_outputs_stream_through_a_worker_of_bounded_memory(tmp_path: Path) -> None:
    """2 GiB of stdout and a 3 GiB output file: the worker (default limits)
    hashes and uploads them as streams, its memory sampled all along."""
    server = ServerProcess(tmp_path / "storage")
    worker = WorkerProcess(server, "big", tmp_path / "worker")
    most = {"worker": 0, "server": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            most["worker"] = max(most["worker"], _rss(worker.process.pid))
            most["server"] = max(most["server"], _rss(server.process.pid))
            time.sleep(0.05)

    try:
        worker.wait_connected()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                script = "head -c 3G /dev/zero > big.bin; head -c 2G /dev/zero"
                response = await run(channel, script, outputs=["big.bin"], timeout=600)
                assert response.status.code == 0, response.status
                assert response.result.exit_code == 0
                big = response.result.output_files[0].digest
                stdout = response.result.stdout_digest
                assert (big.size_bytes, stdout.size_bytes) == (3 * GIB, 2 * GIB)
                assert big.hash == _zeros_digest(3 * GIB)
                assert stdout.hash == _zeros_digest(2 * GIB)
                cas = re_pb2.FindMissingBlobsRequest(blob_digests=[big, stdout])
                stub = re_grpc.ContentAddressableStorageStub(channel)
                assert list((await stub.FindMissingBlobs(cas)).missing_blob_digests) == []
                await normal_action_succeeds(channel)
        finally:
            stop.set()
            sampler.join()
    finally:
        worker.stop()
        assert server.stop() == 0, server.log()
        shutil.rmtree(tmp_path)  # 5 GiB stored: not kept for pytest's look afterwards
    print(f"most memory (RSS) in bytes: {most}")  # for the record (pytest -s)
    # A worker starts at about 60 MiB; outputs are read a MiB at a time.
    assert most["worker"] < 200 * MIB, most
    assert most["server"] < 300 * MIB, most


async def test_reapi_serve_gives_its_local_workers_the_limits(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "storage", "--max-tmp", "8M", workers=1)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            response = await run(channel, "head -c 16M /dev/zero > /tmp/big")
            assert "filled its /tmp or /dev/shm (8.0 MiB" in response.message, response
            await normal_action_succeeds(channel)
        assert "each action may use 1024 processes" in server.log()
    finally:
        assert server.stop() == 0, server.log()
