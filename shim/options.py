"""The compiler options the shim knows, as one sorted table.

Each entry is an option name and what it means to us. An option is either
exact (`-c`) or a prefix that carries its value joined (`-I/usr/include`,
`-DNAME=1`, `-O2`); a `SEPARATE` option may also take its value as the next
argument (`-I include`, `-o out.o`). Options in no entry fall to the families
at the bottom (`-W...`, `-f...`, `-m...`), and anything still unknown keeps
the compile local: we never send what we do not understand.

Coverage and profile generation stay local: the object embeds the absolute path
its .gcda file will be written to, which a remote compile would get wrong.

Kinds, combined as flags:
    SEPARATE   the value may be the next argument
    PATH       the value is a file or directory the compile reads or writes
    CPP        the option changes preprocessing (input discovery must see it)
    LOCAL      the compile must run locally; the entry's `reason` says why
    DEPS       a dependency-file option (-MD and friends)
    OUTPUT     the option names an output
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field


class Kind(enum.Flag):
    NONE = 0
    SEPARATE = enum.auto()
    PATH = enum.auto()
    CPP = enum.auto()
    LOCAL = enum.auto()
    DEPS = enum.auto()
    OUTPUT = enum.auto()


@dataclass(frozen=True)
class Option:
    name: str
    kind: Kind
    prefix: bool = False  # the value may be joined: -Ifoo, -O2
    reason: str = ""  # for LOCAL: the counter shown by `reapi-cc --stats`
    # The kind as plain booleans: every argument of every compile is checked
    # against them, and enum.Flag arithmetic costs about a microsecond a test.
    separate: bool = field(init=False)
    names_file: bool = field(init=False)  # PATH or DEPS: a file read or written
    preprocessor: bool = field(init=False)  # CPP
    local: bool = field(init=False)  # LOCAL
    dependencies: bool = field(init=False)  # DEPS

    def __post_init__(self) -> None:
        for name, flags in (
            ("separate", Kind.SEPARATE),
            ("names_file", Kind.PATH | Kind.DEPS),
            ("preprocessor", Kind.CPP),
            ("local", Kind.LOCAL),
            ("dependencies", Kind.DEPS),
        ):
            object.__setattr__(self, name, bool(self.kind & flags))


S, P, C, L, D, W = Kind.SEPARATE, Kind.PATH, Kind.CPP, Kind.LOCAL, Kind.DEPS, Kind.OUTPUT
N = Kind.NONE

# Sorted by name, each name once (a test keeps it so).
OPTIONS: tuple[Option, ...] = (
    Option("--coverage", L, reason="coverage"),
    Option("--param", S),
    Option("--sysroot", S | P | C, prefix=True),
    Option("-B", S | P | L, prefix=True, reason="tool-search-path"),
    Option("-D", S | C, prefix=True),
    Option("-E", L, reason="preprocess-only"),
    Option("-I", S | P | C, prefix=True),
    Option("-L", S | P, prefix=True),
    Option("-M", D | L, reason="dependencies-only"),
    Option("-MD", D),
    Option("-MF", S | P | D | W, prefix=True),
    Option("-MG", D | L, reason="missing-headers-allowed"),
    Option("-MM", D | L, reason="dependencies-only"),
    Option("-MMD", D),
    Option("-MP", D),
    Option("-MQ", S | D, prefix=True),
    Option("-MT", S | D, prefix=True),
    Option("-O", N, prefix=True),
    Option("-S", N),
    Option("-U", S | C, prefix=True),
    Option("-Wa,", N, prefix=True),
    Option("-Wl,", N, prefix=True),
    Option("-Wp,", N, prefix=True),  # only -Wp,-MD,file and -Wp,-MMD,file are accepted
    Option("-Xassembler", S),
    Option("-Xlinker", S),
    Option("-Xpreprocessor", S | L, reason="preprocessor-passthrough"),
    Option("-ansi", C),
    Option("-c", N),
    Option("-dumpmachine", L, reason="query"),
    Option("-dumpversion", L, reason="query"),
    Option("-fdump-", L, prefix=True, reason="dump-files"),
    Option("-fplugin", L, prefix=True, reason="compiler-plugin"),
    Option("-fprofile-arcs", L, reason="coverage"),
    Option("-fprofile-generate", L, prefix=True, reason="profile-generate"),
    Option("-fprofile-use", L, prefix=True, reason="profile-use"),
    Option("-ftest-coverage", L, reason="coverage"),
    Option("-g", N, prefix=True),
    Option("-idirafter", S | P | C, prefix=True),
    Option("-imacros", S | P | C, prefix=True),
    Option("-include", S | P | C, prefix=True),
    Option("-iprefix", S | P | C, prefix=True),
    Option("-iquote", S | P | C, prefix=True),
    Option("-isysroot", S | P | C, prefix=True),
    Option("-isystem", S | P | C, prefix=True),
    Option("-iwithprefix", S | P | C, prefix=True),
    Option("-iwithprefixbefore", S | P | C, prefix=True),
    Option("-l", S, prefix=True),
    Option("-nostdinc", C),
    Option("-nostdinc++", C),
    Option("-o", S | P | W, prefix=True),
    Option("-pedantic", N),
    Option("-pedantic-errors", N),
    Option("-pipe", N),
    Option("-print-", L, prefix=True, reason="query"),
    Option("-pthread", C),
    Option("-save-temps", L, prefix=True, reason="save-temps"),
    Option("-specs", S | L, prefix=True, reason="specs-file"),
    Option("-std=", C, prefix=True),
    Option("-undef", C),
    Option("-v", L, reason="verbose"),
    Option("-w", N),
    Option("-wrapper", S | L, reason="wrapper"),
    Option("-x", S, prefix=True),
)

# Families of harmless options by prefix, checked after the table.
FAMILIES = ("-W", "-f", "-m", "-O", "-g")
# Machine options that mean "this machine": the object depends on where it compiles.
NATIVE = ("-march=native", "-mtune=native", "-mcpu=native")


@functools.lru_cache(maxsize=8192)  # a build repeats the same few hundred arguments
def lookup(argument: str) -> tuple[Option | None, str | None]:
    """The table entry `argument` starts with, and its joined value (None
    when the option stands alone). The longest matching name wins, so
    `-MMD` is not read as `-M` with value `MD`."""
    best: Option | None = None
    for option in OPTIONS:
        matches = argument == option.name or (option.prefix and argument.startswith(option.name))
        if matches and (best is None or len(option.name) > len(best.name)):
            best = option
    if best is None:
        return None, None
    value = argument[len(best.name) :]
    if best.prefix and value.startswith("=") and best.name.startswith("--"):
        value = value[1:]
    return best, value or None
