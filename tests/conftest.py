from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from reapi.frontend.server import Server, ServerConfig
from tests import redis_servers
from tests.helpers import ServerProcess
from tests.redis_servers import RedisDeployment


@pytest.fixture(autouse=True)
def reapi_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No test touches ~/.cache/reapi, and no shim agent outlives its test."""
    home = tmp_path / "reapi-home"
    monkeypatch.setenv("REAPI_HOME", str(home))
    monkeypatch.setenv("REAPI_AGENT_IDLE", "60")
    yield home
    pid_file = home / "shim" / "agent.pid"
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


@pytest.fixture
def reapi_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """The real server as a separate process on a free loopback port."""
    server = ServerProcess(tmp_path / "storage")
    yield server
    status = server.stop()
    assert status == 0, server.log()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """The real server in this process (same event loop as the test)."""
    instance = Server(ServerConfig(listen="127.0.0.1:0", storage=tmp_path / "storage"))
    await instance.start()
    yield instance
    await instance.stop(grace=1)


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture(scope="session")
def redis_standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisDeployment]:
    """One real redis-server for the whole run; tests flush it (`redis_flushed`)."""
    with redis_servers.standalone(tmp_path_factory.mktemp("redis")) as deployment:
        yield deployment


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisDeployment]:
    """A real Redis Cluster (3 masters + 3 replicas) for the whole run. Tests that
    kill nodes start their own with `redis_servers.cluster`."""
    with redis_servers.cluster(tmp_path_factory.mktemp("redis-cluster")) as deployment:
        yield deployment


@pytest.fixture(params=["standalone", "cluster"])
def redis_flushed(request: pytest.FixtureRequest) -> RedisDeployment:
    """Each shared Redis deployment in turn, emptied."""
    deployment: RedisDeployment = request.getfixturevalue(f"redis_{request.param}")
    deployment.emptied()
    return deployment
