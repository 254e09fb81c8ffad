"""A storage directory seen from outside the server: what `reapi cas stats`,
`reapi cas verify` and `reapi cas gc` read and change.

The layout is DiskStore's (cas/disk.py) and DiskActionResultStore's
(cas/action_cache.py). These tools open it with their own SQLite connection,
so they behave the same whether or not a server is using the directory, and
every change they make is one a running server tolerates: small blob rows go
in a transaction, a file is unlinked whole, and an action-cache entry is
unlinked before the blobs it names.

A blob's last use is its row's last_access (small tier) or its file's mtime
(large tier); an action-cache entry's is its file's mtime. The server
refreshes them on FindMissingBlobs, reads and action-cache hits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from cas.action_cache import instance_roots, named_blobs, tree_files
from cas.small_blobs import SMALL_DB, open_small_db
from reapi.core.digests import Digest, DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2

# A blob as the tools key it: its function and lowercase hex hash.
BlobKey = tuple[DigestFunction, str]


class StorageError(Exception):
    """A storage directory these tools cannot use; the message is one line."""


@dataclass(frozen=True, slots=True)
class LargeBlob:
    digest: Digest
    path: str
    last_access: float


@dataclass(frozen=True, slots=True)
class ActionEntry:
    """One action-cache entry and the blobs its result names (None: unreadable)."""

    path: str
    last_access: float
    blobs: frozenset[BlobKey] | None


@dataclass
class Totals:
    blobs: int = 0
    bytes: int = 0
    oldest: float | None = None
    newest: float | None = None

    def add(self, blobs: int, size: int, oldest: float | None, newest: float | None) -> None:
        self.blobs += blobs
        self.bytes += size
        if oldest is not None:
            self.oldest = oldest if self.oldest is None else min(self.oldest, oldest)
        if newest is not None:
            self.newest = newest if self.newest is None else max(self.newest, newest)


class Storage:
    """An existing storage directory, opened for the tools. Raises
    StorageError (never creates a store at a mistyped path)."""

    def __init__(self, root: Path, writable: bool) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise StorageError(f"storage directory {root} does not exist")
        if not (self.root / SMALL_DB).is_file():
            raise StorageError(f"{root} is not a reapi storage directory (no {SMALL_DB})")
        if writable and not all(
            os.access(path, os.W_OK) for path in (self.root, self.root / "cas", self._ac_root)
            if path.exists()
        ):  # fmt: skip
            raise StorageError(f"storage directory {root} is not writable")
        self._aside = 0
        try:
            self.db = open_small_db(self.root)
            self.db.execute("SELECT 1 FROM blob_keys LIMIT 1").fetchall()
        except sqlite3.Error as error:
            raise StorageError(f"cannot open {self.root / SMALL_DB}: {error}") from None

    def close(self) -> None:
        self.db.close()

    @property
    def _ac_root(self) -> Path:
        return self.root / "ac"

    # ------------------------------------------------------------ small tier

    def small_totals(self) -> Totals:
        """Count, bytes and access range of the small blobs."""
        (count, size, oldest, newest) = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(last_access), MAX(last_access) "
            "FROM blob_keys"
        ).fetchone()
        totals = Totals()
        totals.add(count, size, oldest, newest)
        return totals

    def small_keys(self, until: tuple[float, int, bytes]) -> Iterator[tuple[BlobKey, int]]:
        """(key, size) of every small blob at or before `until` = (last use,
        function, raw hash) in eviction order."""
        rows = self.db.execute(
            "SELECT function, hash, size FROM blob_keys "
            "WHERE (last_access, function, hash) <= (?, ?, ?)",
            until,
        )
        for function, hash_, size in rows:
            yield (DigestFunction(function), hash_.hex()), size

    # ------------------------------------------------------------ large tier

    def large_blobs(self) -> Iterator[LargeBlob]:
        for function in DigestFunction:
            base = self.root / "cas" / function.path_name
            if not base.is_dir():
                continue
            for prefix in sorted(os.listdir(base)):
                try:
                    with os.scandir(base / prefix) as entries:
                        found = [(e.name, e.path, e.stat()) for e in entries]
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for name, path, stat in found:
                    if len(name) == 64:
                        digest = Digest(function, name, stat.st_size)
                        yield LargeBlob(digest, path, stat.st_mtime)

    @contextlib.contextmanager
    def gc_lock(self) -> Iterator[None]:
        """Held by a gc while it runs: a second gc waits, then starts from what
        the first left (two working from one listing would evict too much)."""
        with open(self.root / "gc.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def aside_path(self) -> str:
        """A fresh name in tmp/ that DiskStore sweeps once this process is gone."""
        self._aside += 1
        return f"{self.root}/tmp/{os.getpid()}-gc{self._aside}"

    def large_path(self, key: BlobKey) -> str:
        function, hash_ = key
        return f"{self.root}/cas/{function.path_name}/{hash_[:2]}/{hash_}"

    # --------------------------------------------------------------- either

    def read(self, key: BlobKey) -> bytes | None:
        function, hash_ = key
        row = self.db.execute(
            "SELECT d.data FROM blob_keys AS k JOIN blob_data AS d ON d.id = k.data_id "
            "WHERE k.function = ? AND k.hash = ?",
            (function.value, bytes.fromhex(hash_)),
        ).fetchone()
        if row is not None:
            return row[0]  # type: ignore[no-any-return]
        try:
            with open(self.large_path(key), "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    def present(self, keys: Iterable[BlobKey]) -> bool:
        """Whether every blob in `keys` is stored."""
        for function, hash_ in keys:
            row = self.db.execute(
                "SELECT 1 FROM blob_keys WHERE function = ? AND hash = ?",
                (function.value, bytes.fromhex(hash_)),
            ).fetchone()
            if row is None and not os.path.exists(self.large_path((function, hash_))):
                return False
        return True

    # --------------------------------------------------------- action cache

    def _ac_tables(self, instance: str | None = None) -> Iterator[tuple[DigestFunction, Path]]:
        """Each digest function's directory of entries, in `instance` (None: every one)."""
        for name, root in instance_roots(self._ac_root):
            if instance is not None and name != instance:
                continue
            for function in DigestFunction:
                base = root / function.path_name
                if base.is_dir():
                    yield function, base

    def action_entries(self) -> Iterator[ActionEntry]:
        for function, base in self._ac_tables():
            for prefix in sorted(os.listdir(base)):
                try:
                    with os.scandir(base / prefix) as entries:
                        found = [(e.path, e.stat().st_mtime) for e in entries]
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for path, mtime in found:
                    try:
                        with open(path, "rb") as file:
                            data = file.read()
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    yield ActionEntry(path, mtime, self._referenced(function, data))

    def action_counts(self) -> dict[str, int]:
        """Action-cache entries per instance name ('' the default), those with any."""
        counts = {}
        for name, _root in instance_roots(self._ac_root):
            count = sum(
                len(os.listdir(base / prefix))
                for _function, base in self._ac_tables(name)
                for prefix in os.listdir(base)
            )
            if count:
                counts[name] = count
        return counts

    def _referenced(self, function: DigestFunction, data: bytes) -> frozenset[BlobKey] | None:
        """The blobs a serialized ActionResult names, trees' contents included."""
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError:
            return None
        digests = named_blobs(result)
        for directory in result.output_directories:
            tree_data = self.read((function, directory.tree_digest.hash))
            if tree_data is not None:  # else the tree is gone, and the entry with it
                digests += tree_files(tree_data)
        return frozenset((function, d.hash) for d in digests if d.size_bytes > 0)


