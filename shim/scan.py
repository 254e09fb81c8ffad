"""`scan` mode: finding a compile's inputs without running the preprocessor.

This is distcc's pump idea with our own guards. The agent reads `#include`
directives itself and resolves them against the compiler's real search path,
taking every branch of every `#if` (so it finds a superset of what the
compile reads). What it learns is kept across compiles: the directives of a
file (until the file changes) and the search path of a set of options (until
a directory the compiler skipped appears), so a header included by hundreds
of sources is read about once. And for each header, the closure it leads to
(every file, with the facts that decided it) is taken whole by the next
compile that reaches it, while those facts hold.

Where the scanner cannot be certain it gives up with a reason, and the agent
uses `deps` mode for that compile: computed includes (`#include MACRO`),
`#embed`, `-I-`, raw strings that could hide a directive (gcc reads them in
C++ and GNU C, not in strict C), and anything else it does not model.

The search path is the compiler's own: `COMPILER -E -v` prints it after its
own rules (duplicates dropped, a `-I` naming a system directory ignored,
missing directories skipped). Lookups follow gcc's manual:
- `#include "f"`: the including file's directory, the `-iquote` directories,
  then the `<f>` chain;
- `#include <f>`: `-I`, `-isystem`, the system directories, `-idirafter`;
- `#include_next`: the chain after the directory the current file came from;
- `-include f` / `-imacros f`: the working directory, then the `"f"` chain;
- `__has_include(...)` is treated as an include, so its answer is the same
  wherever the compile runs (Scanner.probes finds the probes of a list of
  files, for `deps` mode: `gcc -M` lists only the files a compile reads).
  A quoted or `_next` probe inside a `#define` is looked up where the macro
  is expanded, which this scanner does not follow: uncertain.
Every place a lookup tried and found nothing is reported as absent: the
places tried before the one it found (a worker with a file there would read
that one instead: another version of a library in /usr/local/include, say),
and all of them for a name found nowhere. A worker must not have any of them
in its system directories (see reapi.core.conventions).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from reapi.core.watch import StatKey, Watcher, list_files, stat_key
from shim.inputs import InputsUnknown, lexical_is_physical, run_preprocessor
from shim.options import lookup

__all__ = ["StatKey", "stat_key"]  # shared with shim.memo and shim.agent

# Options that shape the include search path, passed to `COMPILER -E -v`.
SEARCH_OPTIONS = frozenset(
    (
        "--sysroot",
        "-I",
        "-idirafter",
        "-iprefix",
        "-iquote",
        "-isysroot",
        "-isystem",
        "-iwithprefix",
        "-iwithprefixbefore",
        "-nostdinc",
        "-nostdinc++",
    )
)
# Files gcc reads before the source without being asked (glibc's predefines).
IMPLICIT_INCLUDES = ("stdc-predef.h",)
# A file changed less than this long ago may change again within the same
# timestamp: its parse is not kept.
RACY_NS = 2_000_000_000

# Comments, and the literals that may contain comment-like text.
_COMMENT_OR_LITERAL = re.compile(
    rb"""//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'""", re.DOTALL
)
_DIRECTIVE = re.compile(
    rb"^[ \t]*(?:#|%:)[ \t]*(include_next|include|import|embed)\b[ \t]*(.*)$", re.MULTILINE
)
# A raw string literal's start (C++, and C in GNU modes): R"DELIM( with an
# optional encoding prefix, not part of a longer name.
_RAW_STRING = re.compile(rb'(?<![A-Za-z0-9_])(?:u8|[uUL])?R"([^()\\ \t\v\f\n]{0,16})\(')
# A raw string holding any of these, or left open, may hide a directive or show
# one in one reading and not in the other: raw, or (strict C) a name followed
# by an ordinary string.
_RAW_STRING_RISKS = (b"\n", b'"', b"'", b"/*", b"//", b"\\")
# Trigraphs (read in strict C modes, or with -trigraphs) that could make or hide
# a directive: ??= starting a line (#), ??/ (a backslash) splicing lines or
# escaping a quote. The others, and ??/ elsewhere, read the same either way.
_RISKY_TRIGRAPH = re.compile(rb"^[ \t]*\?\?=|\?\?/[ \t\v\f\r]*\n|\?\?/[\"']", re.MULTILINE)
# A backslash, blanks, then the line's end: a line splice to gcc.
_SPLICE = re.compile(rb"\\[ \t\v\f\r]*\n")
_MACRO = re.compile(rb"([A-Za-z_]\w*)\s*$")
_DEFINE = re.compile(rb"^[ \t]*(?:#|%:)[ \t]*define[ \t]+([A-Za-z_]\w*)", re.MULTILINE)
_HAS_INCLUDE = re.compile(rb"__has_include(_next)?\s*\(\s*(.?)")
_DEFINE_LINE = re.compile(rb"[ \t]*(?:#|%:)[ \t]*define\b")


