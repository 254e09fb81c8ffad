"""Collecting an action's outputs into an ActionResult, and uploading them.

Output paths are relative to the working directory. Symlinks are recorded as
symlinks, never followed; one whose target is absolute or leaves the action's
tree is refused (FAILED_PRECONDITION, as the server's capabilities announce).
A path whose parent directories lead outside the tree is refused the same way.
Directories become Tree messages.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cas.store import BlobStore, put_missing
from reapi.digests import Digest, DigestFunction
from reapi.errors import FailedPrecondition
from reapi.protos import remote_execution_pb2 as re_pb2


@dataclass
class _Uploads:
    function: DigestFunction
    blobs: dict[Digest, bytes] = field(default_factory=dict)

    def add(self, data: bytes) -> Digest:
        digest = self.function.digest_of(data)
        self.blobs[digest] = data
        return digest


class OutputCollector:
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
        data = path.read_bytes()
        executable = bool(path.stat().st_mode & stat.S_IXUSR)
        return self._uploads.add(data), executable

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

    def collect(self, command: re_pb2.Command, result: re_pb2.ActionResult) -> None:
        """Fill `result`'s outputs from the tree."""
        legacy = not command.output_paths
        paths = list(command.output_paths) or [*command.output_files, *command.output_directories]
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

    def add_blob(self, data: bytes) -> Digest:
        return self._uploads.add(data)

    async def upload(self, store: BlobStore, keep_bytes: int = 0) -> list[bytes]:
        """Send every collected blob the CAS lacks, except the smallest, up to
        `keep_bytes` in all: those are returned, for the caller to deliver."""
        kept: list[bytes] = []
        rest = {}
        for digest, data in sorted(self._uploads.blobs.items(), key=lambda item: item[0].size):
            if digest.size <= keep_bytes:
                kept.append(data)
                keep_bytes -= digest.size
            else:
                rest[digest] = data
        await put_missing(store, list(rest), rest.__getitem__)
        return kept
