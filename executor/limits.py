"""What one action may use on a worker, and how the worker holds it to that.

Four limits, each set by a `reapi worker` flag (LIMIT_OPTIONS in reapi/frontend/cli.py):

- processes (`--max-processes`): RLIMIT_NPROC, set inside the action's
  sandbox. Where the worker runs as root every slot runs its actions as a
  user of its own (SandboxUsers), so one action's processes never count
  against another's; a worker that is not root gives each action a user
  namespace of its own, where the count is the namespace's.
- memory (`--max-memory`): RLIMIT_DATA, the writable memory of each process
  (heap, stacks of threads, private mappings; not what merely reserves
  address space). A per-process limit: an action of several processes may
  use that much in each.
- /tmp (`--max-tmp`): /tmp and /dev/shm are each a tmpfs of this size (tmpfs
  lives in memory).
- tree (`--max-tree`): what the action writes into its tree and to its stdout
  and stderr, all together, measured by the worker every WATCH_SECONDS (an
  action past it is killed); no single file may pass it either (RLIMIT_FSIZE,
  which ends the writer with SIGXFSZ at once).

The mechanism is rlimits and tmpfs sizes, which every Linux has. Control
groups would bound an action's memory and processes as a whole, but they
need a cgroup v2 hierarchy delegated to the worker with the memory and pids
controllers, and are not used yet: the worker logs the limits (`describe`)
and why not (`cgroup_v2_state`) when it starts.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cas.gc import human

GIB = 1024**3
# How often the worker measures what an action wrote (seconds).
WATCH_SECONDS = 0.5
# Where the users that root workers run actions as start (0x70000000: far above
# the users of /etc/passwd, systemd's and the usual subordinate ranges), and
# how many there may be on one machine.
SANDBOX_UID_BASE = 1_879_048_192
SANDBOX_UIDS = 65_536


@dataclass(frozen=True)
class Limits:
    processes: int = 1024
    memory: int = 8 * GIB
    tmp: int = 1 * GIB
    tree: int = 16 * GIB

    def rlimits(self) -> dict[str, int]:
        """The resource limits an action's processes start with, by name."""
        return {
            "RLIMIT_NPROC": self.processes,
            "RLIMIT_DATA": self.memory,
            "RLIMIT_FSIZE": self.tree,
        }

    def prlimit(self) -> list[str]:
        """The same, as prlimit(1) sets them for a command it starts."""
        return [
            "/usr/bin/prlimit",
            f"--nproc={self.processes}",
            f"--data={self.memory}",
            f"--fsize={self.tree}",
            "--",
        ]

    def describe(self) -> str:
        """The limits in a line, for the worker's log."""
        return (
            f"{self.processes} processes and {human(self.memory)} of memory per process "
            f"(rlimits), {human(self.tmp)} of /tmp and of /dev/shm (tmpfs), "
            f"{human(self.tree)} written to the tree, stdout and stderr (watched)"
        )


DEFAULT_LIMITS = Limits()


def cgroup_v2_state() -> str:
    """Why control groups are not used here, in a few words (for the log)."""
    try:
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    except OSError:
        return "no cgroup v2 hierarchy at /sys/fs/cgroup"
    missing = {"memory", "pids"} - set(controllers)
    if missing:
        return f"cgroup v2 at /sys/fs/cgroup lacks the {' and '.join(sorted(missing))} controller"
    return "cgroup v2 control is not implemented yet; rlimits hold instead"


class SandboxUsers:
    """The users a root worker's slots run actions as: each slot claims one
    of SANDBOX_UIDS users from SANDBOX_UID_BASE, unused by any other slot on
    this machine, by binding an abstract Unix socket named after it (the
    kernel frees the name when the worker dies, however it dies)."""

    def __init__(self) -> None:
        self._claims: dict[int, socket.socket] = {}

    def claim(self) -> int:
        for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UIDS):
            if uid in self._claims:
                continue
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                claim.bind(f"\0reapi-sandbox-user-{uid}")
            except OSError:
                claim.close()
                continue
            self._claims[uid] = claim
            return uid
        raise OSError(f"all {SANDBOX_UIDS} sandbox users are taken on this machine")

    def release_all(self) -> None:
        for claim in self._claims.values():
            claim.close()
        self._claims.clear()


def _size(status: os.stat_result) -> int:
    """What a file counts: its length, or the disk it takes where that is more
    (space allocated past its end). A sparse file counts its whole length:
    that is what hashing and sending it would cost."""
    return max(status.st_size, status.st_blocks * 512)


def written(root: Path, inputs: set[int], files: Iterable[Path]) -> int:
    """Bytes of what a command wrote (`_size`): each file in the tree at
    `root` that is not an input (by inode), and `files` (its stdout and
    stderr). Anything that vanishes meanwhile counts nothing; nothing is
    followed."""
    total = 0
    for file in files:
        with contextlib.suppress(OSError):
            total += _size(os.stat(file))
    pending = [str(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        elif entry.inode() not in inputs:
                            total += _size(entry.stat(follow_symlinks=False))
                    except OSError:
                        continue
        except OSError:
            continue
    return total