def _without_comment(match: re.Match[bytes]) -> bytes:
    """A comment becomes the line breaks it held (a space if none): whatever
    follows it may then start a line, so a directive is never missed."""
    text = match.group()
    if not text.startswith(b"/"):
        return text
    return b"\n" * text.count(b"\n") or b" "


class ScanUncertain(InputsUnknown):
    """The scanner cannot be sure of the inputs; the message is the reason."""


@dataclass(frozen=True)
class Include:
    name: str  # the file name, or the macro of a computed include
    angle: bool  # <name> rather than "name"
    next: bool = False  # #include_next
    macro: bool = False  # `#include NAME`: resolved from -D options, if at all
    probe: bool = False  # `__has_include(...)`: looked up, not read


@dataclass(frozen=True)
class Parsed:
    includes: tuple[Include, ...]
    defines: frozenset[str]  # macros the file #defines


@dataclass(frozen=True)
class SearchPath:
    """gcc's directory chain: the "..." directories, then the <...> ones."""

    quote: tuple[str, ...]
    bracket: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # directories that did not exist when asked

    @property
    def chain(self) -> tuple[str, ...]:
        return self.quote + self.bracket


# (directory, file name, whether the directory held it): one fact a lookup relied on.
Probe = tuple[str, str, bool]
# The facts of one directory: (the names it held, the names it lacked).
Names = tuple[frozenset[str], frozenset[str]]
# The facts of many lookups, one entry per directory.
Seen = frozenset[tuple[str, Names]]


def _by_directory(
    probes: Iterable[Probe], more: Iterable[dict[str, Names]] = ()
) -> dict[str, Names]:
    """Facts gathered by directory: the probes', and those of `more`. A
    directory only one of `more` knows keeps its entry (closures nest: most
    of a closure's facts are one part's)."""
    found: dict[str, list[Names]] = {}
    held: dict[str, set[str]] = {}
    lacked: dict[str, set[str]] = {}
    for directory, name, present in probes:
        (held if present else lacked).setdefault(directory, set()).add(name)
    for directory in held.keys() | lacked.keys():
        found[directory] = [
            (frozenset(held.get(directory, ())), frozenset(lacked.get(directory, ())))
        ]
    for facts in more:
        for directory, names in facts.items():
            entries = found.setdefault(directory, [])
            if names not in entries:
                entries.append(names)
    return {directory: _union(entries) for directory, entries in found.items()}


def _union(entries: list[Names]) -> Names:
    if len(entries) == 1:
        return entries[0]
    return (
        frozenset().union(*(held for held, _ in entries)),
        frozenset().union(*(lacked for _, lacked in entries)),
    )


@dataclass
class ScanResult:
    files: list[str] = field(default_factory=list)  # absolute paths, in order found
    absent: list[str] = field(default_factory=list)  # paths that must not exist
    seen: Seen = frozenset()  # every fact the lookups relied on
    statuses: dict[str, StatKey] = field(default_factory=dict)  # each file's, when read
    read: Collection[tuple[str, StatKey]] = ()  # the same, as (path, status) pairs
    newest: int = 0  # the latest mtime or ctime (ns) among them


