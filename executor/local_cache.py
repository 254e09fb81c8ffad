"""The worker-local cache of input files, which action trees hard-link to.

Files live at CACHE/{function}/{hash[:2]}/{hash}-{r|x} (x: executable), each
verified against its digest when fetched, then made read-only. Several
workers on one machine may share a cache: a file, once there, is never
replaced. A root worker's actions run as users that do not own the cached
files (executor/sandbox.py), so they can neither write nor chmod one through
their hard link. (Unlinking their own link is fine.) Only blobs the cache
lacks are fetched from the server's CAS.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from cas.store import BlobStore, check_final, check_room, verify
from reapi.core.digests import Digest
from reapi.core.errors import NotFound

# A file in the cache: its digest, and whether it is executable.
CachedFile = tuple[Digest, bool]
# Fetch at most this many bytes from the CAS in one round.
FETCH_BYTES = 64 * 1024 * 1024
# Blobs larger than this are fetched on their own, a chunk at a time.
STREAM_BYTES = 4 * 1024 * 1024


class LocalCache:
    def __init__(self, root: Path, remote: BlobStore) -> None:
        self.root = Path(root)
        self._prefix = f"{self.root}/"
        self._remote = remote
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()

    def path(self, digest: Digest, executable: bool) -> str:
        kind = "x" if executable else "r"
        return f"{self._prefix}{digest.function.path_name}/{digest.hash[:2]}/{digest.hash}-{kind}"

    async def ensure(
        self, files: Iterable[tuple[Digest, bool]], at_hand: Mapping[Digest, bytes] | None = None
    ) -> dict[CachedFile, int]:
        """Make every (digest, executable) file present; the inode of each.
        Contents in `at_hand` (by their true digests) are not fetched.
        Raises NotFound when the CAS lacks one."""
        inodes = {}
        wanted = set()
        for file in set(files):
            try:
                inodes[file] = os.stat(self.path(*file)).st_ino
            except FileNotFoundError:
                wanted.add(file)
        if not wanted:
            return inodes
        at_hand = at_hand or {}
        for digest, executable in wanted:
            if digest in at_hand:
                self._store(digest, executable, at_hand[digest])
        digests = sorted({digest for digest, _ in wanted if digest not in at_hand})
        batch: list[Digest] = []
        size = 0
        for digest in digests:
            if digest.size > STREAM_BYTES:
                await self._fetch_large(digest, wanted)
                continue
            batch.append(digest)
            size += digest.size
            if size >= FETCH_BYTES:
                await self._fetch(batch, wanted)
                batch, size = [], 0
        if batch:
            await self._fetch(batch, wanted)
        for file in wanted:
            inodes[file] = os.stat(self.path(*file)).st_ino
        return inodes

    async def _fetch(self, digests: list[Digest], wanted: set[CachedFile]) -> None:
        found = await self._remote.get_many(digests)
        for digest in digests:
            if digest not in found:
                raise NotFound(f"input blob {digest} is missing from the CAS")
            data = found[digest]
            verify(digest, data)
            for executable in (False, True):
                if (digest, executable) in wanted:
                    self._store(digest, executable, data)

    async def _fetch_large(self, digest: Digest, wanted: set[CachedFile]) -> None:
        """Fetch one large blob a chunk at a time into a file, checked as it
        comes: its size never matters to memory."""
        tmp = self._new_tmp()
        hasher = digest.function.hasher()
        received = 0
        try:
            with open(tmp, "wb") as file:
                async for chunk in self._remote.read(digest):
                    check_room(digest, received, len(chunk))
                    hasher.update(chunk)
                    file.write(chunk)
                    received += len(chunk)
            check_final(digest, received, hasher)
        except NotFound:
            tmp.unlink(missing_ok=True)
            raise NotFound(f"input blob {digest} is missing from the CAS") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        variants = [executable for executable in (False, True) if (digest, executable) in wanted]
        for executable in variants[1:]:  # rarely both: a copy for the other mode
            copy = self._new_tmp()
            shutil.copyfile(tmp, copy)
            self._place(copy, digest, executable)
        self._place(tmp, digest, variants[0])

    def _new_tmp(self) -> Path:
        return self._tmp / f"{os.getpid()}-{next(self._counter)}"

    def _store(self, digest: Digest, executable: bool, data: bytes) -> None:
        tmp = self._new_tmp()
        try:
            tmp.write_bytes(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._place(tmp, digest, executable)

    def _place(self, tmp: Path, digest: Digest, executable: bool) -> None:
        """Move the verified file `tmp` into the cache (it is gone afterwards)."""
        final = self.path(digest, executable)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.chmod(tmp, 0o555 if executable else 0o444)
            # Never replace a file already there: another worker sharing this
            # cache may be hard-linking it, and link() fails with ENOENT when
            # the name's inode is unlinked under it (its bytes are the same).
            with contextlib.suppress(FileExistsError):
                os.link(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
