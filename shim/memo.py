"""Direct mode: a compile seen before is not analysed again.

In `deps` and `scan` modes the agent remembers, for each compile (mode,
working directory, arguments, and the environment that shapes the action), the
digest of the action it built, with everything that digest came from, as the
include scanner (shim/scan.py) saw it; in `deps` mode only when the scan found
every file the preprocessor listed. That is: the status (size,
mtime, ctime, inode) of every file read (the source, its headers, the
compiler's programs), the paths that had to be missing (directories the
compiler's search path skipped), and the probes of the include lookups
(which directory held or lacked which name). While all of them hold, building
the action again would give the same digest, so a repeated compile (a
rebuild after `make clean`) goes straight to the action cache, as ccache's
direct mode does, instead of a scan, a tree and hashes: the scanner checks each
status (a stat per file, unless its watcher already knows it is unchanged).

A file changed less than RACY_NS before the compile began may change again
without its status changing: a compile that read one is not remembered.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shim.scan import RACY_NS, ScanResult, SearchPath, Seen, StatKey, stat_key

# Whether files still have their statuses and directories their facts (Scanner.unchanged).
Unchanged = Callable[[Iterable[tuple[str, StatKey | None]], Seen], bool]

# Compiles remembered; the least recently used are forgotten first. An entry holds
# references to facts shared with other entries: about 5 KiB for a compile that
# reads 400 files (measured on git), so 100 MB at most.
MEMO_ENTRIES = 20_000
# Distinct facts kept for sharing before the table starts again (entries keep theirs).
SHARED_FACTS = 1_000_000


@dataclass(frozen=True)
class Depends:
    """What a compile's action was built from, beyond its arguments."""

    files: Collection[tuple[str, StatKey]]  # each file read (absolute) and its
    # status before it was read
    missing: list[str]  # absolute paths that did not exist
    seen: Seen  # what the include lookups found in each directory
    newest: int  # the files' latest mtime or ctime (ns)


def scan_depends(found: ScanResult, search: SearchPath, programs: list[str]) -> Depends | None:
    """What direct mode must see unchanged to take a compile's action again:
    the files its scan `found`, the compiler's `programs` and the lookups'
    facts; None when a program is being replaced."""
    files = list(found.read)
    newest = found.newest
    for program in programs:
        status = stat_key(program)
        if status is None:
            return None
        files.append((program, status))
        newest = max(newest, status[1], status[2])
    return Depends(files=files, missing=list(search.skipped), seen=found.seen, newest=newest)


T = TypeVar("T")


@dataclass(frozen=True)
class _Entry(Generic[T]):
    action: T
    statuses: tuple[tuple[str, StatKey | None], ...]  # None: must not exist
    seen: Seen


class DirectMemo(Generic[T]):
    """Compiles' actions (a digest, with what the agent needs to take its
    result), by key, while what they came from is unchanged."""

    def __init__(self, limit: int = MEMO_ENTRIES) -> None:
        self._limit = limit
        self._entries: dict[Hashable, _Entry[T]] = {}  # in order of use, oldest first
        # One copy of each (path, status) and (directory, facts) pair: most compiles
        # of a build read the same headers and search the same directories.
        self._shared: dict[object, Any] = {}

    def get(self, key: Hashable, unchanged: Unchanged) -> T | None:
        """The action remembered for `key`, if everything it came from is
        unchanged: `unchanged` checks the files' statuses and the lookups'
        facts (Scanner.unchanged)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if not unchanged(entry.statuses, entry.seen):
            return None
        self._entries[key] = entry
        return entry.action

    def put(self, key: Hashable, action: T, depends: Depends, started_ns: int) -> bool:
        """Remember `action` for `key`, unless a file it came from changed too
        recently (after started_ns - RACY_NS) to be trusted."""
        if depends.newest > started_ns - RACY_NS:
            return False
        if any(stat_key(path) is not None for path in depends.missing):
            return False
        if len(self._shared) > SHARED_FACTS:
            self._shared.clear()
        share = self._shared.setdefault
        entry = _Entry(
            action,
            (*depends.files, *((path, None) for path in depends.missing)),
            frozenset(share(facts, facts) for facts in depends.seen),
        )
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self._limit:
            del self._entries[next(iter(self._entries))]
        return True
