"""What has not changed since it was last looked at, as the kernel tells.

The shim's scanner asks for the status of every file a compile may read (about
400 for a C file of git, most of them system headers) and for the listings of
the directories its lookups searched; a worker checks the system files each
compile's manifest lists (reapi/core/conventions.py). Asked again for each compile,
that is a system call per file. The agent and the worker live across compiles,
so they watch those directories with inotify instead: a status or a listing
taken after its directory was watched stays true until the kernel reports a
change there.
The kernel queues an event before the call that made the change returns, so
draining the queue (`refresh`) at the start of a compile sees every change
made before the compile was asked for.

Trusted, and so remembered, only where the events tell the whole story:
- regular files with one link (a change through a symbolic or hard link made
  elsewhere is reported in the other directory), and missing files;
- directories on a local filesystem (another machine's changes to an NFS
  export are not reported here), watched along with every ancestor, so that
  renaming or replacing any directory on the path is seen too.
Any other path is asked about again each time, as without a watcher. If
inotify is unavailable or out of watches, nothing is trusted.

A change to a directory on a trusted path (one created, removed, renamed or
changed mode), a full event queue, or a watch the kernel dropped forgets
everything: such changes are rare during a build and hard to follow exactly.
"""

from __future__ import annotations

import os
import stat
import weakref
from typing import Any

from inotify_simple import INotify, flags

# A file's (size, mtime_ns, ctime_ns, inode): it has not changed while these have not.
StatKey = tuple[int, int, int, int]


def stat_key(path: str) -> StatKey | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino)


# Filesystems whose every change is made by this machine's kernel.
LOCAL_FILESYSTEMS = frozenset(
    ("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "ramfs", "overlay", "zfs")
)
WATCHED = (
    flags.MODIFY
    | flags.ATTRIB
    | flags.CREATE
    | flags.DELETE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
)
# Events after which no watch is known to mean what it meant.
LOST = flags.Q_OVERFLOW | flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT
# Events that change which names a directory holds.
LISTING = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
_GONE = object()  # what a status the watcher does not remember pops as


class Watcher:
    def __init__(self, enabled: bool = True) -> None:
        self._inotify: INotify | None = None
        self._close: weakref.finalize[Any, Any] | None = None  # closes _inotify
        self._enabled = enabled
        self._devices: dict[int, bool] | None = None  # st_dev -> on a local filesystem
        # Counts the changes to what it remembers: what was concluded from the
        # statuses and listings it gave stays true while this stays the same.
        self.changes = 0
        self._reset()

    def _reset(self) -> None:
        """Forget everything, watches included."""
        self.changes += 1
        if self._close is not None:
            self._close()
        self._inotify = self._close = None
        if self._enabled:
            try:
                self._inotify = INotify(nonblocking=True)
            except OSError:
                self._enabled = False
            else:  # closed with the watcher, or at the next reset
                self._close = weakref.finalize(self, self._inotify.close)
        self._directories: dict[int, set[str]] = {}  # watch -> the paths it watches
        self._trusted: dict[str, bool] = {}  # directory -> whether its events are complete
        self._below: dict[str, set[str]] = {}  # directory -> names on a trusted path
        self.statuses: dict[str, StatKey | None] = {}  # unchanged since taken
        self.listings: dict[str, frozenset[str]] = {}  # unchanged since taken

    def refresh(self) -> None:
        """Take in the changes reported since the last call."""
        if self._inotify is None:
            return
        events = self._inotify.read(timeout=0)
        if not events:
            return
        listed: dict[str, set[str]] = {}
        for event in events:
            if event.mask & LOST or not event.name:  # not a file's event: the directory's
                self._reset()
                return
            for directory in self._directories.get(event.wd, ()):
                if event.name in self._below.get(directory, ()):
                    self._reset()  # a directory we rely on changed
                    return
                path = os.path.join(directory, event.name)
                if self.statuses.pop(path, _GONE) is not _GONE:
                    self.changes += 1
                if event.mask & LISTING and directory in self.listings:
                    listed.setdefault(directory, set()).add(event.name)
        for directory, names in listed.items():
            old = self.listings[directory]
            present = {n for n in names if os.path.isfile(os.path.join(directory, n))}
            if not (present <= old and old.isdisjoint(names - present)):
                self.listings[directory] = (old - names) | present
                self.changes += 1

    def trusts(self, directory: str) -> bool:
        """Whether every change in `directory` (absolute, normalized) and on
        its path is reported from now on: watches it and its ancestors."""
        found = self._trusted.get(directory)
        if found is not None:
            return found
        self._trusted[directory] = found = self._watch(directory)
        return found

    def _watch(self, directory: str) -> bool:
        if self._inotify is None or not os.path.isabs(directory):
            return False
        if directory != os.path.normpath(directory):
            return False  # "..": the watched path may not be the one looked in
        parent, name = os.path.split(directory)
        if name:  # not the root
            if not self.trusts(parent):
                return False
            self._below.setdefault(parent, set()).add(name)
        try:
            watch = self._inotify.add_watch(directory, WATCHED)
            device = os.stat(directory).st_dev
        except (FileNotFoundError, NotADirectoryError):
            return True  # its parent's watch reports it appearing
        except OSError:  # no permission, or out of watches
            return False
        self._directories.setdefault(watch, set()).add(directory)
        return self._local(device)

    def _local(self, device: int) -> bool:
        if self._devices is None:
            self._devices = {}
            try:
                with open("/proc/self/mountinfo") as mounts:
                    for line in mounts:
                        fields = line.split()
                        major, minor = fields[2].split(":")
                        kind = fields[fields.index("-") + 1]
                        self._devices[os.makedev(int(major), int(minor))] = (
                            kind in LOCAL_FILESYSTEMS
                        )
            except (OSError, ValueError, IndexError):
                pass
        return self._devices.get(device, False)

    def status(self, path: str) -> StatKey | None:
        """stat_key(path), remembered while its directory reports every change."""
        try:
            return self.statuses[path]
        except KeyError:
            pass
        trusted = self.trusts(os.path.dirname(path))
        try:
            found = os.lstat(path)
            if stat.S_ISLNK(found.st_mode):
                trusted = False
                found = os.stat(path)
        except OSError:
            key = None
        else:
            key = (found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino)
            trusted = trusted and stat.S_ISREG(found.st_mode) and found.st_nlink == 1
        if trusted:
            self.statuses[path] = key
        return key

    def listing(self, directory: str) -> frozenset[str] | None:
        """The names of the regular files in `directory`, if it is trusted."""
        found = self.listings.get(directory)
        if found is None:
            if not self.trusts(directory):
                return None
            found = self.listings[directory] = list_files(directory)
        return found


def list_files(directory: str) -> frozenset[str]:
    try:
        with os.scandir(directory) as entries:
            return frozenset(entry.name for entry in entries if entry.is_file())
    except OSError:
        return frozenset()
