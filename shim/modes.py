"""Input modes: how a compile's inputs are found (REAPI_CC_MODE).

Each mode answers one question, `await mode.find(compile)`: which files the
compile reads, which system paths must stay missing on the worker, and the
arguments and outputs of the remote compile, all in the client's own terms
(absolute local paths). `shim/layout.py` then maps them into an input tree.

- `deps`: the local preprocessor's `-M` list, exact. The include scanner
  runs too, first, for direct mode and the ABSENT lines.

Both `deps` and `scan` add what the compile probes without reading
(`__has_include`): gcc's list names only the files it reads, yet a probed
file that exists here must exist in the sandbox too, and a probed system
path must be as present or absent on the worker as here. Where a probe cannot
be resolved from the text, the mode raises PreprocessHere: the compile is
then preprocessed here (`cpp`), which is exact.
- `cpp`: preprocess here, send the preprocessed text (distcc's plain mode).
- `scan` (the default): the memoized include scanner (distcc's pump mode);
  `deps` for a compile it cannot be sure of.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from reapi.core.conventions import provided_by
from shim.classify import RemoteCompile, compile_only_arguments
from shim.inputs import Dependencies, PreprocessHere, preprocess, preprocessor_dependencies
from shim.paths import named_paths
from shim.scan import (
    Probed,
    Scanner,
    ScanResult,
    ScanUncertain,
    SearchPath,
    StatKey,
    search_arguments,
)

log = logging.getLogger("reapi.agent")


@dataclass(frozen=True)
class Compile:
    """One compile the agent was asked to run, once classify() let it go remote."""

    cwd: str
    compiler: str  # the real compiler's path, as reapi-cc found it
    decision: RemoteCompile
    env: Mapping[str, str]
    mode: str  # deps, cpp or scan
    provided: tuple[str, ...]  # the directories every worker provides

    @property
    def debug(self) -> bool:
        return any(a.startswith("-g") and a != "-g0" for a in self.decision.arguments)

    @functools.cached_property
    def names_outside(self) -> bool:
        """Whether its arguments name an absolute path that the sandbox will
        name otherwise (not a provided one): __FILE__ may then differ."""
        return any(
            value.startswith("/") and not provided_by(os.path.normpath(value), self.provided)
            for value in named_paths(self.decision.arguments).values
        )

    @property
    def outputs(self) -> list[str]:
        """What the compile writes, as it names them."""
        decision = self.decision
        extra = [decision.dependency_file] if decision.dependency_file else []
        return sorted({decision.output, *decision.extra_outputs, *extra})


@dataclass(frozen=True)
class Scanned:
    """The include scan of a compile, when it vouches for the files read:
    direct mode (shim/memo.py) may then take the compile again."""

    result: ScanResult
    search: SearchPath


@dataclass
class Inputs:
    """A compile's remote side in the client's terms, as an input mode finds it."""

    read: list[str]  # absolute paths of the files the compile reads
    absent: list[str]  # absolute paths that must not exist where it runs
    arguments: list[str]  # for the remote compiler
    outputs: list[str]  # as the compile names them
    generated: dict[str, bytes] = field(default_factory=dict)  # absolute path -> bytes made here
    statuses: Mapping[str, StatKey] = field(default_factory=dict)  # of files in `read`
    scanned: Scanned | None = None
    scan_fallback: str | None = None  # why `scan` used `deps` for this compile
    # (directory searched, name, path found) of each __has_include that found a file
    probes: list[tuple[str, str, str]] = field(default_factory=list)
    # The paths __FILE__ and its kin expand to, where they may differ in the
    # sandbox: known (the preprocessed text was looked at: those of the files
    # named by absolute paths that it holds), or None: to be judged from the
    # files' text.
    file_names: frozenset[str] | None = frozenset()
    named_absolutely: list[str] = field(default_factory=list)  # read files named by absolute paths


class InputMode(Protocol):
    async def find(self, compile: Compile) -> Inputs:
        """The compile's inputs; raises InputsUnknown (the message is a stats
        reason) when they cannot be found: the compile then runs locally."""
        ...


class DepsMode:
    """`deps`: the preprocessor's list is the inputs. The scanner runs too,
    first (so that the statuses it takes are from before anything was read),
    for direct mode and the manifest's ABSENT lines: it vouches for a compile
    when it found every file the preprocessor listed. It follows every
    directive of every file it reaches (or gives up), so the lookups gcc made
    are among those it recorded.

    When the arguments name absolute paths (CMake's builds), the preprocessor
    is asked for its text as well as its list (the same run): whether
    __FILE__ expanded to one of those paths is then known, not guessed."""

    def __init__(self, scanner: Scanner, scratch: str) -> None:
        self.scanner = scanner
        self.scratch = scratch  # a directory for the preprocessor's dependency file

    async def find(self, compile: Compile) -> Inputs:
        try:
            scanned: Scanned | None = await self.scan(compile)
        except ScanUncertain:
            scanned = None
        except Exception:  # the scan only helps here: whatever it hit, compile without it
            log.exception("include scan of %s failed; compiling without direct mode", compile.cwd)
            scanned = None
        return await self.listed(compile, scanned)

    async def listed(self, compile: Compile, scanned: Scanned | None) -> Inputs:
        """The preprocessor's list as the inputs; `scanned`, when it covers
        them, for the manifest and direct mode."""
        with_text = compile.names_outside
        found = await self.dependencies(compile, self.scratch if with_text else None)
        read = found.files
        if scanned is not None and not scanned.result.statuses.keys() >= set(read):
            scanned = None
        inputs = self.inputs(compile, read, scanned)
        inputs.named_absolutely = found.absolute
        if found.text is not None:
            inputs.file_names = _named_files(found.text, found.absolute)
        elif found.absolute:
            inputs.file_names = None
        await self.add_probes(compile, inputs, scanned)
        return inputs

    async def scan(self, compile: Compile) -> Scanned:
        """Our own memoized include scan; raises ScanUncertain."""
        decision = compile.decision
        arguments = search_arguments(decision.arguments)
        path = await self.scanner.search_path(
            compile.compiler, decision.language, arguments.search, compile.cwd, compile.env
        )
        return Scanned(self.scanner.scan(compile.cwd, decision.source, arguments, path), path)

    @staticmethod
    async def dependencies(compile: Compile, text_in: str | None = None) -> Dependencies:
        return await preprocessor_dependencies(
            compile.compiler, compile.decision.arguments, compile.cwd, compile.env, text_in
        )

    async def add_probes(
        self, compile: Compile, inputs: Inputs, scanned: Scanned | None = None
    ) -> None:
        """Add what the files read probe: a file found is read too (it must be
        there), a place tried and found empty must stay so."""
        decision = compile.decision
        arguments = search_arguments(decision.arguments)
        if scanned is not None:
            search = scanned.search
        else:
            try:
                search = await self.scanner.search_path(
                    compile.compiler, decision.language, arguments.search, compile.cwd, compile.env
                )
            except ScanUncertain as uncertain:
                raise PreprocessHere(str(uncertain)) from None
        statuses = inputs.statuses
        try:
            probed: Probed = self.scanner.probes(
                ((path, statuses.get(path)) for path in inputs.read), search, arguments
            )
        except ScanUncertain as uncertain:
            raise PreprocessHere(str(uncertain)) from None
        known = set(inputs.read)
        inputs.read.extend(path for _, _, path in probed.found if path not in known)
        inputs.absent.extend(probed.absent)
        inputs.probes = probed.found

    @staticmethod
    def inputs(compile: Compile, read: list[str], scanned: Scanned | None = None) -> Inputs:
        """`read` as the inputs, with what a scan found for the manifest (absent
        paths, statuses) and for direct mode."""
        return Inputs(
            read=list(read),
            absent=list(scanned.result.absent) if scanned else [],
            arguments=list(compile.decision.arguments),
            outputs=compile.outputs,
            statuses=scanned.result.statuses if scanned else {},
            scanned=scanned,
        )


class ScanMode(DepsMode):
    """`scan` (distcc's pump mode): the scan's files are the inputs; `deps`
    for a compile the scanner cannot be sure of."""

    async def find(self, compile: Compile) -> Inputs:
        try:
            scanned = await self.scan(compile)
        except ScanUncertain as uncertain:
            inputs = await self.listed(compile, None)
            inputs.scan_fallback = str(uncertain)
            return inputs
        inputs = self.inputs(compile, list(scanned.result.files), scanned)
        inputs.file_names = None if compile.names_outside else frozenset()
        await self.add_probes(compile, inputs, scanned)
        return inputs


class CppMode:
    """`cpp` (distcc's plain mode): preprocess here, ship the result; the
    dependency file is written here by the preprocessor."""

    async def find(self, compile: Compile) -> Inputs:
        decision = compile.decision
        text = await preprocess(
            compile.compiler,
            decision.arguments,
            decision.output,
            decision.dependency_file,
            compile.cwd,
            compile.env,
        )
        suffix = ".ii" if decision.language.startswith("c++") else ".i"
        preprocessed = os.path.splitext(os.path.normpath(decision.source))[0] + suffix
        language = "c++-cpp-output" if suffix == ".ii" else "cpp-output"
        return Inputs(
            read=[],
            absent=[],
            arguments=[*compile_only_arguments(decision.arguments), "-x", language, preprocessed],
            outputs=[o for o in compile.outputs if o != decision.dependency_file],
            generated={os.path.join(compile.cwd, preprocessed): text},
        )


# Chosen by measurement (benchmarks/README.md): as safe as `deps` (what it
# cannot be sure of goes `deps`; probes, ABSENT lines and remote failures are
# handled alike), a fifth of its agent CPU, at distcc's speed cold.
DEFAULT_MODE = "scan"


def input_modes(scanner: Scanner, scratch: str) -> dict[str, InputMode]:
    """The modes by name; `scratch`: a directory for the preprocessor's files."""
    return {
        "deps": DepsMode(scanner, scratch),
        "cpp": CppMode(),
        "scan": ScanMode(scanner, scratch),
    }


# A string literal that is an absolute path, in preprocessed text.
_ABSOLUTE_STRING = re.compile(rb'"(/[^"\\\n]*)"')
# Builtins the compiler itself expands to the current file's name.
_FILE_BUILTINS = (b"__builtin_FILE", b"__builtin_source_location")


def _named_files(text: bytes, absolute: list[str]) -> frozenset[str]:
    """Those of the `absolute` paths of the files read (as the preprocessor
    named them) that the preprocessed `text` (without line markers) holds as
    strings: what __FILE__ and its kin expanded to. All of them where the
    compiler will name the file itself (__builtin_FILE), or where a path
    would have to be escaped in a string."""
    if any(builtin in text for builtin in _FILE_BUILTINS):
        return frozenset(absolute)
    if any("\\" in path or '"' in path for path in absolute):
        return frozenset(absolute)
    names = {path.encode(): path for path in absolute}
    found: set[str] = set()
    if not names:
        return frozenset()
    for match in _ABSOLUTE_STRING.finditer(text):
        path = names.get(os.path.normpath(match.group(1).decode(errors="replace")).encode())
        if path is not None:
            found.add(path)
    return frozenset(found)
