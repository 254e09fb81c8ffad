"""Shared test helpers: a real `reapi serve` process, and digest shortcuts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path

import grpc
import pytest

from reapi.core.digests import Digest, DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2

REPO = Path(__file__).resolve().parent.parent
_SERVING = re.compile(r"serving on (\S+):(\d+)")


async def expect_status(call: Awaitable[object], code: grpc.StatusCode, text: str) -> None:
    """`call` fails with `code`, and its message contains `text`."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    assert text in (raised.value.details() or ""), raised.value.details()


def sha256(data: bytes) -> Digest:
    return DigestFunction.SHA256.digest_of(data)


def proto(digest: Digest) -> re_pb2.Digest:
    return digest.to_proto()


class ServerProcess:
    """`python -m reapi serve` as a child process, listening on a free loopback port,
    with `workers` local workers (none unless asked: most tests need no execution)."""

    def __init__(
        self,
        storage: Path,
        *extra: str,
        workers: int = 0,
        home: Path | None = None,
        redis: Sequence[str] | None = None,
    ) -> None:
        """With `redis` (URLs), the CAS and action cache are there, not in
        `storage` (which then only names the log); with `redis=()`, where
        they are comes from `extra` (a --config file)."""
        self.storage = storage
        self.log_path = storage.parent / f"{storage.name}-server.log"
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ, REAPI_HOME=str(home or storage.parent / "home"))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        where = ["--storage", str(storage)] if redis is None else [f"--redis={u}" for u in redis]
        args = ["--listen", "127.0.0.1:0", *where, "--workers", str(workers), *extra]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reapi", "serve", *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.port = self._wait_for_port()
        self.address = f"127.0.0.1:{self.port}"

    def _wait_for_port(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _SERVING.search(self.log())
            if match:
                return int(match.group(2))
            if self.process.poll() is not None:
                self._log.close()
                raise RuntimeError(f"server exited early:\n{self.log()}")
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log(self) -> str:
        """What this process has logged (the file may hold earlier runs before it)."""
        with open(self.log_path, "rb") as file:
            file.seek(self._log_start)
            return file.read().decode(errors="replace")


class WorkerProcess:
    """`python -m reapi worker` as a child process, connected to `server` over TCP."""

    def __init__(
        self,
        server: ServerProcess,
        name: str,
        workdir: Path,
        slots: int = 1,
        extra: Sequence[str] = (),
        wrapper: Sequence[str] = (),
    ) -> None:
        """`extra`: more options; `wrapper`: a command to start it with (prlimit...)."""
        self.name = name
        self.server = server
        self.log_path = workdir.parent / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                *wrapper,
                sys.executable,
                "-m",
                "reapi",
                "worker",
                "--server",
                f"grpc://{server.address}",
                "--name",
                name,
                "--workdir",
                str(workdir),
                "--slots",
                str(slots),
                *extra,
            ],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_connected(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while f"worker {self.name} connected (" not in self.server.log():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.server.log()
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self._log.close()
