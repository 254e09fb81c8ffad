"""DiskStore: the embedded default, under one storage directory.

Layout (the `reapi cas` tools rely on it):
    DIR/cas/small.db                       blobs up to SMALL_BLOB bytes (cas/small_blobs.py)
    DIR/cas/{function}/{hash[:2]}/{hash}   larger blobs, one file each, bytes verbatim
    DIR/tmp/{pid}-{n}                      large uploads in progress

Why two tiers: creating a file costs the kernel 100-800 us on the disks we run
on, while a stat costs 2 us; a build's inputs are mostly small headers and
sources, so one file per small blob would make every batch upload pay that
price. SQLite in WAL mode appends small blobs to one log instead, and answers
FindMissingBlobs for a thousand digests with one query on a dense key table.

Crash safety (kill -9 at any moment): nothing becomes visible before its bytes
are verified against the digest. A small blob is inserted in a transaction
that either commits or vanishes. A large one is written to a fresh
file in tmp/ and renamed into place, which is atomic; what is left in tmp/ is
swept on the next start. Concurrent writers of one blob each write their own
temp file, and the last rename wins with identical bytes.

A full disk refuses what does not fit with RESOURCE_EXHAUSTED, blob
by blob: what fits is stored and acknowledged, nothing partial is kept, and one
line is logged, not a traceback.

A blob's last use is its row's last_access or its file's mtime; lookups, reads
and repeated uploads refresh it at most every TOUCH_AFTER seconds, so a busy
FindMissingBlobs reads and rarely writes. `reapi cas gc` (cas/gc.py) evicts
by it, from another connection or process, safely against this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from cas.small_blobs import SMALL_BLOB, TOUCH_AFTER, SmallBlobs
from cas.store import (
    READ_CHUNK,
    BlobInfo,
    BufferedWriter,
    check_final,
    check_offset,
    check_room,
    verified,
)
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import NotFound, ReapiError, ResourceExhausted

log = logging.getLogger(__name__)

# Streamed uploads are hashed and written in a worker thread this many bytes at a time.
FLUSH_BYTES = 1024 * 1024


class DiskStore:
    """Blobs under `root` (created if missing). Many processes may share one
    root; each sweeps only the temp files of processes that are gone."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cas = self.root / "cas"
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for function in DigestFunction:
            base = self._cas / function.path_name
            for prefix in range(256):
                (base / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
        self._small = SmallBlobs(self.root)
        self._sweep_tmp()
        self._counter = itertools.count()

    def close(self) -> None:
        self._small.close()

    # ---------------------------------------------------------------- paths

    def _path(self, digest: Digest) -> str:
        hash_ = digest.hash
        return f"{self._cas}/{digest.function.path_name}/{hash_[:2]}/{hash_}"

    def _tmp_path(self) -> str:
        return f"{self._tmp}/{os.getpid()}-{next(self._counter)}"

    def _sweep_tmp(self) -> None:
        """Remove uploads left by processes that no longer run."""
        for entry in os.scandir(self._tmp):
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and process_alive(int(pid_text)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    async def _save_small(self, digest: Digest, data: bytes) -> None:
        try:
            self._small.put([(digest, data)])
        except sqlite3.DatabaseError as error:
            if not is_full(error):
                raise
            log.warning("storage %s is full: an upload of %s was refused", self.root, digest)
            raise full_error(digest) from None

    # ------------------------------------------------------------ large tier

    def _large_present(self, digest: Digest, now: float) -> bool:
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

    def _large_get(self, digest: Digest, now: float) -> bytes | None:
        try:
            with open(self._path(digest), "rb") as file:
                _touch_if_stale(file.fileno(), os.fstat(file.fileno()).st_mtime, now)
                data = file.read()
        except FileNotFoundError:
            return None
        return data if len(data) == digest.size else None

    def _large_put(self, digest: Digest, data: bytes) -> None:
        if self._large_present(digest, time.time()):
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

    # -------------------------------------------------------------- protocol

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        now = time.time()
        small = [d for d in digests if 0 < d.size <= SMALL_BLOB]
        present = self._small.present(small, now) if small else set()
        missing = []
        for digest in digests:
            if digest.size > SMALL_BLOB:
                if not self._large_present(digest, now):
                    missing.append(digest)
            elif digest not in present and not digest.is_empty:
                missing.append(digest)
        return missing

    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        now = time.time()
        found = self._small.get([d for d in digests if 0 < d.size <= SMALL_BLOB], now)
        for digest in digests:
            if digest.is_empty:
                found[digest] = b""
            elif digest.size > SMALL_BLOB:
                data = self._large_get(digest, now)
                if data is not None:
                    found[digest] = data
        return found

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        if digest.size <= SMALL_BLOB:
            data = (await self.get_many([digest])).get(digest)
            if data is None:
                raise NotFound(f"blob {digest} not found")
            check_offset(digest, offset, limit)
            end = digest.size if limit == 0 else min(digest.size, offset + limit)
            if end > offset:
                yield data[offset:end]
            return
        try:
            fd = os.open(self._path(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found") from None
        try:
            stat = os.fstat(fd)
            if stat.st_size != digest.size:
                raise NotFound(f"blob {digest} not found")
            _touch_if_stale(fd, stat.st_mtime, time.time())
            check_offset(digest, offset, limit)
            end = digest.size if limit == 0 else min(digest.size, offset + limit)
            position = offset
            while position < end:
                # Reads come from the page cache: cheaper inline than in a thread.
                chunk = os.pread(fd, min(READ_CHUNK, end - position), position)
                if not chunk:
                    raise NotFound(f"blob {digest} shrank while being read")
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        """Stores what fits; a blob a full disk refuses gets RESOURCE_EXHAUSTED."""
        errors = verified(blobs)
        good = [(n, *blob) for n, (blob, error) in enumerate(zip(blobs, errors, strict=True))
                if error is None]  # fmt: skip
        small = [(n, d, data) for n, d, data in good if 0 < d.size <= SMALL_BLOB]
        refused: list[int] = []
        if small:
            try:
                self._small.put([(d, data) for _n, d, data in small])
            except sqlite3.DatabaseError as error:
                if not is_full(error):
                    raise
                refused += self._small_one_by_one(small)  # the batch did not fit
        for n, digest, data in good:
            if digest.size > SMALL_BLOB:
                try:
                    self._large_put(digest, data)
                except OSError as error:
                    if not is_full(error):
                        raise
                    refused.append(n)
        if refused:
            log.warning(
                "storage %s is full: %d of %d blob(s) of a batch not stored",
                self.root, len(refused), len(blobs),
            )  # fmt: skip
            for n in refused:
                errors[n] = full_error(blobs[n][0])
        return errors

    def _small_one_by_one(self, small: list[tuple[int, Digest, bytes]]) -> list[int]:
        """Store each small blob in a transaction of its own; the positions of
        those a full disk refused."""
        refused = []
        for n, digest, data in small:
            try:
                self._small.put([(digest, data)])
            except sqlite3.DatabaseError as error:
                if not is_full(error):
                    raise
                refused.append(n)
        return refused

    def begin_write(self, digest: Digest) -> BufferedWriter | _FileWriter:
        if digest.size <= SMALL_BLOB:
            return BufferedWriter(digest, self._save_small)
        return _FileWriter(digest, self._tmp_path(), self._path(digest))

    async def delete(self, digest: Digest) -> bool:
        if digest.size <= SMALL_BLOB:
            return self._small.delete(digest)
        try:
            os.unlink(self._path(digest))
        except FileNotFoundError:
            return False
        return True

    async def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        for info in self._small.infos():
            yield info
        for function in DigestFunction:
            base = self._cas / function.path_name
            for prefix in range(256):
                with os.scandir(base / f"{prefix:02x}") as entries:
                    found = [(entry.name, entry.stat()) for entry in entries]
                for name, stat in found:
                    yield BlobInfo(Digest(function, name, stat.st_size), stat.st_mtime)


class _FileWriter:
    """A streamed upload of a large blob into a temp file.

    Chunks are collected up to FLUSH_BYTES and then hashed and written together
    in a worker thread (hashing and writing both release the GIL), so a stream
    of small chunks costs one thread hop per megabyte, not one per chunk."""

    def __init__(self, digest: Digest, tmp: str, final: str) -> None:
        self._digest = digest
        self._tmp = tmp
        self._final = final
        self._hasher = digest.function.hasher()
        self._fd: int | None = None
        self._received = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    @property
    def committed_size(self) -> int:
        return self._received

    def _append(self, chunks: list[bytes]) -> None:
        if self._fd is None:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        for chunk in chunks:
            self._hasher.update(chunk)
            _write_all(self._fd, chunk)

    async def _flush(self) -> None:
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        await asyncio.to_thread(self._append, chunks)

    async def write(self, data: bytes) -> None:
        try:
            check_room(self._digest, self._received, len(data))
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._received += len(data)
            if self._pending_bytes >= FLUSH_BYTES:
                await self._flush()
        except BaseException as error:
            await self.abort()
            _raise_full(error, self._digest)
            raise

    async def commit(self) -> None:
        try:
            await self._flush()
            check_final(self._digest, self._received, self._hasher)
            assert self._fd is not None  # a large blob has had data written
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self._final)
        except BaseException as error:
            await self.abort()
            _raise_full(error, self._digest)
            raise

    async def abort(self) -> None:
        self._pending, self._pending_bytes = [], 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _unlink_quietly(self._tmp)
        self._received = 0
        self._hasher = self._digest.function.hasher()


def is_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.DatabaseError):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return False


def full_error(digest: Digest) -> ResourceExhausted:
    return ResourceExhausted(f"storage is full: blob {digest} not stored (the server needs room)")


def _raise_full(error: BaseException, digest: Digest) -> None:
    """Raise RESOURCE_EXHAUSTED (and log one line) in place of a full-disk error."""
    if is_full(error):
        log.warning("storage is full: an upload of %s was refused", digest)
        raise full_error(digest) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _touch_if_stale(fd: int, mtime: float, now: float) -> None:
    """Mark an open blob file used now, if its last use (`mtime`) is older than TOUCH_AFTER."""
    if mtime < now - TOUCH_AFTER:
        os.utime(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
