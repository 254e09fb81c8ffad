"""Garbage collection: bring a storage directory under a size, least recently
used blobs first. `reapi cas gc` runs it; `reapi serve --max-size` runs the
same command in the background between a high and a low watermark.

Guarantees, each tested:
- A grace period no collection crosses: nothing used in the last `grace`
  seconds goes, even if the store stays above the size (the report says so).
  The server refreshes a blob's last use on FindMissingBlobs, reads and
  action-cache hits when it is older than TOUCH_AFTER, so a blob a client was
  told exists lives at least `grace - TOUCH_AFTER` seconds more.
- An action-cache entry never names an evicted blob: the entries naming a
  batch of victims are unlinked before the batch is. Entries last used before
  the eviction time go too, so the action cache does not only grow.
- Safe against a running server, and against another gc (which waits for
  this one's lock, then starts from what it left): a small blob is
  deleted only if its row is still old inside the deleting transaction (a
  refresh needs the same write lock and checks the row is still there); a
  file is moved aside before its age is checked a last time (a refresh of a
  moved file fails, and the server answers "missing"). Each batch is one
  transaction, so an interrupted gc leaves a consistent store with part of
  the work done.

The sizes counted are the blobs' own bytes. SQLite keeps the pages freed by
deleted small blobs for later inserts rather than shrinking its file.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from cas.inventory import ActionIndex, BlobKey, LargeBlob, Storage
from cas.small_blobs import TOUCH_AFTER
from reapi.core.digests import DigestFunction

# Seconds since its last use within which no blob is evicted.
GRACE = 3600.0
# Small blobs deleted per transaction: short enough that a server waiting for
# the write lock (to store or refresh a blob) waits milliseconds.
BATCH = 2000
# Large blobs and entries unlinked between two progress reports.
FILE_BATCH = 500
# The server's background gc: above HIGH_WATERMARK * max size, collect down to LOW_WATERMARK.
HIGH_WATERMARK = 1.0
LOW_WATERMARK = 0.9

assert GRACE > TOUCH_AFTER, "a refresh must always land inside the grace period"

_SIZE = re.compile(r"(\d+(?:\.\d*)?)([KMGT]?)(?:I?B)?")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in `500M`, `10G`, `1.5T`, `2048` (units are powers of 1024; a
    trailing `B` or `iB` is allowed). Raises ValueError."""
    match = _SIZE.fullmatch(text.strip().upper())
    if match is None:
        raise ValueError(f"{text!r}: expected a size such as 500M or 10G")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit])


