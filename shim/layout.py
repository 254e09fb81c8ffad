"""Laying a compile out as the worker will run it: from the files and
arguments an input mode found (local paths) to an ActionSpec (paths in the
input tree), through the compile's PathMap (shim/paths.py).

Files in directories the workers provide stay on the machines (the manifest
has the worker check its copies); every other file is sent, at its place.
The remote compile must write what the local one would, byte for byte:
- debug info names the compile's directories, so a debug build maps each
  sandbox place back to its local path (-fdebug-prefix-map);
- __FILE__ names a file as the compile reached it: where that could be an
  absolute path that the sandbox names otherwise, the same for
  -fmacro-prefix-map;
- what no map can mend goes the safe way (PreprocessHere: preprocessed here,
  which is exact): __TIMESTAMP__ (a file's mtime, which differs in the
  sandbox), two copies of a `#pragma once` file whose mtimes differ here
  (gcc takes such copies for one file when their mtimes match, and in the
  sandbox all copies of one content are one file), a probe that would find
  another file in the sandbox than here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from reapi.core.conventions import MANIFEST_VARIABLE, SANDBOX_ROOT
from reapi.core.digests import Digest
from shim.action import ActionSpec
from shim.inputs import DigestCache, FileInfo, PreprocessHere
from shim.manifest import MANIFEST, Manifests, digest_status
from shim.modes import Compile, Inputs
from shim.paths import (
    DEBUG_MAPS,
    MACRO_MAPS,
    PathMap,
    Roots,
    Unmappable,
    choose,
    named_paths,
    sandbox_arguments,
)

# Passed to the remote compile so it behaves as the local one would.
PASSED_ENVIRONMENT = ("LANG", "LC_ALL", "LC_MESSAGES", "LC_CTYPE", "SOURCE_DATE_EPOCH")
REMOTE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Layout:
    spec: ActionSpec
    paths: PathMap
    workdir: str  # the sandbox's working directory (absolute)

    def local_output(self, path: str) -> str:
        """Where an output the action names (relative to its working
        directory) goes here."""
        return self.paths.local(os.path.normpath(os.path.join(self.workdir, path)))


def passed_environment(env: Mapping[str, str]) -> dict[str, str]:
    """What of the client's environment reaches the remote compile."""
    return {name: env[name] for name in PASSED_ENVIRONMENT if name in env}


def lay_out(
    compile: Compile,
    inputs: Inputs,
    digests: DigestCache,
    manifests: Manifests,
    roots: Roots | None,
) -> Layout:
    """Raises Unmappable (a stats reason) when no input tree holds the
    compile, PreprocessHere when only its preprocessed text can go."""
    cwd = compile.cwd
    generated = {os.path.normpath(path): data for path, data in inputs.generated.items()}
    named = named_paths(inputs.arguments)
    relative = [*named.relative, *(path for path in inputs.outputs if not os.path.isabs(path))]
    paths = choose(cwd, roots, relative, [*inputs.read, *generated], compile.provided)
    files: dict[str, tuple[Digest, bool]] = {}
    system: list[str] = []
    sent: list[tuple[str, FileInfo]] = []
    for path in inputs.read:
        place = paths.place(path)
        if place is None:
            system.append(path)
            continue
        info = digests.info(path, digest_status(inputs.statuses.get(path)))
        files[_in_tree(place)] = (info.digest, False)
        sent.append((path, info))
    contents = {}
    # Directories that must be there though nothing is read from them: the
    # include directories (gcc warns of a missing one, with -Wmissing-include-dirs)
    # and those a path climbs out of (`..`: the kernel walks through them).
    directories = []
    for directory in [*(_local(cwd, d) for d in named.includes), *named.climbed(cwd)]:
        place = paths.place(directory)
        if place is not None and os.path.isdir(directory):
            directories.append(_in_tree(place))
    for path, data in generated.items():
        place = paths.place(path)
        if place is None:
            raise Unmappable("generated-in-provided-directory")
        contents[_in_tree(place)] = data
    _check_probes(inputs, paths)
    _check_once(sent, inputs)
    if any(info.uses_timestamp for _, info in sent):
        raise PreprocessHere("timestamp-macro")
    # The paths the compiler may write into the object (debug info, __FILE__).
    used = [cwd, *inputs.read, *generated, *(_local(cwd, o) for o in inputs.outputs)]
    arguments = sandbox_arguments(inputs.arguments, paths, used)
    ours: list[str] = []
    if compile.debug:
        ours += paths.prefix_maps(DEBUG_MAPS, inputs.arguments, used)
    expanded = _file_names(compile, inputs, sent, system, digests)
    if expanded:
        ours += paths.prefix_maps(MACRO_MAPS, inputs.arguments, expanded)
    workdir = paths.remote(cwd)
    if not workdir.startswith(f"{SANDBOX_ROOT}/"):
        raise Unmappable("working-directory-provided")
    outputs = [os.path.relpath(paths.remote(_local(cwd, o)), workdir) for o in inputs.outputs]
    # (A path absent here in the project or elsewhere is absent in the sandbox
    # too: only what the worker provides can hold what it should not.)
    absent = paths.provided_only(inputs.absent)
    contents[MANIFEST] = manifests.manifest(compile.compiler, system, absent, inputs.statuses)
    dated = any(info.uses_date_time for _, info in sent)
    spec = ActionSpec(
        # Ours first: gcc tries the last map given first, and the user's decide.
        arguments=[compile.compiler, *ours, *arguments],
        files=files,
        contents=contents,
        workdir=_in_tree(workdir),
        outputs=outputs,
        environment={
            "PATH": REMOTE_PATH,
            MANIFEST_VARIABLE: MANIFEST,
            **passed_environment(compile.env),
        },
        # __DATE__ and __TIME__ change every build unless SOURCE_DATE_EPOCH pins them.
        do_not_cache=dated and "SOURCE_DATE_EPOCH" not in compile.env,
        directories=directories,
    )
    return Layout(spec, paths, workdir)


