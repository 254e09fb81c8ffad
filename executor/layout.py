"""A slot's tree on disk, kept from one action to the next.

Actions that run one after another on a worker mostly read the same files (a
project's headers), and emptying a tree costs more than laying one out. So a
slot keeps its tree: after an action, `restore` puts it back to the input tree
the action was given, and the next action's tree is made from that by
`lay_out`, which removes what the new tree lacks and adds what it needs.

Input files are hard links to the worker's cache, whose files an action can
neither write nor chmod (executor/local_cache.py). A kept file is therefore
still the right file exactly when its name still points to the cache file's
inode, which the directory listing itself tells (no stat). Whatever else an
action left in its tree, removed, renamed or replaced is taken away, and so
forgotten; each kept directory gets a fresh directory's mode back and loses
its extended attributes. Nothing here follows a symbolic link.

The description of a tree is a `Dir`, from the input tree's Directory messages.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

# The mode of a directory in a fresh tree.
DIRECTORY_MODE = 0o755


@dataclass(frozen=True)
class File:
    source: str  # the cache file it is a hard link to
    inode: int  # that file's


@dataclass(frozen=True)
class Link:
    target: str


@dataclass(eq=False)
class Dir:
    entries: dict[str, Node] = field(default_factory=dict)

    def subdirectory(self, path: str) -> Dir | None:
        """The directory at `path` ("a/b", relative; "" is this one), added
        where missing; None where a file or symlink is in the way."""
        directory = self
        for part in path.split("/"):
            if part in ("", "."):
                continue
            node = directory.entries.setdefault(part, Dir())
            if not isinstance(node, Dir):
                return None
            directory = node
        return directory


Node = File | Link | Dir


def lay_out(path: str, have: Dir, want: Dir) -> None:
    """Turn the directory at `path`, which holds exactly `have`, into `want`."""
    for name, old in have.entries.items():
        new = want.entries.get(name)
        if isinstance(old, Dir):
            if not isinstance(new, Dir):
                _remove(os.path.join(path, name), is_directory=True)
        elif new != old:
            _remove(os.path.join(path, name), is_directory=False)
    for name, new in want.entries.items():
        kept = have.entries.get(name)
        target = os.path.join(path, name)
        if isinstance(new, Dir):
            if not isinstance(kept, Dir):
                os.mkdir(target, DIRECTORY_MODE)
                kept = Dir()
            lay_out(target, kept, new)
        elif new != kept:
            if isinstance(new, File):
                os.link(new.source, target)
            else:
                os.symlink(new.target, target)


def restore(path: str, have: Dir) -> None:
    """Put the directory at `path` back to `have` after a command ran there:
    anything not in `have`, or no longer the same, is removed (and dropped from
    `have`), so `have` then describes exactly what is there."""
    os.chmod(path, DIRECTORY_MODE)
    for name in os.listxattr(path):
        os.removexattr(path, name)
    kept = set()
    with os.scandir(path) as entries:
        for entry in entries:
            node = have.entries.get(entry.name)
            if _intact(entry, node):
                kept.add(entry.name)
                if isinstance(node, Dir):
                    restore(entry.path, node)
            else:
                _remove(entry.path, entry.is_dir(follow_symlinks=False))
    for name in have.entries.keys() - kept:
        del have.entries[name]


def empty(path: str) -> None:
    """Remove everything in the directory at `path`. Directories a command made
    unwritable are made writable first (a worker that is not root needs that)."""
    os.chmod(path, DIRECTORY_MODE)
    with os.scandir(path) as entries:
        for entry in entries:
            _remove(entry.path, entry.is_dir(follow_symlinks=False))
    if os.listdir(path):  # something still running wrote there
        raise OSError(errno.ENOTEMPTY, "still not empty", path)


def _intact(entry: os.DirEntry[str], node: Node | None) -> bool:
    if isinstance(node, File):
        return entry.is_file(follow_symlinks=False) and entry.inode() == node.inode
    if isinstance(node, Link):
        return entry.is_symlink() and os.readlink(entry.path) == node.target
    if isinstance(node, Dir):
        return entry.is_dir(follow_symlinks=False)
    return False


def _remove(path: str, is_directory: bool) -> None:
    """Remove a file, or a directory and all in it (made writable first: a
    worker that is not root needs that). Nothing runs in the tree meanwhile, so
    a plain walk is safe (shutil.rmtree costs several times as much)."""
    if not is_directory:
        os.unlink(path)
        return
    os.chmod(path, DIRECTORY_MODE)
    with os.scandir(path) as entries:
        for entry in entries:
            _remove(entry.path, entry.is_dir(follow_symlinks=False))
    os.rmdir(path)
