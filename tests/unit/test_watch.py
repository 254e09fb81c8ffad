"""The watcher (reapi/core/watch.py): what it remembers, and every change
that must make it ask again. Real inotify on the test's temporary directory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from inotify_simple import Event, flags

from reapi.core.watch import Watcher, stat_key


@pytest.fixture
def lstats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths the watcher asks the kernel about."""
    asked: list[str] = []
    real = os.lstat

    def counted(path: str) -> os.stat_result:
        asked.append(path)
        return real(path)

    monkeypatch.setattr(os, "lstat", counted)  # what reapi.core.watch calls
    yield asked


def header(path: Path, text: str = "int a;\n") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_a_status_is_remembered_until_its_directory_reports_a_change(
    tmp_path: Path, lstats: list[str]
) -> None:
    path = header(tmp_path / "a.h")
    watcher = Watcher()
    assert watcher.trusts(str(tmp_path))
    assert watcher.status(path) == stat_key(path)
    watcher.refresh()
    assert watcher.status(path) == stat_key(path)
    assert lstats == [path]  # the second answer came from memory
    header(tmp_path / "b.h")  # a neighbour's change leaves a.h remembered
    watcher.refresh()
    assert watcher.status(path) == stat_key(path)
    assert lstats == [path]


def rewrite(path: Path) -> None:
    path.write_text("int b;\n")  # same size


def replace(path: Path) -> None:
    path.with_name("new").write_text("int replaced;\n")
    os.replace(path.with_name("new"), path)


def remove(path: Path) -> None:
    path.unlink()


def chmod(path: Path) -> None:
    path.chmod(0o600)


def append(path: Path) -> None:
    with open(path, "a") as file:
        file.write("int c;\n")


@pytest.mark.parametrize("change", [rewrite, replace, remove, chmod, append])
def test_a_change_to_the_file_is_seen(tmp_path: Path, change: Callable[[Path], None]) -> None:
    path = header(tmp_path / "a.h")
    watcher = Watcher()
    before = watcher.status(path)
    change(Path(path))
    watcher.refresh()
    assert watcher.status(path) == stat_key(path) != before


def test_a_missing_file_that_appears_is_seen(tmp_path: Path) -> None:
    path = str(tmp_path / "a.h")
    watcher = Watcher()
    assert watcher.status(path) is None
    header(Path(path))
    watcher.refresh()
    assert watcher.status(path) == stat_key(path) is not None


def test_a_directory_replaced_on_the_path_is_seen(tmp_path: Path) -> None:
    """The watch follows the old directory: its parent's watch reports the swap."""
    path = header(tmp_path / "project" / "include" / "a.h")
    watcher = Watcher()
    before = watcher.status(path)
    (tmp_path / "project").rename(tmp_path / "project.old")
    header(tmp_path / "project" / "include" / "a.h", "int other;\n")
    watcher.refresh()
    assert watcher.status(path) == stat_key(path) != before
    assert watcher.listing(os.path.dirname(path)) == frozenset({"a.h"})


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_header_reached_through_a_link_is_asked_each_time(tmp_path: Path, link: str) -> None:
    """A change made through a link's other name is reported elsewhere."""
    target = header(tmp_path / "elsewhere" / "real.h")
    path = tmp_path / "include" / "a.h"
    path.parent.mkdir()
    if link == "symbolic":
        path.symlink_to(target)
    else:
        os.link(target, path)
    watcher = Watcher()
    before = watcher.status(str(path))
    Path(target).write_text("int changed;\n")
    watcher.refresh()
    assert watcher.status(str(path)) == stat_key(str(path)) != before


def test_a_directory_link_pointed_elsewhere_is_seen(tmp_path: Path) -> None:
    """`ln -sfn v2 current`: neither release directory moves, the link is replaced."""
    header(tmp_path / "v1" / "a.h")
    header(tmp_path / "v2" / "a.h", "int version_2;\n")
    current = tmp_path / "current"
    current.symlink_to("v1")
    path = str(current / "a.h")
    watcher = Watcher()
    before = watcher.status(path)
    (tmp_path / "next").symlink_to("v2")
    os.replace(tmp_path / "next", current)
    watcher.refresh()
    assert watcher.status(path) == stat_key(path) != before


def test_listings_follow_files_created_and_removed(tmp_path: Path) -> None:
    header(tmp_path / "a.h")
    watcher = Watcher()
    directory = str(tmp_path)
    assert watcher.listing(directory) == frozenset({"a.h"})
    header(tmp_path / "b.h")
    (tmp_path / "sub").mkdir()  # not a file: not listed
    watcher.refresh()
    assert watcher.listing(directory) == frozenset({"a.h", "b.h"})
    (tmp_path / "a.h").rename(tmp_path / "c.h")
    watcher.refresh()
    assert watcher.listing(directory) == frozenset({"b.h", "c.h"})


def test_a_missing_directory_that_appears_is_seen(tmp_path: Path) -> None:
    missing = str(tmp_path / "include" / "sys")
    watcher = Watcher()
    assert watcher.listing(missing) == frozenset()
    assert watcher.status(os.path.join(missing, "types.h")) is None
    header(tmp_path / "include" / "sys" / "types.h")
    watcher.refresh()
    assert watcher.listing(missing) == frozenset({"types.h"})
    assert watcher.status(os.path.join(missing, "types.h")) is not None


def test_a_lost_event_forgets_everything(tmp_path: Path, lstats: list[str]) -> None:
    """A full queue (IN_Q_OVERFLOW) may hide any change."""
    path = header(tmp_path / "a.h")
    watcher = Watcher()
    watcher.status(path)
    watcher.listing(str(tmp_path))
    overflow = [Event(wd=-1, mask=flags.Q_OVERFLOW, cookie=0, name="")]
    assert watcher._inotify is not None
    watcher._inotify.read = lambda timeout: overflow
    watcher.refresh()
    assert not watcher.statuses and not watcher.listings
    assert watcher.status(path) == stat_key(path)
    assert lstats == [path, path]


@pytest.mark.parametrize("why", ["no inotify", "not a local filesystem"])
def test_without_trust_every_status_is_asked(tmp_path: Path, lstats: list[str], why: str) -> None:
    path = header(tmp_path / "a.h")
    watcher = Watcher(enabled=why != "no inotify")
    if why == "not a local filesystem":
        watcher._devices = {}  # as for NFS: no device known to be local
    assert not watcher.trusts(str(tmp_path))
    assert watcher.status(path) == watcher.status(path) == stat_key(path)
    assert lstats == [path, path]
    assert watcher.listing(str(tmp_path)) is None
