"""Real Redis processes for tests and benchmarks: one standalone server, or a
Cluster of three masters with a replica each (``redis-cli --cluster create``),
on free loopback ports, each node in a directory of its own. Needs Debian's
redis-server and redis-tools."""

from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cas.redis_conn import Client, RedisTarget, connect

HOST = "127.0.0.1"


class RedisStartError(Exception):
    """Redis could not be started."""


async def client_of(deployment: RedisDeployment) -> Client:
    """Our own client (cas/redis_conn.py) of the deployment's live nodes."""
    return await connect(RedisTarget(tuple(deployment.urls)))


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> list[int]:
    """Free loopback ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port < 55000 and port not in ports and _port_is_free(port + 10000):
            ports.append(port)
    return ports


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (OSError, redis.RedisError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RedisStartError(f"{what}: not ready within {timeout:.0f}s")
        time.sleep(0.1)


@dataclass
class RedisNode:
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=30)

    def kill(self) -> None:
        """SIGKILL: the node dies as a crashed machine would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def start_node(workdir: Path, port: int, cluster: bool, extra: tuple[str, ...] = ()) -> RedisNode:
    directory = workdir / f"redis-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--dir", str(directory)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    if cluster:
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        argv += ["--cluster-node-timeout", "2000"]
    argv += list(extra)
    with open(directory / "redis.log", "ab") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    node = RedisNode(port, directory, process)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return True  # it answers; it wants a password (--requirepass)

    try:
        with node.client() as client:
            wait_until(f"redis-server on {port}", answers, 30)
    except RedisStartError:
        node.stop()
        raise RedisStartError(
            f"redis-server on {port} did not start:\n{log_tail(directory / 'redis.log')}"
        ) from None
    return node


@dataclass
class RedisDeployment:
    """A running standalone Redis or Cluster, and what tests do to it."""

    nodes: list[RedisNode]
    cluster: bool
    workdir: Path
    extra: tuple[str, ...] = field(default=())

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes if node.process.poll() is None]

    def client(self) -> redis.Redis | redis.RedisCluster:
        """A synchronous client of the whole deployment, for looking inside."""
        node = next(n for n in self.nodes if n.process.poll() is None)
        if self.cluster:
            return redis.RedisCluster(host=HOST, port=node.port, socket_timeout=30)
        return node.client()

    def keys(self, pattern: str) -> list[bytes]:
        """Every key matching `pattern`, on every master."""
        found: list[bytes] = []
        for node in self.masters():
            with node.client() as client:
                found += client.scan_iter(pattern)
        return found

    def masters(self) -> list[RedisNode]:
        found = []
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            with node.client() as client:
                if client.info("replication")["role"] == "master":
                    found.append(node)
        return found

    def flush(self) -> None:
        for node in self.masters():
            with node.client() as client:
                client.flushall()

    def restart(self, node: RedisNode) -> None:
        """Start a stopped or killed node again on its port (its data is gone:
        persistence is off, as in these tests' Redis)."""
        node.stop()
        self.nodes[self.nodes.index(node)] = start_node(
            self.workdir, node.port, self.cluster, self.extra
        )

    def emptied(self) -> RedisDeployment:
        """This deployment, once healthy, with every key removed."""
        self.wait_healthy()
        self.flush()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        if self.cluster:
            wait_until("the cluster", self._cluster_ok, timeout)

    def _cluster_ok(self) -> bool:
        """Every live node says cluster_state:ok; every replica is in sync."""
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            with node.client() as client:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                replication = client.info("replication")
                if replication["role"] != "master" and replication["master_link_status"] != "up":
                    return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def standalone(workdir: Path, extra: tuple[str, ...] = ()) -> Iterator[RedisDeployment]:
    (port,) = free_ports(1)
    deployment = RedisDeployment([start_node(workdir, port, False, extra)], False, workdir, extra)
    try:
        yield deployment
    finally:
        deployment.stop()


@contextlib.contextmanager
def cluster(workdir: Path, extra: tuple[str, ...] = ()) -> Iterator[RedisDeployment]:
    """Six nodes made into three masters with a replica each."""
    deployment = RedisDeployment([], True, workdir, extra)
    try:
        for port in free_ports(6):
            deployment.nodes.append(start_node(workdir, port, True, extra))
        addresses = [f"{HOST}:{node.port}" for node in deployment.nodes]
        argv = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1"]
        argv.append("--cluster-yes")
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RedisStartError(f"{shlex.join(argv)} failed:\n{done.stdout}{done.stderr}")
        deployment.wait_healthy()
        yield deployment
    finally:
        deployment.stop()
