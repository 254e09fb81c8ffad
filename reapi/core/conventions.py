"""Conventions between our clients (the shim) and our workers, beyond REAPI.

Where the input root is: workers mount it at SANDBOX_ROOT, so a client can map
that path back to its own (e.g. -fdebug-prefix-map) and results do not depend
on which worker ran them.

What a worker provides to every action besides its input tree: the
directories of PROVIDED_DIRS, mounted read-only at their own paths in the
sandbox (executor/sandbox.py), and whatever a deployment adds with `reapi
worker --provide DIR` (a toolchain under /opt, say). Workers tell the server
in their Hello; the server tells clients what every connected worker provides
(Workers.GetProvided). A client counts on nothing else: a file outside these
directories travels as an input.

Which system files an action relies on, and checking them on the worker:

A client that relies on files outside the input tree (a compiler, its cc1,
system headers) lists them in a manifest inside the input tree and names it
(relative to the input root) in the Command's environment as
REAPI_SYSTEM_FILES. Each line reads `HASH SIZE /absolute/path` (SHA256), or
`ABSENT 0 /absolute/path` for a path the client found missing (a header an
include could have named). Before running, the worker compares its own
copies; any difference makes it refuse the action with FAILED_PRECONDITION
instead of producing a silently different result. Since the manifest is an
input, it is also part of the action's cache key.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from reapi.core.errors import FailedPrecondition, InvalidArgument
from reapi.core.watch import Watcher

SANDBOX_ROOT = "/build"
# The system's own directories, which every worker mounts read-only.
PROVIDED_DIRS = ("/bin", "/etc", "/lib", "/lib32", "/lib64", "/sbin", "/usr")
# Places a worker cannot provide: the sandbox makes its own (or they are the
# machine's, not the system's).
_UNPROVIDABLE = (SANDBOX_ROOT, "/dev", "/proc", "/sys", "/tmp", "/run")
MANIFEST_VARIABLE = "REAPI_SYSTEM_FILES"
ABSENT = "ABSENT"

# (path, size, mtime_ns, inode) -> sha256: system files rarely change.
_digests: dict[tuple[str, int, int, int], str] = {}
# Manifests a worker remembers having found true (a few per project built).
VERIFIED_MANIFESTS = 256
# Paths a worker remembers resolving inside its provided directories.
VERIFIED_PATHS = 100_000


def provided_directory(path: str) -> str:
    """`path` as a directory a worker may provide (absolute, normalized);
    raises ValueError with a message for one it cannot."""
    if not os.path.isabs(path):
        raise ValueError(f"{path!r}: a provided directory must be an absolute path")
    normal = os.path.normpath(path)
    if normal.startswith("//"):
        normal = normal[1:]
    if normal == "/":
        raise ValueError(f"{path!r}: cannot be provided (the sandbox makes its own /)")
    clash = next((d for d in _UNPROVIDABLE if is_under(normal, d) or is_under(d, normal)), None)
    if clash is not None:
        raise ValueError(f"{path!r}: cannot be provided (the sandbox makes its own {clash})")
    return normal


def is_under(path: str, directory: str) -> bool:
    """Whether normalized `path` is `directory` or inside it."""
    if directory == "/":
        return path.startswith("/")
    return path == directory or path.startswith(directory + "/")


def provided_by(path: str, directories: tuple[str, ...]) -> bool:
    """Whether normalized absolute `path` lies in one of `directories`
    (on hot paths: a compile asks for each of a thousand paths)."""
    return path.startswith(_prefixes(directories)) or path in directories


@functools.lru_cache(maxsize=64)
def _prefixes(directories: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(d.rstrip("/") + "/" for d in directories)


def file_identity(path: str, status: tuple[int, int, int] | None = None) -> tuple[str, int] | None:
    """(SHA256, size) of the file at `path`, from one stat when it is unchanged
    (none when the caller has just taken its `status`: size, mtime_ns, inode);
    None if it is missing."""
    if status is None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        status = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    key = (path, *status)
    digest = _digests.get(key)
    if digest is None:
        hasher = hashlib.sha256()
        try:
            with open(path, "rb") as file:
                while chunk := file.read(1 << 20):
                    hasher.update(chunk)
        except OSError:
            return None
        digest = _digests[key] = hasher.hexdigest()
    return digest, status[0]


class SystemFiles:
    """A worker's check of manifests against its own files. A status comes from
    the watcher (reapi/core/watch.py) while inotify reports no change in its
    directory, and a manifest found true is taken as true again, without a look
    at its files, until the watcher takes in a change: most compiles of a
    project list the same system files, which rarely change during a build."""

    def __init__(self, watcher: Watcher, provided: tuple[str, ...] = PROVIDED_DIRS) -> None:
        self._watcher = watcher
        self._provided = provided
        self._verified: dict[str, int] = {}  # manifest -> watcher.changes when found true
        # Whether each path resolves inside the provided directories, as of
        # watcher.changes == self._resolved_at.
        self._resolved: dict[str, bool] = {}
        self._resolved_at = -1

    def verify(self, root: Path, manifest: str) -> None:
        """Raise FailedPrecondition if a listed file is missing or differs here,
        or is not one this worker provides (the action could not read it)."""
        path = (root / manifest).resolve()
        if root.resolve() not in path.parents:
            raise InvalidArgument(f"{MANIFEST_VARIABLE} {manifest!r} is outside the input tree")
        text = path.read_text()
        watcher = self._watcher
        watcher.refresh()
        if self._verified.get(text) == watcher.changes:
            return
        remembered = True  # every status listed is one the watcher will report changes to
        for line in text.splitlines():
            if not line.strip():
                continue
            hash_, _size, name = line.split(" ", 2)
            status = watcher.status(name)
            remembered = remembered and name in watcher.statuses
            if hash_ == ABSENT:
                # gcc passes over a directory where it looks for a header, as the
                # client's scan does: only a file there would be read instead.
                if status is not None and not os.path.isdir(name):
                    raise FailedPrecondition(
                        f"{name} exists on this worker but not on the client; refusing to "
                        "produce a different result"
                    )
                continue
            if not self._provides(name):
                raise FailedPrecondition(
                    f"system file {name} is not in a directory this worker provides "
                    f"({', '.join(self._provided)}); refusing an action that could not read it"
                )
            found = (
                None if status is None else file_identity(name, (status[0], status[1], status[3]))
            )
            if found is None or found[0] != hash_:
                raise FailedPrecondition(
                    f"system file {name} on this worker differs from the client's; refusing "
                    "to produce a different result"
                )
        if remembered:
            if len(self._verified) >= VERIFIED_MANIFESTS:
                self._verified.clear()
            self._verified[text] = watcher.changes

    def _provides(self, name: str) -> bool:
        """Whether the sandbox shows `name` as this process sees it: in a
        provided directory, and no symbolic link on its way leads out of them
        (the sandbox would show a dangling link: a header missing, or a
        __has_include answered otherwise)."""
        if not provided_by(os.path.normpath(name), self._provided):
            return False
        if self._resolved_at != self._watcher.changes or len(self._resolved) > VERIFIED_PATHS:
            self._resolved.clear()
            self._resolved_at = self._watcher.changes
        inside = self._resolved.get(name)
        if inside is None:
            inside = self._resolved[name] = provided_by(os.path.realpath(name), self._provided)
        return inside
