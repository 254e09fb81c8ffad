"""Direct mode's memo (shim/memo.py): what it remembers and what makes it forget."""

from __future__ import annotations

import os
import time
from pathlib import Path

from reapi.digests import DigestFunction
from shim.memo import Depends, DirectMemo
from shim.scan import Seen, stat_key

ACTION = DigestFunction.SHA256.digest_of(b"an action")
AN_HOUR_NS = 3600 * 10**9


def old_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def depends(*files: str, missing: tuple[str, ...] = ()) -> Depends:
    return Depends(files=[(f, stat_key(f)) for f in files], missing=list(missing), seen=frozenset())


def always(_: Seen) -> bool:
    return True


def test_an_unchanged_compile_is_remembered_and_an_edit_forgets_it(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    memo = DirectMemo()
    # As if the compile had begun an hour from now: the file is old enough to trust.
    assert memo.put("key", ACTION, depends(header), time.time_ns() + AN_HOUR_NS)
    assert memo.get("key", always) == ACTION
    assert memo.get("other key", always) is None
    Path(header).write_text("int b;\n")  # same size, new mtime and ctime
    assert memo.get("key", always) is None
    assert memo.get("key", always) is None  # forgotten, not just skipped


def test_files_changed_just_before_the_compile_are_not_trusted(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    memo = DirectMemo()
    assert not memo.put("key", ACTION, depends(header), time.time_ns())
    assert memo.get("key", always) is None


def test_a_path_that_appears_forgets_the_compile(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    skipped = tmp_path / "include"
    memo = DirectMemo()
    later = time.time_ns() + AN_HOUR_NS
    assert memo.put("key", ACTION, depends(header, missing=(str(skipped),)), later)
    assert memo.get("key", always) == ACTION
    skipped.mkdir()
    assert memo.get("key", always) is None
    assert not memo.put("key", ACTION, depends(header, missing=(str(skipped),)), later)


def test_the_lookups_facts_are_checked(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    memo = DirectMemo()
    seen: Seen = frozenset({(str(tmp_path), (frozenset({"a.h"}), frozenset({"b.h"})))})
    facts = Depends(files=[(header, stat_key(header))], missing=[], seen=seen)
    assert memo.put("key", ACTION, facts, time.time_ns() + AN_HOUR_NS)
    checked: list[Seen] = []

    def still_seen(facts: Seen) -> bool:
        checked.append(facts)
        return True

    assert memo.get("key", still_seen) == ACTION
    assert checked == [seen]
    assert memo.get("key", lambda s: False) is None


def test_the_status_seen_before_reading_is_the_one_kept(tmp_path: Path) -> None:
    """A file changed between the scan's read and the memo's put must not be
    remembered with its new status (the action holds the old content)."""
    header = old_file(tmp_path / "a.h", "int a;\n")
    before = os.stat(header)
    status = (before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino)
    Path(header).write_text("int changed;\n")
    memo = DirectMemo()
    facts = Depends(files=[(header, status)], missing=[], seen=frozenset())
    assert memo.put("key", ACTION, facts, time.time_ns() + AN_HOUR_NS)
    assert memo.get("key", always) is None


def test_the_least_recently_used_are_forgotten_first(tmp_path: Path) -> None:
    header = old_file(tmp_path / "a.h", "int a;\n")
    memo = DirectMemo(limit=2)
    later = time.time_ns() + AN_HOUR_NS
    memo.put("a", ACTION, depends(header), later)
    memo.put("b", ACTION, depends(header), later)
    assert memo.get("a", always) == ACTION  # "b" is now the oldest
    memo.put("c", ACTION, depends(header), later)
    assert [memo.get(k, always) for k in "abc"] == [ACTION, None, ACTION]