def human(size: int) -> str:
    """`size` bytes for people: 512 B, 1.5 KiB, 10.0 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass
class GcReport:
    blobs_before: int = 0
    bytes_before: int = 0
    evicted_blobs: int = 0
    evicted_bytes: int = 0
    dropped_action_results: int = 0
    # Blobs too recently used to go, when the store could not get under the size.
    kept_recent_bytes: int = 0
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def blobs_after(self) -> int:
        return self.blobs_before - self.evicted_blobs

    @property
    def bytes_after(self) -> int:
        return self.bytes_before - self.evicted_bytes


Progress = Callable[[GcReport], None]
# A place in eviction order: last use, then DigestFunction value and raw hash.
Limit = tuple[float, int, bytes]


def collect(
    storage: Storage,
    max_size: int,
    *,
    grace: float = GRACE,
    dry_run: bool = False,
    if_above: int | None = None,
    progress: Progress | None = None,
    now: float | None = None,
) -> GcReport:
    """Evict least recently used blobs until the store holds at most
    `max_size` bytes. With `if_above`, do nothing unless it holds more than that."""
    start = time.monotonic()
    with contextlib.nullcontext() if dry_run else storage.gc_lock():
        now = time.time() if now is None else now
        report = _collect(storage, max_size, grace, dry_run, if_above, progress, now)
    report.seconds = time.monotonic() - start
    return report


def _collect(
    storage: Storage,
    max_size: int,
    grace: float,
    dry_run: bool,
    if_above: int | None,
    progress: Progress | None,
    now: float,
) -> GcReport:
    report = GcReport(dry_run=dry_run)
    small = storage.small_totals()
    large = sorted(storage.large_blobs(), key=_place)  # the eviction order, as the rows
    report.blobs_before = small.blobs + len(large)
    report.bytes_before = small.bytes + sum(blob.digest.size for blob in large)
    threshold = max_size if if_above is None else if_above
    if report.bytes_before > threshold:
        need = report.bytes_before - max_size
        limit, freeable = _eviction_time(storage, large, need, now - grace)
        report.kept_recent_bytes = max(0, need - freeable)
        if limit is not None:
            index = ActionIndex.of(storage)
            dropped: set[int] = {
                n for n, entry in enumerate(index.entries) if entry.last_access < limit[0]
            }
            if dry_run:
                _count_small(storage, index, limit, report, dropped)
                _count_large(large, index, limit, report, dropped)
            else:
                index.remove(dropped)
                _evict_small(storage, index, limit, report, dropped, progress)
                _evict_large(storage, large, index, limit, report, dropped, progress)
            report.dropped_action_results = len(dropped)
    return report


def _eviction_time(
    storage: Storage, large: list[LargeBlob], need: int, cutoff: float
) -> tuple[Limit | None, int]:
    """The place in eviction order (oldest first over both tiers) of the last
    blob that must go for `need` bytes to be freed, never reaching `cutoff`;
    and the bytes that frees. (None, 0) when nothing may go."""
    rows = storage.db.execute(
        "SELECT last_access, function, hash, size FROM blob_keys WHERE last_access < ? "
        "ORDER BY last_access, function, hash",
        (cutoff,),
    )
    try:
        files = ((*_place(blob), blob.digest.size) for blob in large if blob.last_access < cutoff)
        freed = 0
        limit = None
        for last_access, function, hash_, size in heapq.merge(rows, files):
            freed += size
            limit = (last_access, function, hash_)
            if freed >= need:
                break
        return limit, freed
    finally:
        rows.close()


def _place(blob: LargeBlob) -> Limit:
    """A file's place in eviction order: last use, then function and hash as a
    row of the small tier sorts (many blobs share a last use: a batch refresh)."""
    return (blob.last_access, blob.digest.function.value, bytes.fromhex(blob.digest.hash))


def _count_small(
    storage: Storage, index: ActionIndex, limit: Limit, report: GcReport, dropped: set[int]
) -> None:
    for key, size in storage.small_keys(limit):
        report.evicted_blobs += 1
        report.evicted_bytes += size
        dropped.update(index.by_blob.get(key, ()))


def _count_large(
    large: list[LargeBlob], index: ActionIndex, limit: Limit, report: GcReport, dropped: set[int]
) -> None:
    for blob in large:
        if _place(blob) <= limit:
            report.evicted_blobs += 1
            report.evicted_bytes += blob.digest.size
            dropped.update(index.by_blob.get(_key(blob), ()))


def _evict_small(
    storage: Storage,
    index: ActionIndex,
    limit: Limit,
    report: GcReport,
    dropped: set[int],
    progress: Progress | None,
) -> None:
    db = storage.db
    after: tuple[int, bytes] = (-1, b"")  # walk the key order once: each batch goes on from here
    while True:
        with db:  # one transaction per batch: commits, or rolls back on any error
            db.execute("BEGIN IMMEDIATE")  # nobody refreshes these rows until we commit
            rows = db.execute(
                "SELECT function, hash, size, data_id FROM blob_keys "
                "WHERE (function, hash) > (?, ?) AND (last_access, function, hash) <= (?, ?, ?) "
                "ORDER BY function, hash LIMIT ?",
                (*after, *limit, BATCH),
            ).fetchall()
            if not rows:
                return
            after = (rows[-1][0], rows[-1][1])
            keys = [(DigestFunction(function), hash_.hex()) for function, hash_, _, _ in rows]
            _drop_naming(index, keys, dropped)
            db.executemany(
                "DELETE FROM blob_keys WHERE function = ? AND hash = ?",
                [(function, hash_) for function, hash_, _, _ in rows],
            )
            db.executemany("DELETE FROM blob_data WHERE id = ?", [(row[3],) for row in rows])
        report.evicted_blobs += len(rows)
        report.evicted_bytes += sum(row[2] for row in rows)
        if progress:
            progress(report)


def _evict_large(
    storage: Storage,
    large: list[LargeBlob],
    index: ActionIndex,
    limit: Limit,
    report: GcReport,
    dropped: set[int],
    progress: Progress | None,
) -> None:
    victims = [blob for blob in large if _place(blob) <= limit]
    for start in range(0, len(victims), FILE_BATCH):
        batch = victims[start : start + FILE_BATCH]
        _drop_naming(index, [_key(b) for b in batch], dropped)
        for blob in batch:
            if _unlink_if_unused(storage, blob, limit):
                report.evicted_blobs += 1
                report.evicted_bytes += blob.digest.size
        if progress:
            progress(report)


def _unlink_if_unused(storage: Storage, blob: LargeBlob, limit: Limit) -> bool:
    """Remove a blob file unless it was used after `limit`. The file is first
    moved aside: from then on a server refreshing it fails and answers
    "missing", and a refresh that came before shows in the moved file's mtime
    (it is then put back)."""
    aside = storage.aside_path()
    try:
        os.rename(blob.path, aside)
    except FileNotFoundError:
        return False  # another gc took it
    if os.stat(aside).st_mtime > limit[0]:
        os.rename(aside, blob.path)  # any copy stored meanwhile has the same bytes
        return False
    os.unlink(aside)
    return True


def _drop_naming(index: ActionIndex, keys: list[BlobKey], dropped: set[int]) -> None:
    """Unlink the entries naming any of `keys` that are not gone already."""
    fresh = index.naming(keys) - dropped
    index.remove(fresh)
    dropped.update(fresh)


def _key(blob: LargeBlob) -> BlobKey:
    return (blob.digest.function, blob.digest.hash)
