"""The native client (shim/native/reapi-cc.c): built by the agent, run by the
reapi-cc script for compiles, and the same to a build as the Python client."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from shim.agent import build_native_client

SOURCE = '#include "answer.h"\nint answer(void) { return ANSWER; }\n'
WARNS = "int f(int x) { int unused; return x; }\n"


def script() -> str:
    found = shutil.which("reapi-cc")
    assert found, "reapi-cc is not installed (pip install -e .)"
    return os.path.realpath(found)


@pytest.fixture
def native(reapi_home: Path) -> Path:
    directory = reapi_home / "shim"
    directory.mkdir(parents=True)
    asyncio.run(build_native_client(directory))
    binary = directory / "reapi-cc-native"
    assert os.access(binary, os.X_OK)
    return binary


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "answer.c").write_text(SOURCE)
    (tmp_path / "answer.h").write_text("#define ANSWER 42\n")
    (tmp_path / "warns.c").write_text(WARNS)
    subprocess.run(["gcc", "-O2", "-c", "answer.c", "-o", "gcc.o"], cwd=tmp_path, check=True)
    return tmp_path


def run_native(
    native: Path, args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """As the reapi-cc script runs it: the script's path first."""
    return subprocess.run(
        [str(native), script(), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def stats(env: dict[str, str]) -> dict[str, int]:
    import json

    out = subprocess.run(["reapi-cc", "--stats", "--json"], env=env, capture_output=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_built_once_per_source(native: Path) -> None:
    inode = native.stat().st_ino
    asyncio.run(build_native_client(native.parent))
    assert native.stat().st_ino == inode
    (native.parent / "reapi-cc-native.sha256").write_text("another source")
    asyncio.run(build_native_client(native.parent))
    assert native.stat().st_ino != inode


def test_the_agent_builds_it(reapi_home: Path) -> None:
    subprocess.run(["reapi-cc", "--zero-stats"], check=True, capture_output=True)
    binary = reapi_home / "shim" / "reapi-cc-native"
    deadline = time.monotonic() + 30
    while not binary.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.access(binary, os.X_OK)


def test_the_script_hands_compiles_to_it(reapi_home: Path, tmp_path: Path) -> None:
    """Compiles go to the native client; usage, --stats and REAPI_CC_NATIVE=0
    stay with Python. (A stand-in records how it was called.)"""
    stand_in = reapi_home / "shim" / "reapi-cc-native"
    stand_in.parent.mkdir(parents=True)
    calls = tmp_path / "calls"
    stand_in.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stand_in.chmod(0o755)
    subprocess.run([script(), "gcc", "-c", "x.c"], cwd=tmp_path, check=True)
    assert calls.read_text() == f"{script()} gcc -c x.c\n"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "cc").symlink_to(script())
    subprocess.run([tmp_path / "bin" / "cc", "-c", "y.c"], cwd=tmp_path, check=True)
    assert calls.read_text().splitlines()[1] == f"{tmp_path / 'bin' / 'cc'} -c y.c"
    usage = subprocess.run([script()], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: reapi-cc" in usage.stderr
    env = dict(os.environ, REAPI_CC_NATIVE="0", REAPI_CC_DISABLE="1")
    (tmp_path / "z.c").write_text("int z;\n")
    subprocess.run([script(), "gcc", "-c", "z.c"], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "z.o").exists()
    assert len(calls.read_text().splitlines()) == 2


def test_cache_hits_through_it(native: Path, project: Path, shim_env: dict[str, str]) -> None:
    python = dict(shim_env, REAPI_CC_NATIVE="0")
    first = subprocess.run(
        [script(), "gcc", "-O2", "-c", "answer.c", "-o", "python.o"], cwd=project, env=python
    )
    assert first.returncode == 0
    before = stats(shim_env)
    again = ["gcc", "-O2", "-c", "answer.c", "-o", "python.o"]
    result = run_native(native, again, project, shim_env)
    assert result.returncode == 0, result.stderr
    after = stats(shim_env)
    assert after["cache_hits"] == before["cache_hits"] + 1
    assert after["local_fallbacks"] == before["local_fallbacks"]
    assert (project / "python.o").read_bytes() == (project / "gcc.o").read_bytes()


@pytest.mark.parametrize("source", ["warns.c", "missing.c"])
def test_diagnostics_and_status_are_gccs(
    native: Path, project: Path, shim_env: dict[str, str], source: str
) -> None:
    """A warning (remote run, exit 0) and an error (exit 1) read as gcc's own."""
    args = ["-Wall", "-c", source, "-o", "out.o"]
    ours = run_native(native, ["gcc", *args], project, shim_env)
    theirs = subprocess.run(["gcc", *args], cwd=project, capture_output=True, text=True)
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        theirs.returncode,
        theirs.stdout,
        theirs.stderr,
    )
    assert theirs.stderr  # the comparison is about something


def test_without_an_agent_python_takes_over(native: Path, project: Path, reapi_home: Path) -> None:
    """No agent yet: the Python client starts one and the compile still works."""
    result = run_native(native, ["gcc", "-O2", "-c", "answer.c", "-o", "out.o"], project)
    assert result.returncode == 0, result.stderr
    assert (project / "out.o").read_bytes() == (project / "gcc.o").read_bytes()
    assert (reapi_home / "shim" / "agent.pid").exists()


def test_disabled_compiles_locally_without_an_agent(
    native: Path, project: Path, reapi_home: Path
) -> None:
    env = dict(os.environ, REAPI_CC_DISABLE="1")
    result = run_native(native, ["gcc", "-O2", "-c", "answer.c", "-o", "out.o"], project, env)
    assert result.returncode == 0, result.stderr
    assert (project / "out.o").read_bytes() == (project / "gcc.o").read_bytes()
    assert not (reapi_home / "shim" / "agent.pid").exists()


def test_masquerade_finds_the_real_compiler(native: Path, project: Path) -> None:
    bin_dir = project / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcc").symlink_to(script())
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [str(native), str(bin_dir / "gcc"), "-O2", "-c", "answer.c", "-o", "out.o"],
        cwd=project, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (project / "out.o").read_bytes() == (project / "gcc.o").read_bytes()


class FakeAgent:
    """A socket at the agent's place that answers every request with `reply`."""

    def __init__(self, path: Path, reply: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen()
        self.reply = reply
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with connection:
                data = b""
                while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                    chunk = connection.recv(1 << 16)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                connection.sendall(self.reply)


@pytest.mark.parametrize(
    "reply",
    [
        b"\0\0\0\x06Lnoway",  # "compile locally"
        b"\0\0\0\x03Xab",  # a result too short to be one
        b"\0\0\0\x10X\0\0\0\0\0\0\xff\xffdata",  # stdout larger than the reply
        b"\0\0\0\x10short",  # the agent hung up halfway
        b"\x7f\xff\xff\xff",  # an impossible length
    ],
)
def test_any_other_answer_compiles_locally(
    native: Path, project: Path, reapi_home: Path, reply: bytes
) -> None:
    agent = FakeAgent(reapi_home / "shim" / "agent.sock", reply)
    result = run_native(native, ["gcc", "-O2", "-c", "answer.c", "-o", "out.o"], project)
    agent.sock.close()
    assert result.returncode == 0, result.stderr
    assert (project / "out.o").read_bytes() == (project / "gcc.o").read_bytes()
    # The request was the protocol's: the agent's own parser reads it.
    from shim.protocol import parse_request

    request = parse_request(agent.requests[0][4:])
    assert request["cwd"] == str(project)
    assert request["argv"] == [shutil.which("gcc"), "-O2", "-c", "answer.c", "-o", "out.o"]
    assert request["env"]["REAPI_HOME"] == os.environ["REAPI_HOME"]
