"""The helper inside a warm sandbox (see executor/sandbox.py): runs commands
one at a time for the worker. Standard library only; started by the
worker's interpreter as `python -I -S -c SOURCE FD` inside bubblewrap.

Protocol on the stream socket FD: the helper sends b"R" once it is ready.
Each request is a 4-byte big-endian length, sent with two file descriptors
(SCM_RIGHTS: the command's stdout and stderr), then that many bytes of JSON
{"cwd", "argv", "env"}. When the command has ended, the helper kills every
other process in the sandbox (what the command left running), empties /tmp
and answers with two 4-byte big-endian signed integers: the exit code
(128 + N when a signal N ended it, as bubblewrap reports), and 1 if the
sandbox is no longer as it started (else 0). End of file on the socket ends
the helper.

"As it started": the sandbox's user owns the root directory, /dev and
/dev/shm (bubblewrap made them), so a command may add to them or replace
the symbolic links in /dev; it may leave System V IPC objects, or processes
that survived being killed. A later command must not see any of that: the
worker replaces a sandbox that is not as it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import time


def receive(control: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = control.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def start(cwd: str, argv: list[str], env: dict[str, str], out: int, err: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(cwd)
        os.execvpe(argv[0], argv, env)
    except OSError as error:
        os.write(2, f"reapi worker: cannot start {argv[0]!r}: {error}\n".encode())
    os._exit(127)


# Directories whose entries the sandbox's user could change.
OWNED = ("/", "/dev", "/dev/shm", "/dev/pts", "/tmp", "/build")
IPC = ("/proc/sysvipc/shm", "/proc/sysvipc/msg", "/proc/sysvipc/sem")


def state() -> list[object]:
    """What a command could change and a later one would see (the entries of
    /build aside: the worker empties it; /tmp should be empty by now)."""
    found: list[object] = []
    for directory in OWNED:
        status = os.stat(directory, follow_symlinks=False)
        found.append((directory, status.st_mode, status.st_uid, status.st_ino))
        if directory == "/build":
            continue
        for entry in os.scandir(directory):
            status = entry.stat(follow_symlinks=False)
            target = os.readlink(entry.path) if entry.is_symlink() else None
            found.append((entry.path, status.st_mode, status.st_uid, status.st_ino, target))
    for table in IPC:
        with contextlib.suppress(OSError), open(table) as lines:
            found.append((table, len(lines.readlines())))
    return found


def alone() -> bool:
    """Whether no process is left in the sandbox but bubblewrap's and this one,
    after killing the others (waiting up to a second for them to go)."""
    ours = {"1", str(os.getpid())}
    for _ in range(100):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return True  # nothing else there to signal
        if {name for name in os.listdir("/proc") if name.isdigit()} <= ours:
            return True
        time.sleep(0.01)
    return False


def tidy() -> None:
    """Empty /tmp (the command ran and was waited for)."""
    for entry in os.scandir("/tmp"):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def undumpable() -> None:
    """Keep commands (the same user) from tracing this process, or reading
    or writing its memory through /proc: that would let one command change
    how the helper starts the next ones."""
    import ctypes

    pr_set_dumpable = 4
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def main() -> None:
    undumpable()
    # Python ignores these; a command must start with them as the system has them.
    for number in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(number, signal.SIG_DFL)
    control = socket.socket(fileno=int(sys.argv[1]))
    control.set_inheritable(False)
    initial = state()
    control.sendall(b"R")
    while True:
        try:
            header, fds, _flags, _address = socket.recv_fds(control, 4, 2)
            if not header:
                return
            if len(fds) != 2:
                raise EOFError  # not the worker speaking
            header += receive(control, 4 - len(header))
            request = json.loads(receive(control, struct.unpack("!I", header)[0]))
        except EOFError:
            return
        out, err = fds
        for fd in fds:  # the command gets them as 1 and 2 only
            os.set_inheritable(fd, False)
        pid = start(request["cwd"], request["argv"], request["env"], out, err)
        os.close(out)
        os.close(err)
        _pid, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        try:
            clean = alone()
            tidy()
            changed = not clean or state() != initial
        except OSError:  # a command made something here unreadable
            changed = True
        control.sendall(struct.pack("!ii", code if code >= 0 else 128 - code, changed))


if __name__ == "__main__":
    main()
