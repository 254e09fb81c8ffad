"""`reapi cas verify`: re-hash every blob, and check every action-cache entry.

A blob whose bytes no longer match its digest (a disk error, a hand edit) is
reported; with `repair` it is removed, after the action-cache entries that
name it, so the server answers "missing" (and the client uploads it again)
rather than serving wrong bytes. Entries that cannot be parsed, or that name a
blob that is not stored, are reported and with `repair` removed as well.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cas.inventory import ActionIndex, BlobKey, Storage
from reapi.core.digests import DigestFunction

READ_CHUNK = 1 << 20
# Blobs checked between two calls of the progress callback (which decides what to show).
PROGRESS_EVERY = 1000


@dataclass
class Corrupt:
    key: BlobKey
    size: int
    problem: str
    data_id: int | None = None  # small tier: the row's data
    inode: int | None = None  # large tier: the file that was checked

    def __str__(self) -> str:
        function, hash_ = self.key
        return f"{function.path_name} {hash_}/{self.size}: {self.problem}"


@dataclass
class VerifyReport:
    blobs: int = 0
    bytes: int = 0
    corrupt: list[Corrupt] = field(default_factory=list)
    unreadable_entries: list[str] = field(default_factory=list)
    incomplete_entries: list[str] = field(default_factory=list)
    removed_blobs: int = 0
    removed_entries: int = 0
    seconds: float = 0.0

    @property
    def problems(self) -> int:
        return len(self.corrupt) + len(self.unreadable_entries) + len(self.incomplete_entries)


def verify(
    storage: Storage, repair: bool = False, progress: Callable[[VerifyReport], None] | None = None
) -> VerifyReport:
    start = time.monotonic()
    report = VerifyReport()
    _check_small(storage, report, progress)
    _check_large(storage, report, progress)
    corrupt = {c.key for c in report.corrupt}
    index = ActionIndex.of(storage)
    doomed: set[int] = set(index.naming(corrupt))
    for number, entry in enumerate(index.entries):
        if entry.blobs is None:
            report.unreadable_entries.append(entry.path)
            doomed.add(number)
        elif number in doomed or not storage.present(entry.blobs):
            report.incomplete_entries.append(entry.path)
            doomed.add(number)
    if repair:
        report.removed_entries = index.remove(doomed)  # first: none may name a removed blob
        for bad in report.corrupt:
            report.removed_blobs += _remove(storage, bad)
    report.seconds = time.monotonic() - start
    return report


def _check_small(
    storage: Storage, report: VerifyReport, progress: Callable[[VerifyReport], None] | None
) -> None:
    rows = storage.db.execute(
        "SELECT k.function, k.hash, k.size, k.data_id, d.data FROM blob_keys AS k "
        "LEFT JOIN blob_data AS d ON d.id = k.data_id"
    )
    for function_value, raw_hash, size, data_id, data in rows:
        function = DigestFunction(function_value)
        key = (function, raw_hash.hex())
        report.blobs += 1
        report.bytes += size
        if not isinstance(data, bytes):  # no row, or a value of another type
            report.corrupt.append(Corrupt(key, size, "its bytes are missing", data_id=data_id))
            continue
        problem = _mismatch(function, key[1], size, [data])
        if problem:
            report.corrupt.append(Corrupt(key, size, problem, data_id=data_id))
        if progress and report.blobs % PROGRESS_EVERY == 0:
            progress(report)


def _check_large(
    storage: Storage, report: VerifyReport, progress: Callable[[VerifyReport], None] | None
) -> None:
    for blob in storage.large_blobs():
        key = (blob.digest.function, blob.digest.hash)
        report.blobs += 1
        report.bytes += blob.digest.size
        try:
            with open(blob.path, "rb") as file:
                inode = os.fstat(file.fileno()).st_ino
                problem = _mismatch(
                    blob.digest.function,
                    blob.digest.hash,
                    None,
                    iter(lambda: file.read(READ_CHUNK), b""),
                )
        except FileNotFoundError:
            continue  # evicted meanwhile
        if problem:
            report.corrupt.append(Corrupt(key, blob.digest.size, problem, inode=inode))
        if progress and report.blobs % PROGRESS_EVERY == 0:
            progress(report)


def _mismatch(
    function: DigestFunction, hash_: str, size: int | None, chunks: Iterable[bytes]
) -> str | None:
    """Why the bytes in `chunks` are not the blob (hash_, size), or None."""
    hasher = function.hasher()
    length = 0
    for chunk in chunks:
        hasher.update(chunk)
        length += len(chunk)
    if size is not None and length != size:
        return f"{length} bytes stored, the digest says {size}"
    actual = hasher.hexdigest()
    if actual != hash_:
        return f"its bytes hash to {actual}"
    return None


def _remove(storage: Storage, bad: Corrupt) -> int:
    """Remove the blob that was found corrupt, unless it was replaced since."""
    function, hash_ = bad.key
    if bad.inode is None:
        with storage.db:
            storage.db.execute("BEGIN IMMEDIATE")
            gone = storage.db.execute(
                "DELETE FROM blob_keys WHERE function = ? AND hash = ? AND data_id = ? RETURNING 1",
                (function.value, bytes.fromhex(hash_), bad.data_id),
            ).fetchall()
            storage.db.execute("DELETE FROM blob_data WHERE id = ?", (bad.data_id,))
        return len(gone)
    path = storage.large_path(bad.key)
    try:
        if os.stat(path).st_ino != bad.inode:
            return 0  # uploaded again (renamed into place) since it was checked
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1
