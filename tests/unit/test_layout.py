"""A slot's tree kept between actions (executor/layout.py), on a real directory:
whatever the tree held and whatever a command did to it, laying the next tree
out must give exactly what a fresh directory would hold."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from executor import layout

Spec = dict[str, "bytes | str"]  # path -> file contents, or "->target" for a symlink


class Sources:
    """Read-only files standing for the worker's cache, one per content."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir()

    def tree(self, spec: Spec) -> layout.Dir:
        root = layout.Dir()
        for path, content in spec.items():
            directory = root.subdirectory(os.path.dirname(path))
            assert directory is not None
            name = os.path.basename(path)
            if isinstance(content, str):
                directory.entries[name] = layout.Link(content.removeprefix("->"))
            else:
                source = self.directory / content.hex()
                if not source.exists():
                    source.write_bytes(content)
                    source.chmod(0o444)
                directory.entries[name] = layout.File(str(source), source.stat().st_ino)
        return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a command could see in the tree, without following links."""
    seen: dict[str, tuple[object, ...]] = {}
    for entry in sorted(root.rglob("*")):
        status = entry.lstat()
        name = str(entry.relative_to(root))
        if entry.is_symlink():
            seen[name] = ("link", os.readlink(entry))
        elif entry.is_dir():
            seen[name] = ("dir", status.st_mode & 0o7777, tuple(os.listxattr(entry)))
        else:
            seen[name] = ("file", status.st_ino, status.st_mode & 0o7777)
    return seen


def fresh(tmp_path: Path, tree: layout.Dir) -> dict[str, tuple[object, ...]]:
    place = tmp_path / f"fresh-{len(list(tmp_path.iterdir()))}"
    place.mkdir()
    layout.lay_out(str(place), layout.Dir(), tree)
    return snapshot(place)


@pytest.fixture
def sources(tmp_path: Path) -> Sources:
    return Sources(tmp_path / "cache")


FIRST: Spec = {
    "keep.h": b"keep",
    "changes.h": b"old",
    "gone.h": b"gone",
    "becomes-dir": b"file",
    "becomes-file/inner.h": b"inner",
    "link": "->keep.h",
    "retarget": "->keep.h",
    "dir/sub/deep.h": b"deep",
}
SECOND: Spec = {
    "keep.h": b"keep",
    "changes.h": b"new",
    "becomes-dir/now.h": b"now",
    "becomes-file": b"file",
    "link": "->keep.h",
    "retarget": "->changes.h",
    "dir/sub/deep.h": b"deep",
    "dir/added.h": b"added",
}


def test_a_tree_laid_out_over_another_is_as_a_fresh_one(tmp_path: Path, sources: Sources) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = sources.tree(FIRST)
    layout.lay_out(str(root), layout.Dir(), first)
    assert snapshot(root) == fresh(tmp_path, sources.tree(FIRST))
    kept_directory = (root / "dir" / "sub").stat().st_ino
    layout.restore(str(root), first)
    layout.lay_out(str(root), first, sources.tree(SECOND))
    assert snapshot(root) == fresh(tmp_path, sources.tree(SECOND))
    assert (root / "changes.h").read_bytes() == b"new"
    assert (root / "dir" / "sub").stat().st_ino == kept_directory  # kept, not made again


def test_what_a_command_did_to_the_tree_is_undone(tmp_path: Path, sources: Sources) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"precious")
    first = sources.tree(FIRST)
    layout.lay_out(str(root), layout.Dir(), first)
    # What a command might do.
    (root / "output.o").write_bytes(b"object")
    (root / "made" / "deeper").mkdir(parents=True)
    (root / "made" / "deeper" / "x").write_bytes(b"x")
    (root / "gone.h").unlink()
    (root / "changes.h").rename(root / "renamed.h")
    (root / "changes.h").write_bytes(b"forged")
    (root / "link").unlink()
    (root / "link").symlink_to(outside)
    os.mkfifo(root / "dir" / "fifo")
    os.setxattr(root / "dir", "user.left", b"1")
    (root / "dir").chmod(0o700)
    (root / "dir" / "sub").chmod(0)
    layout.restore(str(root), first)
    untouched = {k: v for k, v in FIRST.items() if k not in ("gone.h", "changes.h", "link")}
    assert snapshot(root) == fresh(tmp_path, sources.tree(untouched))
    second = sources.tree(SECOND)
    layout.lay_out(str(root), first, second)
    assert snapshot(root) == fresh(tmp_path, sources.tree(SECOND))
    assert (outside / "precious").read_bytes() == b"precious"


def test_restore_forgets_what_is_gone(tmp_path: Path, sources: Sources) -> None:
    """`have` then says exactly what is there: what the command removed is
    laid out again next time."""
    root = tmp_path / "root"
    root.mkdir()
    first = sources.tree(FIRST)
    layout.lay_out(str(root), layout.Dir(), first)
    (root / "keep.h").unlink()
    (root / "dir" / "sub" / "deep.h").rename(root / "dir" / "moved.h")
    layout.restore(str(root), first)
    assert "keep.h" not in first.entries
    left = ["becomes-dir", "becomes-file", "inner.h", "changes.h", "gone.h", "link", "retarget"]
    assert sorted(p.name for p in root.rglob("*")) == sorted([*left, "dir", "sub"])
    layout.lay_out(str(root), first, sources.tree(FIRST))
    assert snapshot(root) == fresh(tmp_path, sources.tree(FIRST))


def test_empty_removes_unwritable_directories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"f")
    (root / "a" / "b").chmod(0o500)
    (root / "a").chmod(0)
    root.chmod(0o500)
    layout.empty(str(root))
    assert list(root.iterdir()) == []


def test_directory_flags_and_times_a_command_set_are_reset(
    tmp_path: Path, sources: Sources
) -> None:
    """A command owns its tree's directories: `chattr +S` (synchronous writes,
    passed on to what is made inside) or a forged time must not reach the next."""
    root = tmp_path / "place" / "root"
    root.mkdir(parents=True)
    first = sources.tree(FIRST)
    layout.lay_out(str(root), layout.Dir(), first)
    directory = root / "dir"
    fresh = flags(directory)
    synchronous = 0x8  # FS_SYNC_FL
    if fresh is not None:  # the filesystem has inode flags: set one as chattr would
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            fcntl.ioctl(descriptor, layout.FS_IOC_SETFLAGS, struct.pack("i", fresh | synchronous))
        finally:
            os.close(descriptor)
        assert flags(directory) == fresh | synchronous
    os.utime(directory, (12345, 12345))
    layout.restore(str(root), first)
    assert flags(directory) == fresh
    assert directory.stat().st_mtime > 12345


def test_attributes_a_fresh_directory_has_are_kept_or_put_back(tmp_path: Path) -> None:
    """Only what a fresh directory lacks is removed (a security label stays)."""
    directory = tmp_path / "dir"
    directory.mkdir()
    os.setxattr(directory, "user.label", b"changed")
    os.setxattr(directory, "user.left", b"1")
    fresh = layout.Fresh(flags=None, attributes={"user.label": b"fresh"})
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        layout.reset_directory(descriptor, fresh)
    finally:
        os.close(descriptor)
    assert os.listxattr(directory) == ["user.label"]
    assert os.getxattr(directory, "user.label") == b"fresh"


def flags(path: Path) -> int | None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return layout._flags(descriptor)
    finally:
        os.close(descriptor)
