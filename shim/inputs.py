"""Asking the local preprocessor about a compile, and digesting files.

`deps` asks the local preprocessor for the exact list of files the compile
reads (`-M`, which includes system headers); `cpp` for its preprocessed
text. A file's digest, and the facts of its text that decide how it may
travel (FileInfo), are read once while the file is unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reapi.core.digests import Digest, DigestFunction

# Options whose only effect is an output: left out of the dependency query.
_OUTPUT_OPTIONS_WITH_VALUE = ("-o", "-MF", "-MT", "-MQ")
_OUTPUT_FLAGS = ("-c", "-S", "-MD", "-MMD", "-MP")


class InputsUnknown(Exception):
    """The inputs could not be determined; the message is a stats reason."""


class PreprocessHere(InputsUnknown):
    """The compile cannot be sent as its files, faithfully, but its
    preprocessed text can (`cpp` mode); the message is a stats reason."""


# Words whose expansion depends on more than a file's text.
_DATE_TIME = (b"__DATE__", b"__TIME__")
_FILE_NAME = (b"__FILE__", b"__BASE_FILE__", b"__builtin_FILE", b"__builtin_source_location")
_ONCE = (b"pragma once", b"import")


@dataclass(frozen=True)
class FileInfo:
    digest: Digest
    uses_date_time: bool  # mentions __DATE__ or __TIME__: the object changes every build
    uses_timestamp: bool  # mentions __TIMESTAMP__: the source's mtime, which differs remotely
    uses_file_name: bool  # mentions __FILE__ or its kin: the object may name a path
    once: bool  # may be included once only (#pragma once, #import): gcc compares mtimes
    # Has text besides directives and comments: only such a file can expand
    # __FILE__ into the object (a generated config.h of #defines cannot).
    has_code: bool = True


def file_info(data: bytes) -> FileInfo:
    digest = Digest(DigestFunction.SHA256, hashlib.sha256(data).hexdigest(), len(data))
    return FileInfo(
        digest,
        uses_date_time=any(word in data for word in _DATE_TIME),
        uses_timestamp=b"__TIMESTAMP__" in data,
        uses_file_name=any(word in data for word in _FILE_NAME),
        once=any(word in data for word in _ONCE),
        has_code=_has_code(data),
    )


# Comments, and a line's splice (a backslash at its end).
_COMMENT = re.compile(rb"/\*.*?\*/|//[^\n]*", re.DOTALL)
_SPLICE = re.compile(rb"\\\r?\n")


def _has_code(data: bytes) -> bool:
    """Whether a file's text holds anything but directives, comments and
    blank lines (in doubt: yes)."""
    if b"/*" in data or b"//" in data:
        data = _COMMENT.sub(b" ", data)
    if b"\\" in data:
        data = _SPLICE.sub(b"", data)
    return any(line.strip() and not line.lstrip().startswith(b"#") for line in data.splitlines())


class DigestCache:
    """SHA256 of files, keyed by (path, size, mtime, inode): one read per change."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int, int], FileInfo] = {}
        self.data: dict[Digest, str] = {}  # digest -> a path holding it, for uploads

    def info(self, path: str, status: tuple[int, int, int] | None = None) -> FileInfo:
        """The file's digest; `status` (size, mtime_ns, inode), when the caller
        has just taken it, saves a stat."""
        if status is None:
            stat = os.stat(path)
            status = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        key = (path, *status)
        found = self._known.get(key)
        if found is None:
            with open(path, "rb") as file:
                found = self._known[key] = file_info(file.read())
        self.data[found.digest] = path
        return found


def dependency_query(
    compiler: str, arguments: Sequence[str], text_to: str | None = None
) -> list[str]:
    """The compile's own arguments, outputs removed, asking for `-M` on stdout;
    or, with `text_to`, for the preprocessed text on stdout and the
    dependencies in the file `text_to`."""
    query = [compiler]
    skip = False
    for argument in arguments:
        if skip:
            skip = False
            continue
        if argument in _OUTPUT_OPTIONS_WITH_VALUE:
            skip = True
            continue
        if argument.startswith(_OUTPUT_OPTIONS_WITH_VALUE) or argument in _OUTPUT_FLAGS:
            continue
        if argument.startswith("-Wp,-M") or argument in ("--coverage", "-ftest-coverage"):
            continue
        query.append(argument)
    if text_to is not None:  # (-P: without line markers, which name every file)
        return [*query, "-E", "-P", "-o", "-", "-MD", "-MF", text_to, "-MT", "x"]
    return [*query, "-M"]


