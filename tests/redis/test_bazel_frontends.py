"""Real Bazel through HAProxy in front of two `reapi serve --redis` frontends on
a real Redis Cluster, a worker connected to each (and able to move to the
other). Outputs are compared byte for byte with a local build each time:

1. a build through the balancer, with one frontend killed (kill -9) mid-build;
2. after `bazel clean`, a rebuild against the surviving frontend alone: every
   action a remote cache hit (the cache the two share);
3. after `bazel clean`, a build that may not take cached results, with a
   Redis master killed (kill -9) mid-build: a failover pause, no wrong answer.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import redis_servers
from tests.helpers import ServerProcess, WorkerProcess
from tests.integration.bazel_helpers import (
    Bazel,
    copy_workspace,
    offline_flags,
    process_summary,
    require_bazel,
    sha256_files,
)
from tests.integration.test_bazel import CACHE_HIT, NOT_EXECUTED, OUTPUTS, TARGETS
from tests.redis.haproxy import haproxy

# Bazel 4 tries a call 5 times within about 3 s by default; a Redis failover
# (node timeout 2 s, then an election) can take longer.
RETRIES = "--remote_retries=12"


def started(workers: list[WorkerProcess]) -> int:
    """Actions the workers have started so far."""
    return sum(worker.log().count("running ") for worker in workers)


def when_running(workers: list[WorkerProcess], action: Callable[[], None]) -> None:
    """Do `action` once some worker has started one more action."""
    before = started(workers)
    deadline = time.monotonic() + 120
    while started(workers) == before:
        assert time.monotonic() < deadline, "no worker started anything"
        time.sleep(0.02)
    action()


def only_remote(output: str, expected: int) -> None:
    counts = process_summary(output)
    assert {k: n for k, n in counts.items() if k not in ("remote", "internal")} == {}, output
    assert counts["remote"] == expected, output


@pytest.mark.bazel
@pytest.mark.slow
def test_bazel_through_two_frontends_that_die_under_it(tmp_path: Path) -> None:
    bazel = Bazel(
        executable=require_bazel(),
        workspace=copy_workspace(tmp_path / "workspace"),
        output_user_root=tmp_path / "bazel_root",
    )
    offline = offline_flags(repository_cache=tmp_path / "repository_cache")
    bazel_bin = bazel.workspace / "bazel-bin"
    background = concurrent.futures.ThreadPoolExecutor(1)
    with redis_servers.cluster(tmp_path / "redis") as cluster:
        a, b = (ServerProcess(tmp_path / n, redis=cluster.urls) for n in ("a", "b"))
        workers = [
            WorkerProcess(a, "worker-a", tmp_path / "wa", 2, ["--server", f"grpc://{b.address}"]),
            WorkerProcess(b, "worker-b", tmp_path / "wb", 2, ["--server", f"grpc://{a.address}"]),
        ]
        try:
            local = bazel.run("test", *offline, TARGETS)
            expected = sha256_files(bazel_bin, OUTPUTS)
            ran_locally = sum(n for k, n in process_summary(local).items() if k not in NOT_EXECUTED)
            bazel.run("clean")
            for worker in workers:
                worker.wait_connected()

            with haproxy(tmp_path, [a.address, b.address]) as balanced:
                remote = [*offline, RETRIES, f"--remote_executor=grpc://{balanced}"]
                build = background.submit(bazel.run, "test", *remote, TARGETS)
                when_running(workers, a.kill)
                assert not build.done(), "the build ended before the frontend was killed"
                through_balancer = build.result()
            assert sha256_files(bazel_bin, OUTPUTS) == expected
            only_remote(through_balancer, ran_locally)

            bazel.run("clean")
            alone = [*offline, RETRIES, f"--remote_executor=grpc://{b.address}"]
            cached = process_summary(bazel.run("test", *alone, TARGETS))
            assert {k: n for k, n in cached.items() if k not in NOT_EXECUTED} == {}, cached
            assert cached.get(CACHE_HIT) == ran_locally
            assert sha256_files(bazel_bin, OUTPUTS) == expected

            bazel.run("clean")
            master = cluster.masters()[0]
            build = background.submit(
                bazel.run, "test", *alone, "--noremote_accept_cached", TARGETS
            )
            when_running(workers, master.kill)
            assert not build.done(), "the build ended before the master was killed"
            rerun = build.result()
            cluster.wait_healthy()
            assert len(cluster.masters()) == 3, "its replica took over"
            assert sha256_files(bazel_bin, OUTPUTS) == expected
            only_remote(rerun, ran_locally)
        finally:
            bazel.shutdown()
            background.shutdown()
            for worker in workers:
                worker.stop()
            for server in (a, b):
                server.stop()
