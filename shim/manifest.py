"""A compile's system-file manifest (see reapi.core.conventions), and the
compiler's identity: the programs it runs.

The manifest lists, as `HASH SIZE PATH`, the compiler's programs and every
system file the compile reads, and as `ABSENT 0 PATH` every system path it
found missing; a worker whose copies differ refuses the action. It is an input
of the action, so it is part of the cache key too.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping

from reapi.core.conventions import ABSENT, file_identity
from shim.scan import StatKey

# Where the manifest lies in the input tree (named by REAPI_SYSTEM_FILES).
MANIFEST = ".reapi/system-files"
# Manifests kept, each for one set of system headers (with their statuses) and
# absent paths: a few dozen for most projects, about 100 KB each.
MANIFESTS = 256


class Manifests:
    """Manifests and compiler identities, made once and kept: most compiles of a
    project use one compiler and read the same system headers."""

    def __init__(self) -> None:
        self._identities: dict[tuple[str, int, int], list[str]] = {}
        self._manifests: dict[object, bytes] = {}

    def programs(self, compiler: str) -> list[str]:
        """The files that make up the compiler: its binary, cc1, cc1plus, as."""
        stat = os.stat(compiler)
        key = (compiler, stat.st_mtime_ns, stat.st_ino)
        if key not in self._identities:
            programs = [os.path.realpath(compiler)]
            for program in ("cc1", "cc1plus", "as"):
                found = _print_prog_name(compiler, program)
                if found:
                    programs.append(os.path.realpath(found))
            self._identities[key] = programs
        return self._identities[key]

    def manifest(
        self,
        compiler: str,
        system_files: list[str],
        absent: list[str],
        statuses: Mapping[str, StatKey],
    ) -> bytes:
        """The manifest of the compiler's programs, the system files read (with
        their `statuses` when the caller took them) and the `absent` paths."""
        programs = tuple(_lines([(path, None) for path in self.programs(compiler)], []))
        files = [(path, statuses.get(path)) for path in system_files]
        if not files or not all(status is not None for _, status in files):
            return _manifest_text(programs, _lines(files, absent))
        # Most compiles of a project read the same system headers: their manifest
        # is made once for each set of (path, status).
        key = (frozenset(files), frozenset(absent), programs)
        manifest = self._manifests.get(key)
        if manifest is None:
            if len(self._manifests) >= MANIFESTS:
                self._manifests.clear()
            manifest = self._manifests[key] = _manifest_text(programs, _lines(files, absent))
        return manifest


def _lines(files: list[tuple[str, StatKey | None]], absent: list[str]) -> list[tuple[str, str]]:
    """(path, manifest line) of each file that exists, and of each absent path."""
    lines = []
    for path, status in files:
        identity = file_identity(path, digest_status(status))
        if identity is not None:
            lines.append((path, f"{identity[0]} {identity[1]} {path}"))
    lines.extend((path, f"{ABSENT} 0 {path}") for path in set(absent))
    return lines


def _manifest_text(*parts: Iterable[tuple[str, str]]) -> bytes:
    """The manifest of (path, line) pairs: one line per path, sorted by path."""
    lines = [line for _, line in sorted({pair for part in parts for pair in part})]
    return ("\n".join(lines) + "\n").encode()


def digest_status(key: StatKey | None) -> tuple[int, int, int] | None:
    """A scanner's StatKey as the digest caches' (size, mtime_ns, inode)."""
    return None if key is None else (key[0], key[1], key[3])


def _print_prog_name(compiler: str, program: str) -> str | None:
    try:
        found = subprocess.run(
            [compiler, f"-print-prog-name={program}"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None
