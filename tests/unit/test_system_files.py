"""A worker's check of a compile's manifest of system files (reapi/core/conventions.py
SystemFiles), with a real inotify watcher on the test's temporary directory
standing in for /usr."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reapi.core.conventions import ABSENT, SystemFiles, file_identity
from reapi.core.errors import FailedPrecondition, InvalidArgument
from reapi.core.watch import StatKey, Watcher


@pytest.fixture
def lstats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The listed files the check asks the kernel about."""
    asked: list[str] = []
    real = os.lstat

    def counted(path: str) -> os.stat_result:
        if "/usr/include/" in str(path):
            asked.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "lstat", counted)
    yield asked


@pytest.fixture
def system(tmp_path: Path) -> Path:
    (tmp_path / "usr" / "include").mkdir(parents=True)
    (tmp_path / "usr" / "include" / "stdio.h").write_text("int printf(const char *, ...);\n")
    (tmp_path / "usr" / "include" / "stdlib.h").write_text("void exit(int);\n")
    (tmp_path / "root" / ".reapi").mkdir(parents=True)
    return tmp_path


def manifest(system: Path, absent: str = "nosuch.h") -> Path:
    """An input root whose manifest lists the two headers and one absent path."""
    include = system / "usr" / "include"
    lines = []
    for name in ("stdio.h", "stdlib.h"):
        identity = file_identity(str(include / name))
        assert identity is not None
        lines.append(f"{identity[0]} {identity[1]} {include / name}")
    lines.append(f"{ABSENT} 0 {include / absent}")
    root = system / "root"
    (root / ".reapi" / "system-files").write_text("\n".join(lines) + "\n")
    return root


class CountingWatcher(Watcher):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def status(self, path: str) -> StatKey | None:
        self.asked.append(path)
        return super().status(path)


def test_a_manifest_found_true_is_not_looked_at_again(system: Path, lstats: list[str]) -> None:
    watcher = CountingWatcher()
    check = SystemFiles(watcher, (str(system),))
    root = manifest(system)
    check.verify(root, ".reapi/system-files")
    assert len(watcher.asked) == 3 and len(lstats) >= 3
    watcher.asked.clear()
    lstats.clear()
    check.verify(root, ".reapi/system-files")
    assert watcher.asked == [] and lstats == []
    # Another manifest of the same files: statuses from memory, no system call.
    (root / ".reapi" / "system-files").write_text(
        (root / ".reapi" / "system-files").read_text() + "\n"
    )
    check.verify(root, ".reapi/system-files")
    assert len(watcher.asked) == 3 and lstats == []


@pytest.mark.parametrize(
    "change",
    [
        lambda include: (include / "stdio.h").write_text("int printf(const char *, ...);\n "),
        lambda include: (include / "stdio.h").write_text("int PRINTF(const char *, ...);\n"),
        lambda include: (include / "stdlib.h").unlink(),
        lambda include: (include / "nosuch.h").write_text(""),
        lambda include: os.replace(include / "stdlib.h", include / "stdio.h"),
    ],
    ids=["grown", "same-size", "removed", "absent-appears", "replaced"],
)
def test_a_change_after_the_check_is_seen_at_the_next(system: Path, change: object) -> None:
    check = SystemFiles(Watcher(), (str(system),))
    root = manifest(system)
    check.verify(root, ".reapi/system-files")
    change(system / "usr" / "include")  # type: ignore[operator]
    with pytest.raises(FailedPrecondition, match="refusing to produce a different result"):
        check.verify(root, ".reapi/system-files")


def test_without_inotify_every_check_looks(system: Path, lstats: list[str]) -> None:
    check = SystemFiles(Watcher(enabled=False), (str(system),))
    root = manifest(system)
    check.verify(root, ".reapi/system-files")
    lstats.clear()
    check.verify(root, ".reapi/system-files")
    assert len(lstats) >= 3
    (system / "usr" / "include" / "stdio.h").write_text("int PRINTF(const char *, ...);\n")
    with pytest.raises(FailedPrecondition, match=r"stdio\.h on this worker differs"):
        check.verify(root, ".reapi/system-files")


def test_a_symlinked_file_is_checked_each_time(system: Path) -> None:
    """A change through another name of a linked file is not reported in this
    directory: such a file is never taken as unchanged."""
    include = system / "usr" / "include"
    (system / "real.h").write_text("int real;\n")
    (include / "stdio.h").unlink()
    (include / "stdio.h").symlink_to(system / "real.h")
    check = SystemFiles(Watcher(), (str(system),))
    root = manifest(system)
    check.verify(root, ".reapi/system-files")
    (system / "real.h").write_text("int REAL;\n")
    with pytest.raises(FailedPrecondition, match=r"stdio\.h on this worker differs"):
        check.verify(root, ".reapi/system-files")


def test_a_manifest_outside_the_tree_is_invalid(system: Path) -> None:
    with pytest.raises(InvalidArgument, match="outside the input tree"):
        SystemFiles(Watcher(), (str(system),)).verify(manifest(system), "../usr/include/stdio.h")


def test_a_directory_where_a_header_must_be_absent_is_passed_over(system: Path) -> None:
    """As gcc does when it searches for a header: only a file there would be read."""
    root = manifest(system, absent="nosuch.h")
    (system / "usr" / "include" / "nosuch.h").mkdir()
    SystemFiles(Watcher(), (str(system),)).verify(root, ".reapi/system-files")
    (system / "usr" / "include" / "nosuch.h").rmdir()
    (system / "usr" / "include" / "nosuch.h").write_text("\n")
    with pytest.raises(FailedPrecondition, match="exists on this worker"):
        SystemFiles(Watcher(), (str(system),)).verify(root, ".reapi/system-files")


def test_a_file_outside_what_the_worker_provides_is_refused(system: Path) -> None:
    """The sandbox mounts only the provided directories: a file elsewhere, or
    reached through a symbolic link that leads out of them, would be missing
    there (and a __has_include answered otherwise) though this process sees it."""
    root = manifest(system)
    include = str(system / "usr" / "include")
    with pytest.raises(FailedPrecondition, match="not in a directory this worker provides"):
        SystemFiles(Watcher(), (str(system / "usr" / "lib"),)).verify(root, ".reapi/system-files")
    SystemFiles(Watcher(), (include,)).verify(root, ".reapi/system-files")
    (system / "elsewhere").mkdir()
    os.replace(system / "usr" / "include" / "stdio.h", system / "elsewhere" / "stdio.h")
    (system / "usr" / "include" / "stdio.h").symlink_to(system / "elsewhere" / "stdio.h")
    with pytest.raises(FailedPrecondition, match="not in a directory this worker provides"):
        SystemFiles(Watcher(), (include,)).verify(root, ".reapi/system-files")
