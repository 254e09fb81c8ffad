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
forgotten; each kept directory gets back what a fresh one has: its mode,
extended attributes, inode flags and a current time. Nothing here follows a
symbolic link, and nothing recurses (an action may make a very deep tree).

The description of a tree is a `Dir`, from the input tree's Directory messages.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
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

    def inodes(self) -> set[int]:
        """The inodes of every file in this tree."""
        found: set[int] = set()
        pending = [self]
        while pending:
            for node in pending.pop().entries.values():
                if isinstance(node, File):
                    found.add(node.inode)
                elif isinstance(node, Dir):
                    pending.append(node)
        return found


Node = File | Link | Dir


def lay_out(path: str, have: Dir, want: Dir, owner: int | None = None) -> None:
    """Turn the directory at `path`, which holds exactly `have`, into `want`;
    the directories it makes are `owner`'s (user and group), when given."""
    pending = [(path, have, want)]
    while pending:
        path, have, want = pending.pop()
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
                    if owner is not None:
                        os.chown(target, owner, owner)
                    kept = Dir()
                pending.append((target, kept, new))
            elif new != kept:
                if isinstance(new, File):
                    os.link(new.source, target)
                else:
                    os.symlink(new.target, target)


def restore(path: str, have: Dir) -> None:
    """Put the directory at `path` back to `have` after a command ran there:
    anything not in `have`, or no longer the same, is removed (and dropped from
    `have`), so `have` then describes exactly what is there. Each directory
    is reset as a fresh one would be (`reset_directory`)."""
    fresh = fresh_directory(os.path.dirname(os.path.abspath(path)))
    pending = [(path, have)]
    while pending:
        path, have = pending.pop()
        descriptor = _open_directory(path)
        try:
            kept = set()
            with os.scandir(descriptor) as entries:
                for entry in entries:
                    node = have.entries.get(entry.name)
                    inside = os.path.join(path, entry.name)
                    if _intact(entry, node, descriptor):
                        kept.add(entry.name)
                        if isinstance(node, Dir):
                            pending.append((inside, node))
                    else:
                        _remove(inside, entry.is_dir(follow_symlinks=False))
            for name in have.entries.keys() - kept:
                del have.entries[name]
            reset_directory(descriptor, fresh)
        finally:
            os.close(descriptor)


def empty(path: str) -> None:
    """Remove everything in the directory at `path`, and reset it."""
    fresh = fresh_directory(os.path.dirname(os.path.abspath(path)))
    descriptor = _open_directory(path)
    try:
        os.fchmod(descriptor, DIRECTORY_MODE)
        with os.scandir(descriptor) as entries:
            for entry in entries:
                _remove(os.path.join(path, entry.name), entry.is_dir(follow_symlinks=False))
        if os.listdir(descriptor):  # something still running wrote there
            raise OSError(errno.ENOTEMPTY, "still not empty", path)
        reset_directory(descriptor, fresh)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class Fresh:
    """What a directory made beside the tree has: its inode flags (None where
    the filesystem has none) and extended attributes (a security label, say)."""

    flags: int | None
    attributes: dict[str, bytes]


def reset_directory(descriptor: int, fresh: Fresh) -> None:
    """Give an open directory what a fresh one has: its mode, extended
    attributes and inode flags (`chattr`), and the current time. A command may
    set any of these on a directory it owns, and some flags (synchronous
    writes) pass to what is made inside."""
    os.fchmod(descriptor, DIRECTORY_MODE)
    for name in os.listxattr(descriptor):
        value = fresh.attributes.get(name)
        if value is None:
            os.removexattr(descriptor, name)
        elif os.getxattr(descriptor, name) != value:
            os.setxattr(descriptor, name, value)
    flags = _flags(descriptor)
    if flags is not None and fresh.flags is not None and flags != fresh.flags:
        fcntl.ioctl(descriptor, FS_IOC_SETFLAGS, struct.pack("i", fresh.flags))
    os.utime(descriptor)


# ioctl numbers of the inode flags (linux/fs.h), the same on the usual 64-bit machines.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
# What a new directory gets, per parent directory.
_fresh: dict[str, Fresh] = {}


def _flags(descriptor: int) -> int | None:
    """The inode flags of an open file, or None where the filesystem has none."""
    try:
        packed = fcntl.ioctl(descriptor, FS_IOC_GETFLAGS, struct.pack("i", 0))
    except OSError as error:
        if error.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return int(struct.unpack("i", packed)[0])


def fresh_directory(parent: str) -> Fresh:
    """What a directory made in `parent` gets (some flags and attributes are
    inherited): a scratch one is made there, read and removed, once. `parent`
    holds the tree, out of the commands' reach."""
    if parent not in _fresh:
        scratch = os.path.join(parent, f".reapi-fresh-{os.getpid()}")
        os.mkdir(scratch, DIRECTORY_MODE)
        try:
            descriptor = _open_directory(scratch)
            try:
                attributes = {n: os.getxattr(descriptor, n) for n in os.listxattr(descriptor)}
                _fresh[parent] = Fresh(_flags(descriptor), attributes)
            finally:
                os.close(descriptor)
        finally:
            os.rmdir(scratch)
    return _fresh[parent]


def _open_directory(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _intact(entry: os.DirEntry[str], node: Node | None, directory: int) -> bool:
    if isinstance(node, File):
        return entry.is_file(follow_symlinks=False) and entry.inode() == node.inode
    if isinstance(node, Link):
        return entry.is_symlink() and os.readlink(entry.name, dir_fd=directory) == node.target
    if isinstance(node, Dir):
        return entry.is_dir(follow_symlinks=False)
    return False


def remove(path: str) -> None:
    """Remove the directory at `path` and all in it, if it exists."""
    if os.path.lexists(path):
        _remove(path, os.path.isdir(path) and not os.path.islink(path))


def _remove(path: str, is_directory: bool) -> None:
    """Remove a file, or a directory and all in it (made writable first: a
    worker that is not root needs that), however deep. Nothing runs in the tree
    meanwhile, so a walk by path is safe."""
    if not is_directory:
        os.unlink(path)
        return
    pending = [(path, False)]
    while pending:
        path, emptied = pending.pop()
        if emptied:
            os.rmdir(path)
            continue
        os.chmod(path, DIRECTORY_MODE, follow_symlinks=False)
        pending.append((path, True))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, False))
                else:
                    os.unlink(entry.path)
