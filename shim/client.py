"""`reapi-cc`: the gcc-compatible front end that make builds call.

    reapi-cc COMPILER ARGS...      e.g. make CC="reapi-cc gcc"
    COMPILER ARGS...               through a symlink named like the compiler

This is the shim's local path, the one every compile takes when it cannot (or
may not) go remote: run the real compiler here, with the same arguments,
standard streams and exit status, so a build never breaks because of us.
Cache lookups and remote compiles come in front of it (issue 4).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = 'usage: reapi-cc COMPILER [ARGS...]  (e.g. make CC="reapi-cc gcc")'


def find_compiler(name: str, exclude: Path | None) -> str | None:
    """The compiler called `name`: a path as given, else the first one on PATH
    that is not this program (a masquerade symlink must not find itself)."""
    if os.sep in name:
        return name
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which(name, path=directory or ".")
        if candidate is None:
            continue
        if exclude is not None and Path(candidate).resolve() == exclude:
            continue
        return candidate
    return None


def compiler_command(argv: Sequence[str]) -> list[str] | str:
    """The command to run for `argv` (as sys.argv), or a one-line error."""
    me = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    invoked = Path(argv[0]).name if argv else "reapi-cc"
    if invoked.startswith("reapi-cc"):
        args = list(argv[1:])
        if not args or args[0].startswith("-"):
            return USAGE
        name, rest = args[0], args[1:]
    else:  # masquerading as the compiler itself
        name, rest = invoked, list(argv[1:])
    compiler = find_compiler(name, exclude=me)
    if compiler is None:
        return f"reapi-cc: compiler {name!r} not found on PATH"
    return [compiler, *rest]


def main(argv: Sequence[str] | None = None) -> int:
    command = compiler_command(sys.argv if argv is None else argv)
    if isinstance(command, str):
        print(command, file=sys.stderr)
        return 2
    # exec: the compiler inherits our pid, streams, signals and exit status.
    os.execv(command[0], command)
    return 127  # not reached