@dataclass
class Probed:
    """The answers of a compile's `__has_include` probes."""

    # (directory searched, name, path found) of each probe that found a file
    found: list[tuple[str, str, str]] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # every place tried that held nothing


def parse_includes(data: bytes) -> Parsed:
    """The include directives (and `__has_include` names) in a file's text, and
    the macros it defines. `#include NAME` is kept as a macro include; any other
    computed include, and `#embed`, raise ScanUncertain."""
    if b'R"' in data:
        _check_raw_strings(data)
    if b"??" in data and _RISKY_TRIGRAPH.search(data):
        raise ScanUncertain("scan-trigraph")
    text = data.replace(b"\\\n", b"")
    if b"\\ " in text or b"\\\t" in text or b"\\\r" in text:
        text = _SPLICE.sub(b"", text)  # gcc splices lines there too (with a warning)
    if b"/" in text:
        text = _COMMENT_OR_LITERAL.sub(_without_comment, text)
    found: list[Include] = []
    for match in _DIRECTIVE.finditer(text):
        keyword, rest = match.group(1), match.group(2)
        if keyword == b"embed":
            raise ScanUncertain("scan-embed")
        include = _delimited(rest, keyword == b"include_next")
        if include is None and (macro := _MACRO.match(rest)):
            include = Include(macro.group(1).decode(), angle=False, macro=True)
        if include is None:
            raise ScanUncertain("scan-computed-include")
        found.append(include)
    defines = frozenset(m.group(1).decode() for m in _DEFINE.finditer(text))
    if b"__has_include" in text:
        for match in _HAS_INCLUDE.finditer(text):
            rest = text[match.start(2) :]
            include = _delimited(rest, match.group(1) is not None, probe=True)
            if include is None:
                raise ScanUncertain("scan-computed-include")
            if (include.next or not include.angle) and _in_define(text, match.start()):
                raise ScanUncertain("scan-probe-in-macro")
            found.append(include)
    return Parsed(tuple(found), defines)


def _check_raw_strings(data: bytes) -> None:
    """Raise ScanUncertain for a raw string that could hide a directive or
    show one, in one reading and not the other: one that spans lines, or
    holds quotes, comment starts or backslashes (gcc reads raw strings in
    C++ and GNU C, not in strict C; this parser has no raw strings)."""
    for match in _RAW_STRING.finditer(data):
        end = data.find(b")" + match.group(1) + b'"', match.end())
        if end < 0 or any(risk in data[match.end() : end] for risk in _RAW_STRING_RISKS):
            raise ScanUncertain("scan-raw-string")


def _in_define(text: bytes, position: int) -> bool:
    """Whether `position` lies on a #define line (lines already spliced)."""
    start = text.rfind(b"\n", 0, position) + 1
    return _DEFINE_LINE.match(text, start) is not None


def _delimited(rest: bytes, next_: bool, probe: bool = False) -> Include | None:
    """`"name"` or `<name>` at the start of `rest`, or None."""
    if rest[:1] == b'"':
        end = rest.find(b'"', 1)
    elif rest[:1] == b"<":
        end = rest.find(b">", 1)
    else:
        return None
    if end <= 1:
        return None
    name = rest[1:end].decode("utf-8", "surrogateescape")
    return Include(name, angle=rest[:1] == b"<", next=next_, probe=probe)


@dataclass(frozen=True)
class SearchArguments:
    search: tuple[str, ...]  # options that shape the search path, in order
    forced: tuple[str, ...]  # files named by -include / -imacros
    defines: dict[str, str]  # -D NAME=VALUE as given (later ones win; -U removes)


