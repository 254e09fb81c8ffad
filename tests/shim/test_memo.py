"""Direct mode's memo (shim/memo.py): what it remembers and what makes it forget."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from reapi.core.digests import Digest, DigestFunction
from shim.memo import Depends, DirectMemo
from shim.scan import Scanner, Seen, StatKey, stat_key

ACTION = DigestFunction.SHA256.digest_of(b"an action")
AN_HOUR_NS = 3600 * 10**9


def old_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def depends(*files: str, missing: tuple[str, ...] = (), seen: Seen = frozenset()) -> Depends:
    statuses = [(f, status) for f in files if (status := stat_key(f)) is not None]
    newest = max(max(status[1], status[2]) for _, status in statuses)
    return Depends(files=statuses, missing=list(missing), seen=seen, newest=newest)


def test_an_unchanged_compile_is_remembered_and_an_edit_forgets_it(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    memo: DirectMemo[Digest] = DirectMemo()
    unchanged = Scanner().unchanged  # the agent's check, its watcher included
    # As if the compile had begun an hour from now: the file is old enough to trust.
    assert memo.put("key", ACTION, depends(header), time.time_ns() + AN_HOUR_NS)
    assert memo.get("key", unchanged) == ACTION
    assert memo.get("other key", unchanged) is None
    Path(header).write_text("int b;\n")  # same size, new mtime and ctime
    assert memo.get("key", unchanged) is None
    assert memo.get("key", unchanged) is None  # forgotten, not just skipped


def test_files_changed_just_before_the_compile_are_not_trusted(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    memo: DirectMemo[Digest] = DirectMemo()
    unchanged = Scanner().unchanged  # the agent's check, its watcher included
    assert not memo.put("key", ACTION, depends(header), time.time_ns())
    assert memo.get("key", unchanged) is None


def test_a_path_that_appears_forgets_the_compile(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    skipped = tmp_path / "include"
    memo: DirectMemo[Digest] = DirectMemo()
    unchanged = Scanner().unchanged  # the agent's check, its watcher included
    later = time.time_ns() + AN_HOUR_NS
    assert memo.put("key", ACTION, depends(header, missing=(str(skipped),)), later)
    assert memo.get("key", unchanged) == ACTION
    skipped.mkdir()
    assert memo.get("key", unchanged) is None
    assert not memo.put("key", ACTION, depends(header, missing=(str(skipped),)), later)


def test_the_lookups_facts_are_checked(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    memo: DirectMemo[Digest] = DirectMemo()
    seen: Seen = frozenset({(str(tmp_path), (frozenset({"a.h"}), frozenset({"b.h"})))})
    facts = depends(header, seen=seen)
    assert memo.put("key", ACTION, facts, time.time_ns() + AN_HOUR_NS)
    checked: list[Seen] = []

    def still_seen(files: Iterable[tuple[str, StatKey | None]], facts: Seen) -> bool:
        checked.append(facts)
        return Scanner().unchanged(files, frozenset())

    assert memo.get("key", still_seen) == ACTION
    assert checked == [seen]
    assert memo.get("key", lambda files, facts: False) is None


def test_the_status_seen_before_reading_is_the_one_kept(tmp_path: Path) -> None:
    """A file changed between the scan's read and the memo's put must not be
    remembered with its new status (the action holds the old content)."""
    header = old_file(tmp_path / "a.h", "int a;\n")
    before = os.stat(header)
    status = (before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino)
    Path(header).write_text("int changed;\n")
    memo: DirectMemo[Digest] = DirectMemo()
    unchanged = Scanner().unchanged  # the agent's check, its watcher included
    facts = Depends(files=[(header, status)], missing=[], seen=frozenset(), newest=status[2])
    assert memo.put("key", ACTION, facts, time.time_ns() + AN_HOUR_NS)
    assert memo.get("key", unchanged) is None


def test_the_least_recently_used_are_forgotten_first(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    memo: DirectMemo[Digest] = DirectMemo(limit=2)
    unchanged = Scanner().unchanged
    later = time.time_ns() + AN_HOUR_NS
    memo.put("a", ACTION, depends(header), later)
    memo.put("b", ACTION, depends(header), later)
    assert memo.get("a", unchanged) == ACTION  # "b" is now the oldest
    memo.put("c", ACTION, depends(header), later)
    assert [memo.get(k, unchanged) for k in "abc"] == [ACTION, None, ACTION]
