"""The helper inside a warm sandbox (see executor/sandbox.py): runs commands
one at a time for the worker. Standard library only; started by the
worker's interpreter as `python -I -S -c SOURCE FD SETTINGS` inside
bubblewrap, SETTINGS being JSON: {"uid": the user to run commands as (in a
privileged sandbox, where the helper is root) or null, "rlimits": {name:
value} for each command}.

Protocol on the stream socket FD: the helper sends b"R" once it is ready.
Each request is a 4-byte big-endian length, sent with two file descriptors
(SCM_RIGHTS: the command's stdout and stderr), then that many bytes of JSON
{"cwd", "argv", "env"}. When the command has ended, the helper kills every
other process in the sandbox (what the command left running), empties /tmp
and /dev/shm and answers with three 4-byte big-endian signed integers: the
exit code (128 + N when a signal N ended it, as bubblewrap reports), 1 if the
sandbox is no longer as it started (else 0), and 1 if /tmp or /dev/shm was
full when the command ended (else 0). End of file on the socket ends the
helper.

"As it started": the sandbox's user owns the directories bubblewrap made
(the root and the mount points on it, /dev, /dev/shm), so a command may add
to them, change their modes or extended attributes, or replace the symbolic
links in /dev; it may change this helper's limits, CPU affinity, priority or
scheduling (same user, no privilege needed), and those would pass to every
later command; it may leave System V IPC objects, POSIX message queues,
keys in its keyrings, sockets in the network namespace, or processes that
survived being killed. A later command must not see any of that: the
helper compares all of it with how it was at the start, and the worker
replaces a sandbox that is not as it started. (Process IDs still count up
from one command to the next, where a fresh sandbox starts them at 2.)

Each command is started as the per-action sandbox starts it through
/usr/bin/env, without that program's exec: found on the command's PATH as
execvp(3) finds it, a file without `#!` run by /bin/sh, exit code 127 when
it is not found and 126 when it cannot be run; stdin /dev/null opened
read-write; in a session of its own (so `kill 0` ends the command's
processes, not the helper); with the resource limits of SETTINGS, as its
user (without privileges, groups or a way to gain them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import socket
import stat
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


def start(
    cwd: str, argv: list[str], env: dict[str, str], out: int, err: int, settings: dict[str, object]
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code, message = 126, ""
    try:
        os.setsid()
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_RDWR), 0)
        become(settings)
        try:
            os.chdir(cwd)
        except OSError as error:  # as bubblewrap's --chdir fails
            code, message = 1, f"cannot enter {cwd}: {error.strerror}"
        else:
            execute(argv, env)
    except FileNotFoundError as error:
        code, message = 127, f"cannot start {argv[0]!r}: {error.strerror}"
    except BaseException as error:  # the child must never return to the loop
        message = f"cannot start {argv[0]!r}: {error}"
    with contextlib.suppress(BaseException):
        os.write(2, f"reapi worker: {message}\n".encode())
    os._exit(code)


def confine(settings: dict[str, object]) -> None:
    """Take on the commands' limits and give up gaining privileges (a set-user-ID
    program runs as its caller), once, at the start: every command inherits
    both (root is not held to RLIMIT_NPROC, the commands' user is), and a
    child of a forked interpreter does as little as it can before exec."""
    limits = settings["rlimits"]
    assert isinstance(limits, dict)
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if isinstance(settings["uid"], int):
        os.setgroups([])
    import ctypes

    pr_set_no_new_privs = 38
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def become(settings: dict[str, object]) -> None:
    """Become the commands' user, where the helper is root (which drops every
    capability)."""
    uid = settings["uid"]
    if isinstance(uid, int):
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def execute(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with the command, as execvp(3) would: a name
    without a slash is looked for on the command's own PATH, and a file the
    kernel cannot run (no `#!`) is run by /bin/sh. Raises what made it fail:
    FileNotFoundError when no candidate exists."""
    name = argv[0]
    if not name:
        candidates = []
    elif "/" in name:
        candidates = [name]
    else:
        search = env.get("PATH", DEFAULT_PATH).split(":")
        candidates = [os.path.join(directory or ".", name) for directory in search]
    denied: OSError | None = None
    for path in candidates:
        try:
            os.execve(path, argv, env)
        except OSError as error:
            if error.errno == errno.ENOEXEC:
                os.execve("/bin/sh", ["/bin/sh", path, *argv[1:]], env)
            if error.errno == errno.EACCES:
                denied = error
            elif error.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
    raise denied or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


