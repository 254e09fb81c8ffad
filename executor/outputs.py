"""Collecting an action's outputs into an ActionResult, and uploading them.

Output paths are relative to the working directory. Symlinks are recorded as
symlinks, never followed; one whose target is absolute or leaves the action's
tree is refused (FAILED_PRECONDITION, as the server's capabilities announce).
A path whose parent directories lead outside the tree is refused the same way.
Directories become Tree messages.

Files are never held whole: each is hashed a chunk at a time, and read again
when it is sent, small ones in batches of at most BATCH_BYTES, large ones a
chunk at a time on their own stream. So the worker's memory does not grow
with the size of an action's outputs (stdout and stderr included), only
with their number (a digest and a path each).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cas.remote import BATCH_BYTES
from cas.store import BlobStore, put_file
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import FailedPrecondition
from reapi.protos import remote_execution_pb2 as re_pb2

# Files of up to SMALL_FILE bytes are read once and held, up to HELD_BYTES in all
# (a compile's outputs); the rest are hashed from the file and read again to be sent.
SMALL_FILE = 64 * 1024
HELD_BYTES = 4 * 1024 * 1024


@dataclass
class _Uploads:
    function: DigestFunction
    blobs: dict[Digest, bytes] = field(default_factory=dict)  # messages, small files
    files: dict[Digest, Path] = field(default_factory=dict)  # files, read when sent
    held: int = 0  # bytes of files in `blobs`

    def add(self, data: bytes) -> Digest:
        digest = self.function.digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_file(self, path: Path) -> Digest:
        size = path.stat().st_size
        if size <= SMALL_FILE and self.held + size <= HELD_BYTES:
            data = path.read_bytes()
            self.held += len(data)
            return self.add(data)
        digest = self.function.digest_of_file(path)
        self.files.setdefault(digest, path)
        return digest

    def data(self, digest: Digest) -> bytes:
        if digest in self.blobs:
            return self.blobs[digest]
        data = self.files[digest].read_bytes()
        if len(data) != digest.size:  # nothing runs in the tree any more
            raise FailedPrecondition(f"output {self.files[digest]} changed while it was sent")
        return data


class OutputCollector:
    """Collects outputs (`collect`, `add_file`: blocking, to be called in a
    thread) and sends them (`upload`)."""

    def __init__(self, root: Path, workdir: str, function: DigestFunction) -> None:
        self._root = root.resolve()
        self._base = (self._root / workdir).resolve()
        self._uploads = _Uploads(function)

    def _inside(self, path: Path) -> bool:
        return path == self._root or self._root in path.parents

    def _check_symlink(self, link: Path, target: str) -> None:
        if os.path.isabs(target):
            raise FailedPrecondition(
                f"output symlink {link.relative_to(self._root)} -> {target}: absolute targets "
                "are not allowed"
            )
        resolved = Path(os.path.normpath(link.parent / target))
        if not self._inside(resolved):
            raise FailedPrecondition(
                f"output symlink {link.relative_to(self._root)} -> {target} leaves the "
                "action's tree"
            )

    def _locate(self, relative: str) -> Path:
        path = self._base / relative
        # The parent must really be inside the tree (no symlinked escape on the way).
        if not self._inside(Path(os.path.realpath(path.parent))):
            raise FailedPrecondition(f"output {relative!r} lies outside the action's tree")
        return path

    def _file(self, path: Path) -> tuple[Digest, bool]:
        executable = bool(path.stat().st_mode & stat.S_IXUSR)
        return self._uploads.add_file(path), executable

    def _directory(self, path: Path) -> tuple[re_pb2.Directory, list[re_pb2.Directory]]:
        """The Directory for `path` and every Directory below it."""
        directory = re_pb2.Directory()
        below: list[re_pb2.Directory] = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            child = Path(entry.path)
            if entry.is_symlink():
                target = os.readlink(child)
                self._check_symlink(child, target)
                directory.symlinks.add(name=entry.name, target=target)
            elif entry.is_dir():
                sub, subs = self._directory(child)
                digest = self._uploads.add(sub.SerializeToString(deterministic=True))
                directory.directories.add(name=entry.name, digest=digest.to_proto())
                below += [sub, *subs]
            elif entry.is_file():
                digest, executable = self._file(child)
                directory.files.add(
                    name=entry.name, digest=digest.to_proto(), is_executable=executable
                )
        return directory, below

    def to_read(self, command: re_pb2.Command, files: list[Path]) -> int | None:
        """About the bytes collecting the outputs and `files` would read (a
        stat of each), or None when an output is a directory: whether it is
        worth a thread."""
        total = 0
        for path in [*files, *(self._base / relative for relative in _paths(command))]:
            try:
                info = path.lstat()
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                return None
            total += info.st_size
        return total

    def collect(self, command: re_pb2.Command, result: re_pb2.ActionResult) -> None:
        """Fill `result`'s outputs from the tree."""
        legacy = not command.output_paths
        paths = _paths(command)
        legacy_dirs = set(command.output_directories)
        for relative in paths:
            path = self._locate(relative)
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(path)
                self._check_symlink(path, target)
                symlink = re_pb2.OutputSymlink(path=relative, target=target)
                result.output_symlinks.append(symlink)
                if legacy:
                    kind = (
                        result.output_directory_symlinks
                        if relative in legacy_dirs
                        else result.output_file_symlinks
                    )
                    kind.append(symlink)
            elif stat.S_ISDIR(info.st_mode):
                if legacy and relative not in legacy_dirs:
                    raise FailedPrecondition(f"output file {relative!r} is a directory")
                root, children = self._directory(path)
                unique = {c.SerializeToString(deterministic=True): c for c in children}
                tree = re_pb2.Tree(root=root, children=list(unique.values()))
                digest = self._uploads.add(tree.SerializeToString(deterministic=True))
                result.output_directories.add(path=relative, tree_digest=digest.to_proto())
            elif stat.S_ISREG(info.st_mode):
                if legacy and relative in legacy_dirs:
                    raise FailedPrecondition(f"output directory {relative!r} is a file")
                digest, executable = self._file(path)
                result.output_files.add(
                    path=relative, digest=digest.to_proto(), is_executable=executable
                )

    def add_file(self, path: Path) -> Digest:
        """A file outside the outputs to send too (stdout, stderr)."""
        return self._uploads.add_file(path)

    async def upload(self, store: BlobStore, keep_bytes: int = 0) -> list[bytes]:
        """Send every collected blob the CAS lacks, except the smallest, up to
        `keep_bytes` in all: those are returned, for the caller to deliver."""
        uploads = self._uploads
        kept: list[bytes] = []
        rest = []
        for digest in sorted({*uploads.blobs, *uploads.files}, key=lambda d: d.size):
            if digest.size <= keep_bytes:
                kept.append(uploads.data(digest))
                keep_bytes -= digest.size
            else:
                rest.append(digest)
        batch: list[tuple[Digest, bytes]] = []
        size = 0
        for digest in await store.find_missing(rest):
            if digest in uploads.files and digest.size > BATCH_BYTES:
                await put_file(store, digest, uploads.files[digest])
                continue
            if batch and size + digest.size > BATCH_BYTES:
                await _put(store, batch)
                batch, size = [], 0
            batch.append((digest, uploads.data(digest)))
            size += digest.size
        if batch:
            await _put(store, batch)
        return kept


def _paths(command: re_pb2.Command) -> list[str]:
    """The output paths a Command names, in either of its forms."""
    return list(command.output_paths) or [*command.output_files, *command.output_directories]


async def _put(store: BlobStore, blobs: list[tuple[Digest, bytes]]) -> None:
    for error in await store.put_many(blobs):
        if error is not None:
            raise error