def search_arguments(arguments: Sequence[str]) -> SearchArguments:
    """What the scan needs from a compile's arguments. Machine options go into
    `search` (they pick multilib directories). Raises ScanUncertain for `-I-`."""
    search: list[str] = []
    forced: list[str] = []
    defines: dict[str, str] = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if argument == "-I-":
            raise ScanUncertain("scan-split-include-path")
        if argument.startswith("-m"):
            search.append(argument)
            continue
        option, value = lookup(argument)
        if option is None or option.name not in (*SEARCH_OPTIONS, *_SCAN_OPTIONS):
            continue
        taken = [argument]
        if value is None and option.name not in ("-nostdinc", "-nostdinc++"):
            value = arguments[index] if index < len(arguments) else ""
            taken.append(value)
            index += 1
        if option.name in ("-include", "-imacros"):
            forced.append(value or "")
        elif option.name == "-D":
            name, _, definition = (value or "").partition("=")
            defines[name] = definition or "1"
        elif option.name == "-U":
            defines.pop(value or "", None)
        else:
            search.extend(taken)
    return SearchArguments(tuple(search), tuple(forced), defines)


_SCAN_OPTIONS = ("-include", "-imacros", "-D", "-U")


_SKIPPED = re.compile(r'^ignoring nonexistent directory "(.*)"$')


def parse_search_list(text: str, cwd: str) -> SearchPath:
    """The chain printed by `COMPILER -E -v` (on stderr)."""
    quote: list[str] = []
    bracket: list[str] = []
    skipped: list[str] = []
    target: list[str] | None = None
    for line in text.splitlines():
        if match := _SKIPPED.match(line):
            skipped.append(os.path.normpath(os.path.join(cwd, match.group(1))))
        elif line.startswith('#include "..." search starts here'):
            target = quote
        elif line.startswith("#include <...> search starts here"):
            target = bracket
        elif line.startswith("End of search list"):
            return SearchPath(tuple(quote), tuple(bracket), tuple(skipped))
        elif target is not None and line.startswith(" "):
            directory = os.path.join(cwd, line.strip().removesuffix(" (framework directory)"))
            if "/.." in directory and not lexical_is_physical(directory):
                raise ScanUncertain("scan-symlink-dotdot")
            target.append(os.path.normpath(directory))
    raise ScanUncertain("scan-search-path-unknown")