@dataclass
class ActionIndex:
    """Action-cache entries by the blobs they name, so that an entry can be
    removed before any blob it needs."""

    entries: list[ActionEntry] = field(default_factory=list)
    by_blob: dict[BlobKey, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, storage: Storage) -> ActionIndex:
        index = cls()
        for entry in storage.action_entries():
            number = len(index.entries)
            index.entries.append(entry)
            for key in entry.blobs or ():
                index.by_blob.setdefault(key, []).append(number)
        return index

    def remove(self, numbers: Iterable[int]) -> int:
        """Unlink these entries; how many were still there."""
        removed = 0
        for number in numbers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.entries[number].path)
                removed += 1
        return removed

    def naming(self, keys: Iterable[BlobKey]) -> set[int]:
        """The entries that name any of `keys`."""
        found: set[int] = set()
        for key in keys:
            found.update(self.by_blob.get(key, ()))
        return found


def stats(storage: Storage) -> dict[str, Any]:
    """What `reapi cas stats` shows; JSON-ready."""
    small = storage.small_totals()
    large = Totals()
    for blob in storage.large_blobs():
        large.add(1, blob.digest.size, blob.last_access, blob.last_access)
    by_instance = storage.action_counts()
    total = Totals()
    total.add(small.blobs, small.bytes, small.oldest, small.newest)
    total.add(large.blobs, large.bytes, large.oldest, large.newest)
    return {
        "storage": str(storage.root),
        "blobs": total.blobs,
        "bytes": total.bytes,
        "small_blobs": small.blobs,
        "small_bytes": small.bytes,
        "large_blobs": large.blobs,
        "large_bytes": large.bytes,
        "action_results": sum(by_instance.values()),
        "action_results_by_instance": by_instance,
        "oldest_access": total.oldest,
        "newest_access": total.newest,
        "database_bytes": sum(
            path.stat().st_size for path in storage.root.glob(f"{SMALL_DB}*") if path.is_file()
        ),
    }
