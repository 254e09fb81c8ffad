"""Running one command in a sandbox.

`bwrap` (bubblewrap): a fresh PID, network, IPC and UTS namespace (no network
at all); the system directories read-only; the action's tree, mounted at
/build, the only writable place besides a private /tmp and /dev/shm; an
environment that is exactly the Command's; the limits of executor/limits.py.
Who the command runs as: a worker run by root gives each slot a user of its
own (executor/limits.py), without privileges and unknown to the host, which
owns the slot's tree and nothing else, so the host's files are as closed to it
as to any stranger and the worker's cached inputs (owned by root, read-only)
cannot be changed through their hard links; bubblewrap itself runs as root,
the command as that user. A worker that is not root has no other user to
give: bubblewrap makes a user namespace in which the command is user 1000,
which is the worker's user outside (the host's files are safe from it as they
are from the worker, but the worker's own files, its cache among them, are
not). `none`: the command runs directly in the action's tree, with the same
environment and no limits; for machines without bubblewrap, and it says so in
the log.

Setting up and tearing down bubblewrap's namespaces costs about 4 ms of CPU,
more than many actions take. So each slot keeps one bubblewrap sandbox alive
(a "warm" sandbox) with a small helper inside (executor/sandbox_helper.py, run
by this interpreter, whose installation is mounted read-only): the helper
starts each command, and after it ends kills whatever the command left
running and empties /tmp. The slot's tree is the same directory every time,
put back to its input tree between actions and kept for the next one
(executor/layout.py). A sandbox whose command changed what a later command
would see (the helper checks: its docstring says what), timed out or was
cancelled, or whose tree could not be emptied, is thrown away and the next
action gets a new one. Where the helper cannot start, every action gets its
own bubblewrap.

Each slot holds an flock on `slot-ID.lock` beside its directory for as long
as it uses it. A worker that died (killed, or its machine restarted) leaves
its slots behind unlocked: the next worker to start on the same directory
removes them. Workers may share one (`reapi serve` starts its local workers
so): a locked slot is another's, and stays.

Use: `async with sandbox.slot() as slot:` `slot.lay_out(tree)`, `await
slot.run(...)`, collect outputs from `slot.root`; leaving the block puts the
tree back.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from executor import layout
from executor.limits import DEFAULT_LIMITS, WATCH_SECONDS, Limits, SandboxUsers, written
from reapi.core.conventions import PROVIDED_DIRS, SANDBOX_ROOT, provided_by

log = logging.getLogger(__name__)

# Inside the user namespace of a worker that is not root, the command runs as this user.
SANDBOX_UID = 1000
HELPER_SOURCE = Path(__file__).with_name("sandbox_helper.py")
# Seconds a new warm sandbox may take to say it is ready.
START_TIMEOUT = 20.0
# The command's scratch directories: each a tmpfs of the /tmp limit.
SCRATCH = ("/tmp", "/dev/shm")


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    timed_out: bool
    # The limit it went past, when the worker can tell (executor/limits.py):
    # "tree" (it was killed), "file" (SIGXFSZ ended it) or "tmp" (/tmp or /dev/shm was full).
    exceeded: str | None = None


@dataclass(frozen=True)
class _Command:
    workdir: str  # relative to the tree
    arguments: list[str]
    environment: dict[str, str]
    out: IO[bytes]  # where its stdout and stderr go
    err: IO[bytes]


class SandboxBroken(Exception):
    """The warm sandbox died under a command (not the command's own failure)."""


class Sandbox:
    """The sandbox of one worker: `slots` places to run actions in, each
    with its own warm bubblewrap (kind `bwrap`)."""

    def __init__(
        self,
        kind: str,
        workdir: Path,
        slots: int = 1,
        provided: tuple[str, ...] = PROVIDED_DIRS,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        """`provided`: the directories mounted read-only at their own paths
        (reapi/core/conventions.py): PROVIDED_DIRS and any the worker adds."""
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
        self.provided = provided
        self.limits = limits
        # Root runs commands as the slots' own users; anyone else in a user namespace.
        self.privileged = kind == "bwrap" and os.geteuid() == 0
        self._users = SandboxUsers()
        self.workdir = Path(workdir)
        self.warm = kind == "bwrap"  # until a helper fails to start
        self.workdir.mkdir(parents=True, exist_ok=True)
        _reclaim(self.workdir)
        self._free: asyncio.Queue[Slot] = asyncio.Queue()
        self._slots = [
            Slot(self, self._users.claim() if self.privileged else None)
            for _ in range(max(1, slots))
        ]
        for slot in self._slots:
            self._free.put_nowait(slot)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """A free slot; its tree is put back (Slot.clear) when the block is left."""
        slot = await self._free.get()
        try:
            slot.prepare()
            yield slot
        finally:
            try:
                slot.clear()
            finally:
                self._free.put_nowait(slot)

    def close(self) -> None:
        """Stop every warm sandbox (their commands die with them) and remove
        the slots' directories."""
        for slot in self._slots:
            slot.stop()
            try:
                layout.remove(str(slot.place))
            except OSError as error:
                log.warning("cannot remove %s: %s", slot.place, _short(error))
            else:
                slot.lock_path.unlink(missing_ok=True)
            slot.unlock()
        self._users.release_all()

    def argv(
        self,
        root: Path,
        workdir: str,
        arguments: list[str],
        environment: dict[str, str],
        uid: int | None,
    ) -> list[str]:
        """bubblewrap's command line for running `arguments` once, in `root`
        mounted at SANDBOX_ROOT, as `uid` (a privileged sandbox) within the
        limits."""
        if self.kind == "none":
            return list(arguments)
        command = [*self.limits.prlimit()]
        if uid is not None:
            command += [
                "/usr/bin/setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--no-new-privs",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
            ]
        command += _through_env(arguments, environment)
        return self.bwrap(root, workdir, environment, command)

    def bwrap(
        self,
        root: Path,
        workdir: str,
        environment: dict[str, str],
        command: list[str],
        extra_binds: tuple[str, ...] = (),
    ) -> list[str]:
        """bubblewrap running `command` (as root in a privileged sandbox)."""
        if self.privileged:
            argv = [self._bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net"]
            argv += ["--unshare-uts", "--unshare-cgroup-try"]
        else:
            argv = [self._bwrap, "--unshare-all", "--uid", str(SANDBOX_UID)]
            argv += ["--gid", str(SANDBOX_UID)]
        argv += ["--die-with-parent", "--new-session"]
        for directory in self.provided:
            argv += ["--ro-bind-try", directory, directory]
        made = set()
        for directory in extra_binds:
            # The directories above it as any user may pass them (bubblewrap
            # copies their modes: /root's, say), the host's hidden.
            for parent in reversed(Path(directory).parents[:-1]):
                if str(parent) not in made and not provided_by(str(parent), self.provided):
                    argv += ["--perms", "0755", "--dir", str(parent)]
                    made.add(str(parent))
            argv += ["--ro-bind", directory, directory]
        argv += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--mqueue",
            "/dev/mqueue",
        ]
        for scratch in SCRATCH:
            argv += ["--perms", "1777", "--size", str(self.limits.tmp), "--tmpfs", scratch]
        argv += [
            "--bind",
            str(root),
            SANDBOX_ROOT,
            "--chdir",
            os.path.join(SANDBOX_ROOT, workdir),
            "--clearenv",
        ]
        for name, value in environment.items():
            argv += ["--setenv", name, value]
        return [*argv, "--", *command]


def _locked(path: Path) -> int:
    """A new lock file at `path`, locked: made under another name and renamed
    into place, so that no worker ever finds it unlocked while its slot lives."""
    making = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(making)
        raise
    return fd


def _reclaim(workdir: Path) -> None:
    """Remove the slots that no running worker holds: each `slot-ID` whose
    lock nobody holds, or that has no lock (a lock is made before its slot).
    The lock goes last, so a slot that cannot be removed is tried again."""
    for lock_path in workdir.glob("slot-*.lock"):
        try:
            lock = open(lock_path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue  # removed by another worker meanwhile
        except OSError as error:  # not ours to remove (another user's worker)
            log.warning("cannot check %s: %s", lock_path, _short(error))
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live slot
            _remove_slot(lock_path.with_suffix(""), lock_path)
    for place in workdir.glob("slot-*"):
        if place.is_dir() and not place.with_name(f"{place.name}.lock").exists():
            _remove_slot(place, None)
    # A lock still being made is renamed into place at once: one that is not
    # was left by a worker that died making it.
    for making in workdir.glob(".slot-*.lock.*"):
        with contextlib.suppress(OSError):
            if time.time() - making.stat().st_mtime > 60:
                making.unlink()


def _remove_slot(place: Path, lock_path: Path | None) -> None:
    try:
        layout.remove(str(place))
    except OSError as error:
        log.warning("cannot remove the abandoned slot %s: %s", place, _short(error))
        return
    log.info("removed %s, left by a worker that stopped without cleaning up", place)
    if lock_path is not None:
        lock_path.unlink(missing_ok=True)


class Slot:
    """One place to run actions: `root` (the input tree, mounted at
    SANDBOX_ROOT), the files the command's stdout and stderr go to, and the
    slot's warm sandbox, if any."""

    def __init__(self, sandbox: Sandbox, uid: int | None) -> None:
        """`uid`: the user its commands run as (a privileged sandbox)."""
        self._sandbox = sandbox
        self.uid = uid
        self.limits = sandbox.limits
        self._warm: _Warm | None = None
        self._lock: int | None = None
        self._new_place()

    def _new_place(self) -> None:
        name = f"slot-{uuid.uuid4().hex}"
        self.place = self._sandbox.workdir / name
        self.lock_path = self._sandbox.workdir / f"{name}.lock"
        self._lock = _locked(self.lock_path)
        self.root = self.place / "root"
        self.stdout = self.place / "stdout"
        self.stderr = self.place / "stderr"
        # What the tree holds (executor/layout.py); None when that is not known.
        self._kept: layout.Dir | None = layout.Dir()

    def prepare(self) -> None:
        """The tree's directory, made if it is not there yet (clear() resets
        it after every action, as executor/layout.py says), the slot's user's."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.uid is not None:
            os.chown(self.root, self.uid, self.uid)

    def lay_out(self, tree: layout.Dir) -> None:
        """Make the tree hold `tree` (and nothing else), from what it kept."""
        root = str(self.root)
        have, self._kept = self._kept, None
        try:
            if have is not None:
                layout.lay_out(root, have, tree, self.uid)
                self._kept = tree
                return
        except OSError as error:
            log.warning("cannot lay the input tree out over the last one: %s", _short(error))
        layout.empty(root)
        layout.lay_out(root, layout.Dir(), tree, self.uid)
        self._kept = tree

    def clear(self) -> None:
        """Put the tree back to the input tree the action was given, for the
        next action to start from; else empty it (the warm sandbox has it
        mounted, so the directory itself stays). A tree that cannot be emptied
        is abandoned, with its sandbox: the slot moves to a new directory."""
        root = str(self.root)
        kept, self._kept = self._kept, None
        try:
            if kept is not None:
                layout.restore(root, kept)
                self._kept = kept
                return
        except Exception as error:  # whatever a command made of its tree
            log.warning("cannot restore %s: %s", root, _short(error))
        try:
            layout.empty(root)
            self._kept = layout.Dir()
            return
        except Exception as error:
            log.warning("cannot empty %s: %s", root, _short(error))
        log.warning("%s is abandoned; the slot starts again elsewhere", self.place)
        self.stop()
        abandoned = self._lock
        self._new_place()
        if abandoned is not None:
            os.close(abandoned)  # the next worker to start tries to remove it again

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def stop(self) -> None:
        if self._warm is not None:
            self._warm.kill()
            self._warm = None

    async def run(
        self, workdir: str, arguments: list[str], environment: dict[str, str], timeout: float
    ) -> Outcome:
        """Run to completion (stdout and stderr to the slot's files), or kill
        it at `timeout`, or when it has written more than the tree limit."""
        sandbox = self._sandbox
        if sandbox.warm and self._warm is None:
            self._warm = await _Warm.start(sandbox, self.root, self.uid)
            if self._warm is None:
                log.warning("no warm sandbox; every action gets its own bubblewrap")
                sandbox.warm = False
        for path in (self.stdout, self.stderr):  # new files: nothing old can write to them
            path.unlink(missing_ok=True)
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            command = _Command(workdir, arguments, environment, out, err)
            if self._warm is not None:
                running = asyncio.ensure_future(self._run_warm(self._warm, command))
            else:
                running = asyncio.ensure_future(self._run_once(command))
            watching = asyncio.ensure_future(self._watch())
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.wait((running, watching), return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                pass
            finally:
                watching.cancel()
                if not running.done():  # timed out, past the tree limit, or cancelled
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
        if running.cancelled():
            if watching.done() and not watching.cancelled():
                return Outcome(128 + signal.SIGKILL, timed_out=False, exceeded="tree")
            return Outcome(exit_code=-signal.SIGKILL, timed_out=True)
        code, tmp_full = running.result()
        exceeded = "file" if code == 128 + signal.SIGXFSZ else None
        if code != 0 and tmp_full:
            exceeded = "tmp"
        return Outcome(exit_code=code, timed_out=False, exceeded=exceeded)

    async def _watch(self) -> None:
        """Return once the command has written more than the tree limit."""
        limit = self._sandbox.limits.tree
        files = (self.stdout, self.stderr)
        await asyncio.sleep(WATCH_SECONDS)  # a quick command is done before the first look
        # The inodes of the input files (what a command wrote is the rest): only
        # for a command that runs this long.
        inputs = self._kept.inodes() if self._kept is not None else set()
        while await asyncio.to_thread(written, self.root, inputs, files) <= limit:
            await asyncio.sleep(WATCH_SECONDS)

    async def _run_warm(self, warm: _Warm, command: _Command) -> tuple[int, bool]:
        """In the warm sandbox, which is thrown away if the command changed it,
        or was stopped (cancelled, timed out); also whether /tmp or /dev/shm was full."""
        try:
            code, changed, tmp_full = await warm.run(command)
        except (asyncio.CancelledError, SandboxBroken):
            self.stop()
            raise
        if changed:
            log.info("an action changed its sandbox; the next one gets a new sandbox")
            self.stop()
        return code, tmp_full

    async def _run_once(self, command: _Command) -> tuple[int, bool]:
        """A process of its own: `none`, or a bubblewrap for this command alone
        (which cannot tell whether its /tmp was full)."""
        sandbox = self._sandbox
        environment = command.environment
        argv = sandbox.argv(self.root, command.workdir, command.arguments, environment, self.uid)
        cwd = self.root / command.workdir if sandbox.kind == "none" else self.root
        try:
            process = _popen(
                argv,
                bwrap=sandbox.kind == "bwrap",
                cwd=cwd,
                env=environment if sandbox.kind == "none" else {},
                stdin=subprocess.DEVNULL,
                stdout=command.out,
                stderr=command.err,
                start_new_session=True,
            )
        except OSError as error:
            name = command.arguments[0]
            command.err.write(f"reapi worker: cannot start {name!r}: {error}\n".encode())
            return 127, False
        try:
            return await _exit_code(process), False
        except asyncio.CancelledError:
            _kill_group(process.pid)
            process.wait()
            raise


class _Warm:
    """A bubblewrap sandbox that stays up, with sandbox_helper.py inside
    taking commands over a socket."""

    def __init__(self, process: subprocess.Popen[bytes], control: socket.socket) -> None:
        self.process = process
        self.control = control

    @classmethod
    async def start(cls, sandbox: Sandbox, root: Path, uid: int | None) -> _Warm | None:
        """A new warm sandbox over `root`, or None if the helper cannot start."""
        python = os.path.realpath(sys.executable)
        binds = tuple(
            sorted(
                {
                    prefix
                    for prefix in (sys.base_prefix, os.path.dirname(os.path.dirname(python)))
                    if not provided_by(prefix, sandbox.provided)
                }
            )
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The helper runs as root in a privileged sandbox, starting each command as `uid`.
        settings = json.dumps({"uid": uid, "rlimits": sandbox.limits.rlimits()})
        helper = ["-I", "-S", "-c", HELPER_SOURCE.read_text(), str(theirs.fileno()), settings]
        argv = sandbox.bwrap(root, "", {}, [python, *helper], extra_binds=binds)
        try:
            process = _popen(
                argv,
                bwrap=True,
                env={},  # nothing of the worker's: bubblewrap is the sandbox's first process
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,  # the helper's own complaints go to the worker's log
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except OSError as error:
            log.warning("cannot start bubblewrap: %s", error)
            ours.close()
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        warm = cls(process, ours)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                ready = await asyncio.get_running_loop().sock_recv(ours, 1)
        except (TimeoutError, OSError):
            ready = b""
        except asyncio.CancelledError:
            warm.kill()
            raise
        if ready != b"R":
            log.warning("the warm sandbox's helper did not start (bwrap exit %s)", process.poll())
            warm.kill()
            return None
        return warm

    async def run(self, command: _Command) -> tuple[int, bool, bool]:
        """Run one command: its exit code (128 + N for signal N, as bubblewrap
        reports it), whether it left the sandbox changed (then it must not
        serve another), and whether /tmp or /dev/shm was full when it ended.
        SandboxBroken if the sandbox died meanwhile."""
        cwd = os.path.join(SANDBOX_ROOT, command.workdir)
        request = {"cwd": cwd, "argv": command.arguments, "env": command.environment}
        data = json.dumps(request).encode()
        loop = asyncio.get_running_loop()
        try:
            socket.send_fds(
                self.control,
                [struct.pack("!I", len(data))],
                [command.out.fileno(), command.err.fileno()],
            )
            await loop.sock_sendall(self.control, data)
            reply = b""
            while len(reply) < 12:
                chunk = await loop.sock_recv(self.control, 12 - len(reply))
                if not chunk:
                    raise SandboxBroken("the warm sandbox ended under a command")
                reply += chunk
        except OSError as error:
            raise SandboxBroken(f"the warm sandbox failed: {error}") from None
        code, changed, full = struct.unpack("!iii", reply)
        return code, bool(changed), bool(full)

    def kill(self) -> None:
        self.control.close()
        _kill_group(self.process.pid)
        self.process.wait()


def _popen(argv: list[str], bwrap: bool, **options: Any) -> subprocess.Popen[bytes]:
    """Start `argv`; bubblewrap reads its options from a file descriptor
    (`--args`), so that the sandbox's first process (bubblewrap, whose command
    line any command there can read) shows only the command it runs: not the
    worker's directories, nor the command's environment."""
    if not bwrap:
        return subprocess.Popen(argv, **options)
    end = argv.index("--")
    arguments = os.memfd_create("bwrap-arguments", os.MFD_CLOEXEC)
    try:
        with open(arguments, "wb", closefd=False) as file:
            file.write(b"".join(os.fsencode(option) + b"\0" for option in argv[1:end]))
        os.lseek(arguments, 0, os.SEEK_SET)
        passed = (*options.pop("pass_fds", ()), arguments)
        command = [argv[0], "--args", str(arguments), *argv[end:]]
        return subprocess.Popen(command, pass_fds=passed, **options)
    finally:
        os.close(arguments)


def _short(error: Exception) -> str:
    """An error without the path it names (a command can make that very long)."""
    return (error.strerror if isinstance(error, OSError) else None) or repr(error)[:200]


def _through_env(arguments: list[str], environment: dict[str, str]) -> list[str]:
    """How a bubblewrap of its own starts a command: /usr/bin/env finds it on the
    Command's PATH (running a script without `#!` with /bin/sh, as a shell would),
    with PWD as the Command has it, or not at all (bwrap sets PWD after --chdir).
    A warm sandbox's helper does the same without running env."""
    pwd = environment.get("PWD")
    fixup = [f"PWD={pwd}"] if pwd is not None else []
    unset = [] if pwd is not None else ["-u", "PWD"]
    return ["/usr/bin/env", *unset, "--", *fixup, *arguments]


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