def parse_make_rule(text: str) -> list[str]:
    """The prerequisites of a `target: prereq ...` rule as gcc writes it
    (a space escaped as `\\ `, `#` as `\\#`, `$` as `$$`)."""
    body = text.replace("\\\n", " ")
    _target, sep, prerequisites = body.partition(": ")
    if not sep:
        raise InputsUnknown("unreadable-dependencies")
    words = _WORD.findall(prerequisites)
    if "\\" in prerequisites or "$$" in prerequisites:
        words = [_ESCAPED.sub(r"\1", word).replace("$$", "$") for word in words]
    return words


_WORD = re.compile(r"(?:\\.|[^\s\\])+")
_ESCAPED = re.compile(r"\\([ #])")


async def run_preprocessor(
    argv: Sequence[str], cwd: str, env: Mapping[str, str], stderr: bool = False
) -> bytes:
    """Standard output (or, with `stderr`, standard error) of a local
    preprocessor run; raises InputsUnknown if it fails (the local compile that
    follows then shows the error)."""
    pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=devnull,
        stdout=devnull if stderr else pipe,
        stderr=pipe if stderr else devnull,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise InputsUnknown("preprocessor-failed")
    return err if stderr else out


@dataclass(frozen=True)
class Dependencies:
    """What the local preprocessor says a compile reads."""

    files: list[str]  # absolute, normalized paths
    absolute: list[str]  # those it named by absolute paths (an absolute -I, source...)
    text: bytes | None = None  # the preprocessed text, when asked for


async def preprocessor_dependencies(
    compiler: str,
    arguments: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    text_in: str | None = None,
) -> Dependencies:
    """Every file the compile reads, from the local preprocessor; with
    `text_in` (a directory for a scratch file) its preprocessed text too.
    Raises PreprocessHere for a path that goes up (`..`) from a symbolic
    link: the kernel follows the link where a lexical reading would not."""
    text = None
    if text_in is None:
        rule = (await run_preprocessor(dependency_query(compiler, arguments), cwd, env)).decode()
    else:
        fd, scratch = tempfile.mkstemp(suffix=".d", dir=text_in)
        os.close(fd)
        try:
            query = dependency_query(compiler, arguments, scratch)
            text = await run_preprocessor(query, cwd, env)
            with open(scratch, "rb") as file:
                rule = file.read().decode()
        finally:
            os.unlink(scratch)
    files: list[str] = []
    absolute: list[str] = []
    for named in parse_make_rule(rule):
        path = os.path.join(cwd, named)
        if "/.." in path and not lexical_is_physical(path):
            raise PreprocessHere("symlink-dotdot")
        files.append(os.path.normpath(path))
        if os.path.isabs(named):
            absolute.append(files[-1])
    return Dependencies(files, absolute, text)


def lexical_is_physical(path: str) -> bool:
    """Whether `path`'s `..` components lead where normalizing it would
    (they do unless a symbolic link comes before one). What decides is the
    path up to its last `..`, which hundreds of a build's names share (git's
    `contrib/buildsystems/../..`): its answer is kept for a second."""
    climb = path[: path.rindex("..") + 2] if ".." in path else path
    now = time.monotonic()
    known = _physical.get(climb)
    if known is None or now - known[0] > PHYSICAL_SECONDS:
        if len(_physical) > 10_000:
            _physical.clear()
        answer = os.path.realpath(climb) == os.path.realpath(os.path.normpath(climb))
        known = _physical[climb] = (now, answer)
    return known[1]


# How long the answer of lexical_is_physical is believed (seconds): a directory
# replaced by a symbolic link within that time is seen a little late.
PHYSICAL_SECONDS = 1.0
_physical: dict[str, tuple[float, bool]] = {}


def preprocess_query(
    compiler: str, arguments: Sequence[str], output: str, dependency_file: str | None
) -> list[str]:
    """The compile's arguments turned into a local preprocessing run (`-E` to
    stdout) that also writes the compile's dependency file, with the names the
    compile itself would have used."""
    query = [compiler]
    skip = has_target = has_file = False
    for argument in arguments:
        if skip:
            skip = False
            continue
        if argument == "-o":
            skip = True
            continue
        if argument.startswith("-o") or argument in ("-c", "-S"):
            continue
        has_target = has_target or argument.startswith(("-MT", "-MQ"))
        has_file = has_file or argument.startswith("-MF")
        query.append(argument)
    if dependency_file is not None and not any(a.startswith("-Wp,-M") for a in arguments):
        if not has_file:
            query += ["-MF", dependency_file]
        if not has_target:
            query += ["-MT", output]
    return [*query, "-E", "-o", "-"]


async def preprocess(
    compiler: str,
    arguments: Sequence[str],
    output: str,
    dependency_file: str | None,
    cwd: str,
    env: Mapping[str, str],
) -> bytes:
    """The preprocessed source (`cpp` mode); writes the dependency file here."""
    query = preprocess_query(compiler, arguments, output, dependency_file)
    return await run_preprocessor(query, cwd, env)
