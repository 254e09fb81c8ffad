"""DiskStore: the embedded default, one file per blob under a storage directory.

Layout (the `reapi cas` tools rely on it):
    DIR/cas/{function}/{hash[:2]}/{hash}   one file per blob, its bytes verbatim
    DIR/tmp/{pid}-{n}                      uploads in progress

Every write goes to a fresh file in tmp/, is verified against its digest while
or after it arrives, and only then renamed into place. A rename is atomic, so
after a crash at any moment (kill -9 included) every file under cas/ holds
exactly the bytes its name promises; what is left in tmp/ is swept on the next
start. Concurrent writers of one blob each write their own temp file; the last
rename wins with identical bytes.

A blob's mtime is its last use: lookups refresh it (at most every few minutes,
so a busy FindMissingBlobs costs a stat per digest, not a write).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from cas.store import READ_CHUNK, BlobInfo, check_final, check_offset, check_room, verify
from reapi.digests import Digest, DigestFunction
from reapi.errors import NotFound

# Refresh a blob's mtime when a lookup finds it older than this (seconds).
TOUCH_AFTER = 300.0
# Chunks at least this large are hashed and written off the event loop.
THREAD_CHUNK = 64 * 1024


class DiskStore:
    """Blobs as files under `root` (created if missing). Many processes may
    share one root; each sweeps only the temp files of processes that are gone."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cas = self.root / "cas"
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for function in DigestFunction:
            base = self._cas / function.path_name
            for prefix in range(256):
                (base / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()
        self._counter = itertools.count()

    def _path(self, digest: Digest) -> str:
        hash_ = digest.hash
        return f"{self._cas}/{digest.function.path_name}/{hash_[:2]}/{hash_}"

    def _tmp_path(self) -> str:
        return f"{self._tmp}/{os.getpid()}-{next(self._counter)}"

    def _sweep_tmp(self) -> None:
        """Remove uploads left by processes that no longer run."""
        for entry in os.scandir(self._tmp):
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and _alive(int(pid_text)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    def _present(self, digest: Digest, now: float) -> bool:
        if digest.is_empty:
            return True
        path = self._path(digest)
        try:
            stat = os.stat(path)
            if stat.st_size != digest.size:
                return False
            if stat.st_mtime < now - TOUCH_AFTER:
                os.utime(path)
        except FileNotFoundError:
            return False
        return True

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        now = time.time()
        return [digest for digest in digests if not self._present(digest, now)]

    async def get(self, digest: Digest) -> bytes:
        if digest.is_empty:
            return b""
        try:
            with open(self._path(digest), "rb") as file:
                data = file.read()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found") from None
        if len(data) != digest.size:
            raise NotFound(f"blob {digest} not found")
        return data

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        if digest.is_empty:
            check_offset(digest, offset, limit)
            return
        try:
            fd = os.open(self._path(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found") from None
        try:
            if os.fstat(fd).st_size != digest.size:
                raise NotFound(f"blob {digest} not found")
            check_offset(digest, offset, limit)
            end = digest.size if limit == 0 else min(digest.size, offset + limit)
            position = offset
            while position < end:
                size = min(READ_CHUNK, end - position)
                if size >= THREAD_CHUNK:
                    chunk = await asyncio.to_thread(os.pread, fd, size, position)
                else:
                    chunk = os.pread(fd, size, position)
                if not chunk:
                    raise NotFound(f"blob {digest} shrank while being read")
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def put(self, digest: Digest, data: bytes) -> None:
        verify(digest, data)
        if self._present(digest, time.time()):
            return
        tmp = self._tmp_path()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self._path(digest))
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def begin_write(self, digest: Digest) -> _DiskWriter:
        return _DiskWriter(digest, self._tmp_path(), self._path(digest))

    async def delete(self, digest: Digest) -> bool:
        try:
            os.unlink(self._path(digest))
        except FileNotFoundError:
            return False
        return True

    async def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        for function in DigestFunction:
            base = self._cas / function.path_name
            for prefix in range(256):
                with os.scandir(base / f"{prefix:02x}") as entries:
                    found = [(entry.name, entry.stat()) for entry in entries]
                for name, stat in found:
                    yield BlobInfo(Digest(function, name, stat.st_size), stat.st_mtime)


class _DiskWriter:
    """A streamed upload into a temp file; hashing and writing of big chunks
    run together in a worker thread (both release the GIL)."""

    def __init__(self, digest: Digest, tmp: str, final: str) -> None:
        self._digest = digest
        self._tmp = tmp
        self._final = final
        self._hasher = digest.function.hasher()
        self._fd: int | None = None
        self._received = 0

    @property
    def committed_size(self) -> int:
        return self._received

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._hasher.update(data)
        _write_all(self._fd, data)

    async def write(self, data: bytes) -> None:
        try:
            check_room(self._digest, self._received, len(data))
            if len(data) >= THREAD_CHUNK:
                await asyncio.to_thread(self._append, data)
            else:
                self._append(data)
        except BaseException:
            await self.abort()
            raise
        self._received += len(data)

    async def commit(self) -> None:
        try:
            check_final(self._digest, self._received, self._hasher)
            if self._fd is None:  # the empty blob: nothing to store
                return
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self._final)
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _unlink_quietly(self._tmp)
        self._received = 0
        self._hasher = self._digest.function.hasher()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