class Scanner:
    """Memoized include scanning; one per agent."""

    def __init__(self) -> None:
        # path -> (stat key, includes or the reason they are uncertain)
        self._parsed: dict[str, tuple[tuple[int, ...], Parsed | str]] = {}
        self._search: dict[tuple[str, ...], SearchPath] = {}
        self._lookups: dict[SearchPath, dict[tuple[str, int, str], _Lookup]] = {}
        self._closures: dict[SearchPath, dict[Node, _Closure]] = {}
        self._met: dict[SearchPath, set[Node]] = {}
        self.watcher = Watcher()
        self._listings = _Listings(self.watcher)
        self.files_parsed = 0  # for tests and benchmarks: how much work was done

    async def search_path(
        self,
        compiler: str,
        language: str,
        search: Sequence[str],
        cwd: str,
        env: Mapping[str, str],
    ) -> SearchPath:
        """The compiler's chain for these options, asked once (per version of
        the compiler's binary) and kept while every directory it skipped is
        still missing."""
        binary = os.stat(shutil.which(compiler) or compiler)
        key = (compiler, str(binary.st_mtime_ns), str(binary.st_ino), language, cwd, *search)
        known = self._search.get(key)
        if known is not None and not any(os.path.exists(d) for d in known.skipped):
            return known
        query = [compiler, *search, "-x", language, "-E", "-v", "-"]
        try:
            err = await run_preprocessor(query, cwd, env, stderr=True)
        except InputsUnknown:
            raise ScanUncertain("scan-search-path-unknown") from None
        found = self._search[key] = parse_search_list(err.decode(errors="replace"), cwd)
        return found

    def unchanged(self, files: Iterable[tuple[str, StatKey | None]], seen: Seen) -> bool:
        """Whether each file still has its status (None: still missing) and the
        directories still hold and lack what a scan saw."""
        self.watcher.refresh()
        status = self.watcher.status
        if not all(status(path) == key for path, key in files):
            return False
        return _DirectoryView(self._listings).matches(seen)

    def parse(self, path: str, key: StatKey | None = None) -> tuple[StatKey, Parsed]:
        """What the file at `path` (absolute) includes and defines, memoized,
        and the file's status before it was read (`key`, if taken already)."""
        key = key or stat_key(path)
        if key is None:
            raise FileNotFoundError(path)
        known = self._parsed.get(path)
        if known is None or known[0] != key:
            with open(path, "rb") as file:
                data = file.read()
            self.files_parsed += 1
            parsed: Parsed | str
            try:
                parsed = parse_includes(data)
            except ScanUncertain as uncertain:
                parsed = str(uncertain)
            known = (key, parsed)
            if time.time_ns() - key[1] > RACY_NS:
                self._parsed[path] = known
        if isinstance(known[1], str):
            raise ScanUncertain(known[1])
        return key, known[1]

    def probes(
        self,
        files: Iterable[tuple[str, StatKey | None]],
        search: SearchPath,
        arguments: SearchArguments,
    ) -> Probed:
        """What `files` (absolute paths, with their statuses when known) probe
        with `__has_include`, looked up as gcc does from each file. Raises
        ScanUncertain where that cannot be known from the text: a name built
        by macros, a quoted probe in a macro body, `__has_include_next` (its
        start depends on where the file was found), a probe in a -D option,
        a file with a probe that the parser gives up on."""
        if any("__has_include" in value for value in arguments.defines.values()):
            raise ScanUncertain("probe-in-option")
        view = _DirectoryView(self._listings)
        lookups = self._lookups.setdefault(search, {})
        chain = search.chain
        probed = Probed()
        for path, key in files:
            try:
                _, parsed = self.parse(path, key)
            except ScanUncertain:
                with open(path, "rb") as file:
                    if b"__has_include" in file.read():
                        raise ScanUncertain("probe-uncertain") from None
                continue
            for include in parsed.includes:
                if not include.probe:
                    continue
                if include.next:
                    raise ScanUncertain("probe-next")
                here = "" if include.angle else os.path.dirname(path)
                start = len(search.quote) if include.angle else 0
                cache_key = (include.name, start, here)
                lookup = lookups.get(cache_key)
                if lookup is None or not view.holds(lookup.probes):
                    lookup = lookups[cache_key] = _look_up(include.name, here, chain, start, view)
                probed.absent.extend(lookup.absent)
                if lookup.found is not None:
                    found, index = lookup.found
                    directory = "/" if index is None else here if index < 0 else chain[index]
                    probed.found.append((directory, include.name, found))
        return probed

    def scan(
        self, cwd: str, source: str, arguments: SearchArguments, search: SearchPath
    ) -> ScanResult:
        """Every file a compile of `source` (relative to `cwd`) may read.

        Each header the source includes leads to the same files in every
        compile: that closure is kept, and taken whole while its files and
        directories are unchanged, so a compile costs about a stat per file
        (none for those the watcher knows unchanged: reapi/core/watch.py).

        `#include NAME` follows NAME's definition on the command line (git's
        `-DSHA1DC_CUSTOM_INCLUDE_SHA1_C="cache.h"`). A NAME that no file read
        and no option defines cannot be included without an error (and a
        failed remote compile is rerun locally): it is skipped. A NAME some
        file #defines would need the preprocessor: ScanUncertain."""
        source_path = os.path.normpath(os.path.join(cwd, source))
        if not os.path.isfile(source_path):
            raise ScanUncertain("scan-source-missing")
        if len(self._closures.get(search, ())) > CLOSURES:
            del self._closures[search], self._met[search]
        self.watcher.refresh()
        return _Scan(self, search).run(source_path, cwd, arguments)


# A file, and where it was found: its index in the search chain, -1 beside its
# includer, None for the source and -include files.
Node = tuple[str, int | None]
# `#include NAME` in a file: (NAME, the file's directory, the file's index).
Macro = tuple[str, str, int | None]
# Closures kept per search path (each about 16 bytes per file it holds); beyond
# this many the table starts again.
CLOSURES = 4096
# Closures walked within one another at most (each a few Python frames deep).
MAX_NESTING = 64


