"""Conventions between our clients (the shim) and our workers, beyond REAPI.

Where the input root is: workers mount it at SANDBOX_ROOT, so a client can map
that path back to its own (e.g. -fdebug-prefix-map) and results do not depend
on which worker ran them.

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

import hashlib
import os
from pathlib import Path

from reapi.errors import FailedPrecondition, InvalidArgument
from reapi.watch import Watcher

SANDBOX_ROOT = "/build"
MANIFEST_VARIABLE = "REAPI_SYSTEM_FILES"
ABSENT = "ABSENT"

# (path, size, mtime_ns, inode) -> sha256: system files rarely change.
_digests: dict[tuple[str, int, int, int], str] = {}
# Manifests a worker remembers having found true (a few per project built).
VERIFIED_MANIFESTS = 256


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
    the watcher (reapi/watch.py) while inotify reports no change in its
    directory, and a manifest found true is taken as true again, without a look
    at its files, until the watcher takes in a change: most compiles of a
    project list the same system files, which rarely change during a build."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher
        self._verified: dict[str, int] = {}  # manifest -> watcher.changes when found true

    def verify(self, root: Path, manifest: str) -> None:
        """Raise FailedPrecondition if a listed file is missing or differs here."""
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
