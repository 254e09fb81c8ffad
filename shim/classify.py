"""Deciding what to do with one compiler invocation, without any I/O.

`classify(arguments)` takes the compiler's arguments (after response files are
expanded) and answers either `RemoteCompile`, a single-source compile (`-c`
or `-S`) the backend can run, with everything the shim needs to know about
its outputs, or `Local(reason)`: run the real compiler here. Every reason is a
short key that `reapi-cc --stats` counts.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from shim.options import FAMILIES, NATIVE, lookup

# Source languages we compile remotely, by extension (as gcc infers them).
LANGUAGES = {
    ".c": "c",
    ".i": "cpp-output",
    ".cc": "c++",
    ".cp": "c++",
    ".cxx": "c++",
    ".cpp": "c++",
    ".c++": "c++",
    ".C": "c++",
    ".ii": "c++-cpp-output",
    ".s": "assembler",
    ".S": "assembler-with-cpp",
    ".sx": "assembler-with-cpp",
}
REMOTE_LANGUAGES = frozenset(LANGUAGES.values())

ReadFile = Callable[[str], "str | None"]
# Environment variables that change what gcc does: their presence keeps a compile local.
COMPILER_ENVIRONMENT = (
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
    "OBJC_INCLUDE_PATH",
    "DEPENDENCIES_OUTPUT",
    "SUNPRO_DEPENDENCIES",
    "GCC_EXEC_PREFIX",
    "COMPILER_PATH",
)


@dataclass(frozen=True)
class Local:
    reason: str


@dataclass(frozen=True)
class RemoteCompile:
    arguments: tuple[str, ...]  # as given, without the compiler
    source: str
    language: str
    output: str  # the object (or assembly, with -S)
    # Dependency file written as a side effect (-MD/-MMD, or -Wp,-MD,file), if any.
    dependency_file: str | None = None
    # Other files the compile writes: .dwo (-gsplit-dwarf).
    extra_outputs: tuple[str, ...] = ()
    # The arguments that shape preprocessing, for input discovery to repeat.
    preprocessor_arguments: tuple[str, ...] = ()


Decision = RemoteCompile | Local


def _with_suffix(path: str, suffix: str) -> str:
    return os.path.splitext(path)[0] + suffix


def classify(arguments: Sequence[str], env: Mapping[str, str] | None = None) -> Decision:
    """What to do with `COMPILER arguments...`, run with environment `env`."""
    decision = _classify_arguments(arguments)
    if isinstance(decision, Local):
        return decision
    if env and any(name in env for name in COMPILER_ENVIRONMENT):
        return Local("compiler-environment")
    return decision


def _classify_arguments(arguments: Sequence[str]) -> Decision:
    sources: list[str] = []
    output: str | None = None
    language: str | None = None
    compile_only = assemble_only = wants_deps = split_dwarf = False
    dep_file: str | None = None
    wp_dep_file: str | None = None
    cpp: list[str] = []
    unknown = False  # an option we do not know: the compile stays local, and a link is a link
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if argument == "-":
            return Local("stdin-source")
        if not argument.startswith("-"):
            if argument.startswith("@"):
                return Local("response-file")
            sources.append(argument)
            continue
        if argument in NATIVE:
            return Local("native-arch")
        option, value = lookup(argument)
        if option is None:
            unknown = unknown or not argument.startswith(FAMILIES)
            continue
        if option.local:
            return Local(option.reason)
        taken = [argument]
        if option.separate and value is None:
            if index >= len(arguments):
                return Local("missing-option-value")
            value = arguments[index]
            taken.append(value)
            index += 1
        name = option.name
        if name == "-c":
            compile_only = True
        elif name == "-S":
            assemble_only = True
        elif name == "-o":
            output = value
        elif name == "-x":
            language = value
        elif name in ("-MD", "-MMD"):
            wants_deps = True
        elif name == "-MF":
            dep_file = value
        elif name == "-g" and value == "split-dwarf":
            split_dwarf = True
        elif name == "-Wp,":
            # The kernel's `-Wp,-MD,file`: a dependency file; other passthroughs are too hard.
            parts = (value or "").split(",")
            if len(parts) == 2 and parts[0] in ("-MD", "-MMD"):
                wp_dep_file = parts[1]
            else:
                return Local("preprocessor-passthrough")
        if option.preprocessor:
            cpp.extend(taken)
    if not (compile_only or assemble_only):
        # A link with a link-only option (CMake's -rdynamic) is a link; a query is not.
        return Local("link" if sources or not unknown else "unknown-option")
    if unknown:
        return Local("unknown-option")
    if not sources:
        return Local("no-source")
    if len(sources) > 1:
        return Local("multiple-sources")
    source = sources[0]
    detected = language or LANGUAGES.get(os.path.splitext(source)[1])
    if detected not in REMOTE_LANGUAGES:
        return Local("unsupported-language")
    if output is None:
        output = _with_suffix(os.path.basename(source), ".s" if assemble_only else ".o")
    dependency = (dep_file or _with_suffix(output, ".d")) if wants_deps else wp_dep_file
    extra = []
    if split_dwarf and not assemble_only:
        extra.append(_with_suffix(output, ".dwo"))
    return RemoteCompile(
        arguments=tuple(arguments),
        source=source,
        language=detected,
        output=output,
        dependency_file=dependency,
        extra_outputs=tuple(extra),
        preprocessor_arguments=tuple(cpp),
    )


def expand_response_files(arguments: Sequence[str], read: ReadFile, depth: int = 0) -> list[str]:
    """Replace each `@file` by the arguments in the file (recursively, as gcc
    does), using `read(path) -> text or None`. A file that cannot be read
    stays `@file`, which classify() then keeps local."""
    expanded: list[str] = []
    for argument in arguments:
        if argument.startswith("@") and len(argument) > 1 and depth < 10:
            text = read(argument[1:])
            if text is not None:
                expanded.extend(expand_response_files(shlex.split(text), read, depth + 1))
                continue
        expanded.append(argument)
    return expanded


def compile_only_arguments(arguments: Sequence[str]) -> list[str]:
    """`arguments` without what only preprocessing needs (include paths,
    macros, dependency files), without the language and without the source:
    what compiling an already preprocessed file takes."""
    kept: list[str] = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if not argument.startswith("-"):
            continue  # the source
        option, value = lookup(argument)
        separate = option is not None and option.separate and value is None
        dropped = option is not None and (
            option.preprocessor or option.dependencies or option.name in ("-x", "-Wp,")
        )
        if dropped and option is not None and option.name in ("-std=", "-ansi"):
            dropped = False  # the language dialect matters to the compiler proper too
        if dropped:
            index += 1 if separate else 0
            continue
        kept.append(argument)
        if separate and index < len(arguments):
            kept.append(arguments[index])
            index += 1
    return kept