@dataclass(frozen=True)
class _Closure:
    """Every file one file leads to, itself included, and all the facts that
    decided it: it holds while they do. Its macro includes are left to the
    compile (they follow its -D options)."""

    nodes: frozenset[Node]
    files: frozenset[tuple[str, StatKey]]  # each file and its status when read
    absent: frozenset[str]  # what its lookups sought and did not find
    facts: dict[str, Names]  # what its lookups found in each directory
    macros: frozenset[Macro]
    read: tuple[Parsed, ...]  # the files its walk read one by one
    parts: tuple[_Closure, ...]  # the closures its walk took whole
    newest: int  # its files' latest mtime or ctime (ns): too recent, it is not kept
    _defined: dict[str, bool] = field(default_factory=dict, compare=False)
    # The listing of each directory its facts were last checked against.
    checked: dict[str, frozenset[str]] = field(default_factory=dict, compare=False)

    def defines(self, name: str) -> bool:
        """Whether one of its files #defines `name`."""
        if name not in self._defined:
            self._defined[name] = any(name in parsed.defines for parsed in self.read) or any(
                part.defines(name) for part in self.parts
            )
        return self._defined[name]


@dataclass
class _Walk:
    """The files reached from some roots, and what reaching them relied on."""

    queue: list[Node] = field(default_factory=list)
    reached: set[Node] = field(default_factory=set)
    files: set[tuple[str, StatKey]] = field(default_factory=set)  # each file's status when read
    absent: set[str] = field(default_factory=set)
    used: dict[tuple[str, int, str], _Lookup] = field(default_factory=dict)
    read: list[Parsed] = field(default_factory=list)  # the files read one by one
    taken: list[_Closure] = field(default_factory=list)
    covered: set[Node] = field(default_factory=set)  # the nodes of the closures taken
    macros: set[Macro] = field(default_factory=set)  # not yet followed
    newest: int = 0  # the files' latest mtime or ctime (ns)

    def take(self, closure: _Closure) -> None:
        self.reached |= closure.nodes
        self.covered |= closure.nodes
        self.files |= closure.files
        self.absent |= closure.absent
        self.taken.append(closure)
        self.macros |= closure.macros
        self.newest = max(self.newest, closure.newest)

    def facts(self) -> dict[str, Names]:
        probes = (p for lookup in self.used.values() for p in lookup.probes)
        return _by_directory(probes, (closure.facts for closure in self.taken))


