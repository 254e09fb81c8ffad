"""Writing a compile's outputs where the local compiler would have written them."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path


def write_outputs(files: Mapping[str, tuple[bytes, bool]]) -> None:
    """Write each file (absolute path -> bytes, executable), atomically: make
    never sees half an object. (A rebuild from the cache writes hundreds a
    second: the fewest system calls, and a directory made only if missing.)"""
    for path, (data, executable) in files.items():
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.reapi-{os.getpid()}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        mode = 0o777 if executable else 0o666  # less the umask, as the compiler's
        try:
            fd = os.open(tmp, flags, mode)
        except FileNotFoundError:
            Path(directory).mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, mode)
        try:
            with os.fdopen(fd, "wb", closefd=True) as file:
                file.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# gcc's dependency writer (libcpp/mkdeps.cc) breaks a rule's line before a
# name that would pass this column.
GCC_DEPENDENCY_COLUMNS = 72
_NAME = re.compile(rb"(?:\\.|[^\s\\])+")


def reflow_dependencies(text: bytes) -> bytes:
    """A dependency file in gcc's layout, its lines broken again where gcc
    would break them: the sandbox's names are shorter or longer than the
    local ones put back, and gcc breaks lines by length. Text not in gcc's
    layout (another compiler's) is left as it is."""
    if b" \\\n  " in text:  # gcc indents a continued line by one space
        return text
    lines = text.replace(b" \\\n", b" ").split(b"\n")
    if not lines or b":" not in lines[0]:
        return text
    flowed = [_flow(lines[0])]
    for line in lines[1:]:
        if line and not line.endswith(b":"):  # only -MP's `name:` lines follow a rule
            return text
        flowed.append(line)
    return b"\n".join(flowed)


def _flow(rule: bytes) -> bytes:
    """One `targets: names` rule as gcc writes it."""
    targets, colon, names = rule.partition(b": ")
    if not colon:
        targets, names = rule.rstrip(b":"), b""
    words = _NAME.findall if b"\\" in rule else bytes.split
    out = bytearray()
    column = 0
    for name in words(targets):
        column = _write(out, name, column)
    out += b":"
    column += 1
    for name in words(names):
        column = _write(out, name, column)
    return bytes(out)


def _write(out: bytearray, name: bytes, column: int) -> int:
    if column:
        if column + len(name) > GCC_DEPENDENCY_COLUMNS:
            out += b" \\\n"
            column = 0
        column += 1
        out += b" "
    out += name
    return column + len(name)
