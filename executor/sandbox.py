"""Running one command in a sandbox.

`bwrap` (bubblewrap): a fresh user, PID, network, IPC and UTS namespace (no
network at all); the system directories read-only; the action's tree, mounted
at /build, the only writable place besides a private /tmp; an environment that
is exactly the Command's. `none`: the command runs directly in the action's
tree, with the same environment; for machines without bubblewrap, and it says
so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from reapi.conventions import SANDBOX_ROOT

log = logging.getLogger(__name__)

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")
# Inside the user namespace the action runs as this (unprivileged) user.
SANDBOX_UID = 1000


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    timed_out: bool


class Sandbox:
    def __init__(self, kind: str) -> None:
        if kind not in ("bwrap", "none"):
            raise ValueError(f"unknown sandbox {kind!r}; use bwrap or none")
        self._bwrap = shutil.which("bwrap") or ""
        if kind == "bwrap" and not self._bwrap:
            raise ValueError(
                "bubblewrap (bwrap) is not installed; install it or use --sandbox none"
            )
        if kind == "none":
            log.warning("sandbox 'none': actions run unconfined, with the worker's rights")
        self.kind = kind

    def argv(
        self, root: Path, workdir: str, arguments: list[str], environment: dict[str, str]
    ) -> list[str]:
        if self.kind == "none":
            return list(arguments)
        argv = [
            self._bwrap,
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
        ]
        for directory in SYSTEM_DIRS:
            argv += ["--ro-bind-try", directory, directory]
        argv += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--bind",
            str(root),
            SANDBOX_ROOT,
            "--chdir",
            os.path.join(SANDBOX_ROOT, workdir),
            "--clearenv",
        ]
        for name, value in environment.items():
            argv += ["--setenv", name, value]
        # bwrap sets PWD after --chdir; put it back as the Command has it (or not).
        pwd = environment.get("PWD")
        fixup = ["/usr/bin/env", f"PWD={pwd}"] if pwd is not None else ["/usr/bin/env", "-u", "PWD"]
        return [*argv, "--", *fixup, *arguments]

    async def run(
        self,
        root: Path,
        workdir: str,
        arguments: list[str],
        environment: dict[str, str],
        stdout: Path,
        stderr: Path,
        timeout: float,
    ) -> Outcome:
        """Run to completion, or kill the whole process group at `timeout`."""
        argv = self.argv(root, workdir, arguments, environment)
        cwd = root / workdir if self.kind == "none" else root
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=environment if self.kind == "none" else {},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as error:
                err.write(f"reapi worker: cannot start {arguments[0]!r}: {error}\n".encode())
                return Outcome(exit_code=127, timed_out=False)
            try:
                async with asyncio.timeout(timeout):
                    code = await _exit_code(process)
            except (TimeoutError, asyncio.CancelledError) as stopped:
                _kill_group(process.pid)
                process.wait()
                if isinstance(stopped, asyncio.CancelledError):
                    raise
                return Outcome(exit_code=-signal.SIGKILL, timed_out=True)
        return Outcome(exit_code=code, timed_out=False)


async def _exit_code(process: subprocess.Popen[bytes]) -> int:
    """Wait for `process` without a thread: its pidfd becomes readable when it
    exits (asyncio's own child watcher starts a thread for every process)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError:  # a kernel before 5.3
        return await asyncio.to_thread(process.wait)
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return process.wait()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