class _Scan:
    """One compile's scan: each lookup, file status and closure checked at most once."""

    def __init__(self, scanner: Scanner, search: SearchPath) -> None:
        self.scanner = scanner
        self.search = search
        self.lookups = scanner._lookups.setdefault(search, {})
        self.closures = scanner._closures.setdefault(search, {})
        self.met = scanner._met.setdefault(search, set())  # files read in some walk before
        self.walking: set[Node] = set()  # the closures being walked, outermost first
        self.view = _DirectoryView(scanner._listings)
        self.checked: dict[tuple[str, int, str], _Lookup] = {}
        self.statuses: dict[str, StatKey | None] = {}
        self.valid: dict[Node, _Closure] = {}
        # The files the closures checked so far relied on, found unchanged.
        self.files_held: set[tuple[str, StatKey]] = set()

    def run(self, source: str, cwd: str, arguments: SearchArguments) -> ScanResult:
        walk = _Walk()
        for name in IMPLICIT_INCLUDES:  # may be missing anywhere: never absent
            self.follow(Include(name, angle=True), "", None, walk, implicit=True)
        for name in arguments.forced:
            self.follow(Include(name, angle=False), cwd, None, walk)
        walk.reached.add((source, None))
        self.expand((source, None), walk)
        while walk.queue:
            while walk.queue:
                node = walk.queue.pop()
                if node not in walk.covered:  # else its closure is part of one taken
                    walk.take(self.closure(node))
            macros, walk.macros = walk.macros, set()
            for name, here, index in macros:
                definition = arguments.defines.get(name)
                if definition is not None:
                    named = _delimited(definition.encode(), next_=False)
                    if named is None:
                        raise ScanUncertain("scan-computed-include")
                    self.follow(named, here, index, walk)
                elif self.defined_in_a_file(name, walk):
                    raise ScanUncertain("scan-computed-include")
        statuses = dict(walk.files)
        seen = frozenset(walk.facts().items())
        return ScanResult(
            list(statuses), list(walk.absent), seen, statuses, walk.files, walk.newest
        )

    def defined_in_a_file(self, name: str, walk: _Walk) -> bool:
        if any(name in parsed.defines for parsed in walk.read):
            return True
        return any(closure.defines(name) for closure in walk.taken)

    def closure(self, node: Node) -> _Closure:
        found = self.kept(node)
        if found is None:
            found = self.valid[node] = self.walk_closure(node)
        return found

    def kept(self, node: Node) -> _Closure | None:
        """The closure kept for `node`, if it still holds."""
        found = self.valid.get(node)
        if found is None:
            found = self.closures.get(node)
            if found is None:
                return None
            status = self.status
            files = found.files - self.files_held  # most were in a closure checked before
            if not all(status(path) == key for path, key in files):
                return None
            self.files_held |= files
            if not self.still_holds(found):
                return None
            self.valid[node] = found
        return found

    def still_holds(self, closure: _Closure) -> bool:
        """Whether the directories still hold and lack what the closure's lookups
        saw: checked again only where a listing changed since the last time."""
        files = self.view.files
        checked = closure.checked
        for directory, (held, lacked) in closure.facts.items():
            listing = files(directory)
            if checked.get(directory) is not listing:
                if not (held <= listing and listing.isdisjoint(lacked)):
                    return False
                checked[directory] = listing
        return True

    def walk_closure(self, node: Node) -> _Closure:
        """Everything `node` leads to. On the way, the closures of files that
        are kept are taken whole, and a file met in an earlier walk gets its
        own closure (unless this walk is within its own)."""
        walk = _Walk(queue=[node], reached={node})
        self.walking.add(node)
        while walk.queue:
            current = walk.queue.pop()
            if current in walk.covered:
                continue
            found = self.kept(current) if current != node else None
            nested = current in self.met and current not in self.walking
            if found is None and nested and len(self.walking) < MAX_NESTING:
                found = self.closure(current)
            if found is not None:
                walk.take(found)
            else:
                self.expand(current, walk)
                self.met.add(current)
        self.walking.discard(node)
        closure = _Closure(
            frozenset(walk.reached),
            frozenset(walk.files),
            frozenset(walk.absent),
            walk.facts(),
            frozenset(walk.macros),
            tuple(walk.read),
            tuple(walk.taken),
            walk.newest,
        )
        if walk.newest < self.view.now - RACY_NS:  # else it may change unseen
            self.closures[node] = closure
        return closure

    def expand(self, node: Node, walk: _Walk) -> None:
        """Read `node`'s file into `walk` and follow its includes (its macro
        includes wait in walk.macros)."""
        path, index = node
        key, parsed = self.scanner.parse(path, self.status(path))
        walk.files.add((path, key))
        walk.read.append(parsed)
        walk.newest = max(walk.newest, key[1], key[2])
        here = os.path.dirname(path)
        for include in parsed.includes:
            if include.macro:
                walk.macros.add((include.name, here, index))
            else:
                self.follow(include, here, index, walk)

    def follow(
        self, include: Include, here: str, index: int | None, walk: _Walk, implicit: bool = False
    ) -> None:
        """Look `include` up from a file in `here`, found at `index` in the chain."""
        if include.next and index is not None:
            start, here = index + 1, ""  # found beside its includer (-1): the whole chain
        elif include.angle:
            start, here = len(self.search.quote), ""
        else:
            start = 0
        key = (include.name, start, here)
        lookup = self.checked.get(key)
        if lookup is None:
            lookup = self.lookups.get(key)
            if lookup is None or not self.view.holds(lookup.probes):
                lookup = _look_up(include.name, here, self.search.chain, start, self.view)
                self.lookups[key] = lookup
            self.checked[key] = lookup
        walk.used[key] = lookup
        if lookup.found is None:
            if not implicit:  # may be missing anywhere
                walk.absent.update(lookup.absent)
            return
        walk.absent.update(lookup.absent)  # where a file would have been read first
        if lookup.found not in walk.reached:
            walk.reached.add(lookup.found)
            walk.queue.append(lookup.found)

    def status(self, path: str) -> StatKey | None:
        if path not in self.statuses:
            self.statuses[path] = self.scanner.watcher.status(path)
        return self.statuses[path]