def _local(cwd: str, path: str) -> str:
    return os.path.normpath(os.path.join(cwd, path))


def _in_tree(place: str) -> str:
    """A sandbox path as a path in the input tree."""
    return place[len(SANDBOX_ROOT) + 1 :]


def _check_probes(inputs: Inputs, paths: PathMap) -> None:
    """Each probe that found a file here must find it in the sandbox: not
    so when its name climbs (`..`) from one place into another."""
    for directory, name, found in inputs.probes:
        if directory == "/":
            continue
        there = os.path.normpath(os.path.join(paths.remote(directory), name))
        if paths.remote(found) != there:
            raise PreprocessHere("probe-across-places")


def _check_once(sent: list[tuple[str, FileInfo]], inputs: Inputs) -> None:
    """Copies of one content that gcc may take for one file (`#pragma once`)
    here only when their mtimes match: in the sandbox they always do."""
    by_digest: dict[Digest, list[str]] = {}
    for path, info in sent:
        if info.once:
            by_digest.setdefault(info.digest, []).append(path)
    for copies in by_digest.values():
        if len(copies) > 1:
            mtimes = {_mtime(path, inputs) for path in copies}
            if len(mtimes) > 1:
                raise PreprocessHere("once-only-copies")


def _mtime(path: str, inputs: Inputs) -> int:
    status = inputs.statuses.get(path)
    return status[1] if status is not None else os.stat(path).st_mtime_ns


def _file_names(
    compile: Compile,
    inputs: Inputs,
    sent: list[tuple[str, FileInfo]],
    system: list[str],
    digests: DigestCache,
) -> frozenset[str]:
    """The paths __FILE__ (or its kin) may expand to that the sandbox names
    otherwise: as the input mode found, or judged from the text of every file
    read (a system header's macro, assert's, expands in the file that uses
    it) and the -D options: then any file sent that has code (one of
    directives only, a generated config.h, expands nothing into the object)."""
    if inputs.file_names is not None:
        return inputs.file_names
    if not (compile.names_outside or inputs.named_absolutely):
        return frozenset()
    everything = frozenset(path for path, info in sent if info.has_code)
    words = ("__FILE__", "__BASE_FILE__", "__builtin_FILE", "__builtin_source_location")
    if any(word in argument for argument in inputs.arguments for word in words):
        return everything
    if any(info.uses_file_name for _, info in sent):
        return everything
    statuses = inputs.statuses
    for path in system:
        try:
            if digests.info(path, digest_status(statuses.get(path))).uses_file_name:
                return everything
        except OSError:
            return everything
    return frozenset()
