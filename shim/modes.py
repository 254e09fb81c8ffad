"""Input modes: how a compile's inputs are found (REAPI_CC_MODE).

Each mode answers one question, `await mode.find(compile)`: which files the
compile reads, which system paths must stay missing on the worker, and the
arguments and outputs of the remote compile, all in the client's own terms
(absolute local paths). `shim/layout.py` then maps them into an input tree.

- `deps` (default): the local preprocessor's `-M` list, exact. The include
  scanner runs too, first, for direct mode and the ABSENT lines.
- `cpp`: preprocess here, send the preprocessed text (distcc's plain mode).
- `scan`: the memoized include scanner (distcc's pump mode); `deps` for a
  compile it cannot be sure of.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from shim.classify import RemoteCompile, compile_only_arguments
from shim.inputs import preprocess, preprocessor_dependencies
from shim.scan import Scanner, ScanResult, ScanUncertain, SearchPath, StatKey, search_arguments

log = logging.getLogger("reapi.agent")


@dataclass(frozen=True)
class Compile:
    """One compile the agent was asked to run, once classify() let it go remote."""

    cwd: str
    compiler: str  # the real compiler's path, as reapi-cc found it
    decision: RemoteCompile
    env: Mapping[str, str]
    mode: str  # deps, cpp or scan

    @property
    def debug(self) -> bool:
        return any(a.startswith("-g") and a != "-g0" for a in self.decision.arguments)

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
    are among those it recorded."""

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner

    async def find(self, compile: Compile) -> Inputs:
        try:
            scanned: Scanned | None = await self.scan(compile)
        except ScanUncertain:
            scanned = None
        except Exception:  # the scan only helps here: whatever it hit, compile without it
            log.exception("include scan of %s failed; compiling without direct mode", compile.cwd)
            scanned = None
        read = await self.dependencies(compile)
        if scanned is None or not scanned.result.statuses.keys() >= set(read):
            return self.inputs(compile, read)
        return self.inputs(compile, read, scanned)

    async def scan(self, compile: Compile) -> Scanned:
        """Our own memoized include scan; raises ScanUncertain."""
        decision = compile.decision
        arguments = search_arguments(decision.arguments)
        path = await self.scanner.search_path(
            compile.compiler, decision.language, arguments.search, compile.cwd, compile.env
        )
        return Scanned(self.scanner.scan(compile.cwd, decision.source, arguments, path), path)

    @staticmethod
    async def dependencies(compile: Compile) -> list[str]:
        return await preprocessor_dependencies(
            compile.compiler, compile.decision.arguments, compile.cwd, compile.env
        )

    @staticmethod
    def inputs(compile: Compile, read: list[str], scanned: Scanned | None = None) -> Inputs:
        """`read` as the inputs, with what a scan found for the manifest (absent
        paths, statuses) and for direct mode."""
        return Inputs(
            read=read,
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
            inputs = self.inputs(compile, await self.dependencies(compile))
            inputs.scan_fallback = str(uncertain)
            return inputs
        return self.inputs(compile, scanned.result.files, scanned)


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


def input_modes(scanner: Scanner) -> dict[str, InputMode]:
    return {"deps": DepsMode(scanner), "cpp": CppMode(), "scan": ScanMode(scanner)}