@dataclass(frozen=True)
class _Lookup:
    """Where one include name led, and the directory listings that decided it."""

    found: Node | None  # (path, index in the chain: -1 beside its includer)
    absent: tuple[str, ...]  # every place tried that held nothing: before the found one
    probes: tuple[Probe, ...]  # what each place tried held: the answer holds while they do


def _look_up(
    name: str, here: str, chain: Sequence[str], start: int, view: _DirectoryView
) -> _Lookup:
    """Search for `name` beside its includer (`here`, unless empty), then in
    `chain` from `start`."""
    places: list[tuple[int | None, str]]
    if os.path.isabs(name):
        # Found by its own path: an #include_next in it is a plain #include, as
        # in the source (gcc: no place in the chain to go on from).
        places = [(None, "/")]
    else:
        places = [(-1, here)] if here else []
        places += list(enumerate(chain))[start:]
    climbs = ".." in name.split("/")
    tried: list[str] = []
    probes: list[Probe] = []
    for index, directory in places:
        if climbs and not lexical_is_physical(os.path.join(directory, name)):
            # The kernel climbs from where a symbolic link leads, not where the
            # name seems to: this scanner reads names as text.
            raise ScanUncertain("scan-symlink-dotdot")
        path = os.path.normpath(os.path.join(directory, name))
        parent, base = os.path.split(path)
        present = base in view.files(parent)
        probes.append((parent, base, present))
        tried.append(path)
        if present:
            return _Lookup((path, index), tuple(tried[:-1]), tuple(probes))
    return _Lookup(None, tuple(tried), tuple(probes))


class _Listings:
    """The names of the files in each directory, kept across scans: the
    watcher's while it trusts the directory, else read again when the
    directory's mtime changes (or changed too recently to be trusted). One
    listing answers every lookup in its directory, where asking for each
    candidate path cost a system call each."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher
        self._known: dict[str, tuple[int | None, frozenset[str]]] = {}

    def files(self, directory: str, now: int) -> frozenset[str]:
        watched = self._watcher.listing(directory)
        if watched is not None:
            return watched
        try:
            mtime: int | None = os.stat(directory).st_mtime_ns
        except OSError:
            mtime = None
        known = self._known.get(directory)
        if known is not None and mtime is not None and known[0] == mtime and now - mtime >= RACY_NS:
            return known[1]
        files = list_files(directory) if mtime is not None else frozenset()
        self._known[directory] = (mtime, files)
        return files


class _DirectoryView:
    """One scan's view of the directories: each listed at most once."""

    def __init__(self, listings: _Listings) -> None:
        self._listings = listings
        self._seen: dict[str, frozenset[str]] = {}
        self.now = time.time_ns()

    def files(self, directory: str) -> frozenset[str]:
        found = self._seen.get(directory)
        if found is None:
            found = self._seen[directory] = self._listings.files(directory, self.now)
        return found

    def holds(self, probes: Iterable[Probe]) -> bool:
        """Whether every directory still holds (or lacks) the file each probe saw."""
        return all((name in self.files(d)) is present for d, name, present in probes)

    def matches(self, seen: Seen) -> bool:
        """`holds`, for the facts of many lookups grouped by directory."""
        for directory, (held, lacked) in seen:
            files = self.files(directory)
            if not (held <= files and files.isdisjoint(lacked)):
                return False
        return True