# Where a command's name is looked for when its environment has no PATH (glibc's).
DEFAULT_PATH = "/bin:/usr/bin"
# Filesystems the command's user may write besides the tree: walked whole.
OWNED = ("/", "/dev", "/dev/shm", "/dev/mqueue", "/tmp")
# The scratch ones, emptied after each command.
SCRATCH = ("/tmp", "/dev/shm")
# Namespace-wide objects, one line each (after a header) in these tables.
TABLES = (
    "/proc/sysvipc/shm",
    "/proc/sysvipc/msg",
    "/proc/sysvipc/sem",
    "/proc/keys",
    "/proc/net/unix",
)
# The network namespace's socket counts (its TCP and UDP tables take about a
# millisecond each to read, even empty). Other fields there count for the
# whole machine and move on their own.
SOCKET_COUNTS = ("/proc/net/sockstat", "/proc/net/sockstat6")
SETTINGS = ("/proc/self/oom_score_adj", "/proc/self/coredump_filter")
RLIMITS = sorted(name for name in dir(resource) if name.startswith("RLIMIT_"))
# ioprio_get's system call number, where it is known.
IOPRIO_GET = {"x86_64": 252, "aarch64": 31}.get(os.uname().machine)


def walk(top: str, found: list[object]) -> None:
    """Every entry on `top`'s filesystem below it: what it is, its mode,
    owner, extended attributes and, for a link, its target."""
    device = os.stat(top, follow_symlinks=False).st_dev
    pending = [top]
    while pending:
        path = pending.pop()
        status = os.stat(path, follow_symlinks=False)
        link = os.readlink(path) if stat.S_ISLNK(status.st_mode) else None
        attributes = _attributes(path) if link is None else []
        found.append((path, status.st_mode, status.st_uid, status.st_ino, link, attributes))
        if status.st_dev == device and stat.S_ISDIR(status.st_mode):
            with os.scandir(path) as entries:
                pending.extend(entry.path for entry in entries)


def _in_use(sockstat: str) -> list[str]:
    """The per-namespace counts of a sockstat table: sockets in use, and TCP's
    in TIME_WAIT."""
    counts = []
    for line in sockstat.splitlines():
        protocol, _, fields = line.partition(":")
        words = fields.split()
        pairs = zip(words[::2], words[1::2], strict=False)  # a "name value" list
        counts += [f"{protocol} {k} {v}" for k, v in pairs if k in ("inuse", "tw")]
    return counts


def _attributes(path: str) -> list[str]:
    try:
        return sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as error:  # a filesystem without them: the same answer each time
        return [f"({error.errno})"]


def _io_priority() -> int:
    """ioprio_get(IOPRIO_WHO_PROCESS, 0), or -1 where the call is not known."""
    import ctypes

    return -1 if IOPRIO_GET is None else int(ctypes.CDLL(None).syscall(IOPRIO_GET, 1, 0))


def state() -> list[object]:
    """What a command could change and a later one would see (the tree
    aside: the worker puts it back; /tmp is emptied before this is asked)."""
    found: list[object] = []
    for top in OWNED:
        if os.path.isdir(top):
            walk(top, found)
    for table in (*TABLES, *SETTINGS, *SOCKET_COUNTS):
        with contextlib.suppress(OSError), open(table) as lines:
            if table in TABLES:
                found.append((table, len(lines.readlines())))
            elif table in SETTINGS:
                found.append((table, lines.read()))
            else:
                found.append((table, _in_use(lines.read())))
    found.extend((name, resource.getrlimit(getattr(resource, name))) for name in RLIMITS)
    found.append(("affinity", sorted(os.sched_getaffinity(0))))
    found.append(("nice", os.getpriority(os.PRIO_PROCESS, 0)))
    found.append(("scheduler", os.sched_getscheduler(0), os.sched_getparam(0).sched_priority))
    found.append(("io priority", _io_priority()))
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


def full() -> bool:
    """Whether a scratch filesystem has no room left."""
    return any(os.statvfs(top).f_bavail == 0 for top in SCRATCH)


def tidy() -> None:
    """Empty /tmp and /dev/shm (the command ran and was waited for)."""
    for top in SCRATCH:
        for entry in os.scandir(top):
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
    settings = json.loads(sys.argv[2])
    confine(settings)
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
        pid = start(request["cwd"], request["argv"], request["env"], out, err, settings)
        os.close(out)
        os.close(err)
        _pid, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        filled = False
        try:
            clean = alone()
            filled = full()
            tidy()
            changed = not clean or state() != initial
        except Exception:  # a command made something here unreadable, or very deep
            changed = True
        reply = (code if code >= 0 else 128 - code, changed, filled)
        control.sendall(struct.pack("!iii", *reply))


if __name__ == "__main__":
    main()
