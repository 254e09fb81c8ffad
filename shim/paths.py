"""Where a compile's files lie in the worker's sandbox, and the way back.

A remote compile runs in an input tree mounted at SANDBOX_ROOT (/build), with
the directories every worker provides (reapi/core/conventions.py) at their own
paths. A `PathMap` places each local path there:

- under a project root: the root's place in the sandbox, plus the path below
  the root. Two checkouts, or two build directories, at different absolute
  paths then build the same actions, so they share cache hits;
- in a provided directory (/usr/include...): unchanged, not sent (the
  manifest has the worker check its own copy);
- anywhere else (/opt/sdk, a home-directory SDK): under EXTERNAL, at its
  whole absolute path, sent like the project's files.

The project roots (`find_roots`, `choose`):
1. REAPI_CC_BASEDIR, when set: one root, at SANDBOX_ROOT/src.
2. Otherwise, in a CMake build tree (a CMakeCache.txt in the working
   directory or above it): the build tree at SANDBOX_ROOT/bin and its source
   tree (the cache's CMAKE_HOME_DIRECTORY) at SANDBOX_ROOT/src. CMake names
   sources and include directories by absolute paths, often across the two
   trees (an out-of-source build in /tmp/b for sources in ~/proj): each tree
   is placed on its own, so a second build directory anywhere builds the same
   actions. An in-source build is one root, at SANDBOX_ROOT/src.
3. Otherwise, the deepest directory holding the working directory, the paths
   the arguments name relatively and every file the compile reads outside
   the provided directories (if that is `/`, only the first two): one root,
   at SANDBOX_ROOT/src. Relative make builds keep their trees' shapes.
A relative path in the arguments must lead to the same place in the sandbox
as here; when the roots of 1 or 2 would break one (`-I../..` out of the
build tree), rule 3 decides instead.

No place in the sandbox lies in another (src, bin, .reapi/abs): gcc applies
a `-f...-prefix-map` to any path that starts with its OLD string, so with
places apart each map made for one place can only ever apply to it. That is
what lets the prefix maps of the debug info and of __FILE__ be put back
exactly, the user's own maps included (`translate_prefix_map`).

Going back: the dependency file and the diagnostics name sandbox paths; each
is put back to the local path it stands for (`to_local_text`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from reapi.core.conventions import SANDBOX_ROOT, is_under, provided_by
from shim.options import Option, lookup

# The sandbox places: a project root (or the source tree), a CMake build tree,
# and files from anywhere else. None is a prefix of another.
SOURCE_PLACE = f"{SANDBOX_ROOT}/src"
BUILD_PLACE = f"{SANDBOX_ROOT}/bin"
EXTERNAL = f"{SANDBOX_ROOT}/.reapi/abs"
CMAKE_CACHE = "CMakeCache.txt"
# How long the absence of a CMake cache above a directory is believed (seconds).
NO_CACHE_SECONDS = 5.0
DEBUG_MAPS = ("-fdebug-prefix-map=", "-ffile-prefix-map=")
MACRO_MAPS = ("-fmacro-prefix-map=", "-ffile-prefix-map=")
_PREFIX_MAPS = ("-fdebug-prefix-map=", "-fmacro-prefix-map=", "-ffile-prefix-map=")

Root = tuple[str, str]  # (local directory, its place in the sandbox)


@dataclass(frozen=True)
class Roots:
    """A compile's project roots, as RootFinder finds them."""

    places: tuple[Root, ...]  # deepest local directory first
    # CMake's source directory need not be the tree's top (git's is
    # contrib/buildsystems): the source root may then grow to hold the files
    # a compile reads, as rule 3 does.
    stretch: bool = False


class Unmappable(Exception):
    """No input tree holds the compile's paths faithfully; the message is a stats reason."""


@dataclass(frozen=True)
class PathMap:
    roots: tuple[Root, ...]  # the project roots, deepest local directory first
    provided: tuple[str, ...]  # what every worker provides (reapi/core/conventions.py)

    def place(self, path: str) -> str | None:
        """Where the file at `path` (absolute, normalized) goes in the sandbox;
        None when the worker provides it."""
        for local, remote in self.roots:
            if path.startswith(local) and (len(path) == len(local) or path[len(local)] == "/"):
                return remote + path[len(local) :]
        if provided_by(path, self.provided):
            return None
        return EXTERNAL + path

    def provided_only(self, paths: Iterable[str]) -> list[str]:
        """Those of `paths` (absolute, normalized) the worker provides: a
        compile's absent paths are a thousand or more."""
        prefixes = tuple(d + "/" for d in self.provided)
        inside = [path for path in paths if path.startswith(prefixes)]
        if any(provided_by(local, self.provided) for local, _ in self.roots):
            inside = [path for path in inside if self.place(path) is None]
        return inside

    def remote(self, path: str) -> str:
        """`path` as the sandbox names it (a provided path is its own)."""
        placed = self.place(path)
        return path if placed is None else placed

    def remote_text(self, text: str) -> str:
        """An absolute path as written (`.`, `..`, doubled slashes and all:
        gcc keeps them in __FILE__, debug info and dependency files), with
        the part that names its place replaced by the place. Raises
        Unmappable where the rest climbs out of the place."""
        normal = os.path.normpath(text)
        remote = self.remote(normal)
        if remote == normal:  # provided: the worker's own, as written
            return text
        parts = text.split("/")
        cut, place = 1, EXTERNAL  # an external path keeps all of its text
        for local, root_place in self.roots:
            if is_under(normal, local):
                cuts = (i for i in range(2, len(parts) + 1) if _normal(parts[:i]) == local)
                cut, place = next(cuts, len(parts) + 1), root_place
                break
        # Where the text climbs (`..`), the directory it climbs from must be
        # where the sandbox has it, and so must the end.
        for end in [i for i, part in enumerate(parts) if part == ".."] + [len(parts)]:
            if end >= cut:
                written = _normal([place, *parts[cut:end]])
                if written != self.remote(_normal(parts[:end])):
                    raise Unmappable("path-leaves-its-place")
        return "/".join([place, *parts[cut:]])

    @property
    def places(self) -> list[Root]:
        """(sandbox place, the local prefix it stands for): EXTERNAL + P is P."""
        return [(remote, local) for local, remote in self.roots] + [(EXTERNAL, "")]

    def local(self, path: str) -> str:
        """The local path a sandbox path stands for (the inverse of `remote`)."""
        for remote, local in self.places:
            if is_under(path, remote):
                return (local + path[len(remote) :]) or "/"
        return path

    def keeps_relative(self, cwd: str, relative: str) -> bool:
        """Whether `relative` leads from the sandbox's working directory to
        where it leads from `cwd` here."""
        here = os.path.normpath(os.path.join(cwd, relative))
        there = os.path.normpath(os.path.join(self.remote(cwd), relative))
        return self.remote(here) == there

    def prefix_maps(
        self, kinds: tuple[str, ...], arguments: Sequence[str], used: Collection[str]
    ) -> list[str]:
        """`kinds[0]` maps for the sandbox places, so that the paths the
        compiler writes there (kinds: DEBUG_MAPS, MACRO_MAPS) read as they
        would here. A project root's only where one of the `used` paths lies
        in it: each names a local path, which keeps checkouts from sharing
        (EXTERNAL's names none). None for a place a user's map of `kinds` in
        `arguments` covers whole (those maps, translated, decide there)."""
        maps = []
        for remote, local in self.places:
            if local:
                if _covered(arguments, kinds, local):
                    continue
                inside = local + "/"
                if not any(path.startswith(inside) or path == local for path in used):
                    continue
            maps.append(f"{kinds[0]}{remote}={local}")
        return maps


def _normal(parts: list[str]) -> str:
    return os.path.normpath("/".join(parts))


def _covered(arguments: Sequence[str], kinds: tuple[str, ...], local: str) -> bool:
    for argument in arguments:
        if argument.startswith(kinds):
            old = argument.partition("=")[2].partition("=")[0]
            if old and local.startswith(old):
                return True
    return False


def choose(
    cwd: str,
    roots: Roots | None,
    relative: Iterable[str],
    files: Iterable[str],
    provided: tuple[str, ...],
) -> PathMap:
    """The PathMap of a compile in `cwd`: `roots` (from RootFinder) unless
    they cannot hold it, else one root (rule 3 above). `relative`: the
    relative paths its arguments name; `files`: the files it reads (absolute).
    Raises Unmappable when everything would have to be under `/`."""
    relative = list(relative)
    files = list(files)
    if roots is not None:
        places = _stretched(roots, files, provided) if roots.stretch else roots.places
        candidate = PathMap(places, provided)
        if any(is_under(cwd, local) for local, _ in places) and all(
            candidate.keeps_relative(cwd, path) for path in relative
        ):
            return candidate
    named = [os.path.normpath(os.path.join(cwd, path)) for path in relative]
    sent = [path for path in files if not provided_by(path, provided)]
    top = os.path.commonpath([cwd, *named, *sent])
    if top == "/":
        top = os.path.commonpath([cwd, *named])
    if top == "/":
        raise Unmappable("inputs-scattered")
    return PathMap(((top, SOURCE_PLACE),), provided)


def _stretched(roots: Roots, files: list[str], provided: tuple[str, ...]) -> tuple[Root, ...]:
    """`roots` with the source root grown to the deepest directory holding it
    and the files read outside the other roots (not to `/`: files scattered
    that far travel as external)."""
    source = next(local for local, remote in roots.places if remote == SOURCE_PLACE)
    others = [local for local, remote in roots.places if remote != SOURCE_PLACE]
    outside = [
        path
        for path in files
        if not provided_by(path, provided) and not any(is_under(path, o) for o in others)
    ]
    top = os.path.commonpath([source, *outside]) if outside else source
    if top in ("/", source):
        return roots.places
    grown = [(top if remote == SOURCE_PLACE else local, remote) for local, remote in roots.places]
    return tuple(sorted(grown, key=lambda root: len(root[0]), reverse=True))


class RootFinder:
    """Finds a compile's project roots (rules 1 and 2 above), remembering
    each working directory's CMake cache (read again when it changes)."""

    def __init__(self) -> None:
        # cwd -> (cache path, its mtime, roots), or (None, when looked, None)
        self._known: dict[str, tuple[str | None, float, Roots | None]] = {}

    def roots(self, cwd: str, env: Mapping[str, str]) -> Roots | None:
        base = env.get("REAPI_CC_BASEDIR")
        if base and os.path.isabs(base) and os.path.normpath(base) != "/":
            return Roots(((os.path.normpath(base), SOURCE_PLACE),))
        return self._cmake(cwd)

    def _cmake(self, cwd: str) -> Roots | None:
        known = self._known.get(cwd)
        if known is not None:
            cache, when, roots = known
            if cache is None and time.monotonic() - when < NO_CACHE_SECONDS:
                return None
            if cache is not None and _mtime(cache) == when:
                return roots
        cache = _find_upwards(cwd, CMAKE_CACHE)
        if cache is None:
            self._known[cwd] = (None, time.monotonic(), None)
            return None
        mtime = _mtime(cache)
        roots = cmake_roots(os.path.dirname(cache), _read(cache))
        self._known[cwd] = (cache, mtime, roots)
        return roots


def cmake_roots(build: str, cache_text: str) -> Roots | None:
    """The roots of a CMake build tree whose CMakeCache.txt holds `cache_text`."""
    match = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cache_text, re.MULTILINE)
    if match is None or not os.path.isabs(match.group(1).strip()):
        return None
    source = os.path.normpath(match.group(1).strip())
    if source == build:
        return Roots(((build, SOURCE_PLACE),), stretch=True)
    roots = ((build, BUILD_PLACE), (source, SOURCE_PLACE))
    return Roots(tuple(sorted(roots, key=lambda root: len(root[0]), reverse=True)), stretch=True)


def _find_upwards(directory: str, name: str) -> str | None:
    while True:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return ""


def map_path_arguments(
    arguments: Sequence[str], change: Callable[[str, Option | None], str]
) -> list[str]:
    """`arguments` with `change(value, option)` applied to every path they
    name: the source (option None), and the values of options that name files
    (the option table's PATH and DEPS kinds, `-Wp,-MD,FILE`). The user's
    prefix maps are left alone (see translate_prefix_map)."""
    changed: list[str] = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if not argument.startswith("-"):
            changed.append(change(argument, None))
            continue
        option, value = lookup(argument)
        if argument.startswith("-Wp,"):
            parts = argument.split(",")
            changed.append(",".join([*parts[:2], *(change(p, option) for p in parts[2:])]))
            continue
        names_path = option is not None and option.names_file
        if option is not None and option.separate and value is None:
            if index < len(arguments):
                following = arguments[index]
                index += 1
                changed += [argument, change(following, option) if names_path else following]
            else:
                changed.append(argument)
        elif option is not None and names_path and value is not None:
            changed.append(argument[: len(argument) - len(value)] + change(value, option))
        else:
            changed.append(argument)
    return changed


@dataclass(frozen=True)
class NamedPaths:
    """The paths a compile's arguments name, as written."""

    values: tuple[str, ...]
    includes: tuple[str, ...]  # those that are include directories (-I, -isystem...)

    @property
    def relative(self) -> list[str]:
        return [value for value in self.values if value and not value.startswith("/")]

    def climbed(self, cwd: str) -> list[str]:
        """The directories the paths go up (`..`) from: the kernel needs them
        to exist, in the sandbox too."""
        found = []
        for value in self.values:
            if ".." in value:
                parts = os.path.join(cwd, value).split("/")
                found += [_normal(parts[:i]) for i, p in enumerate(parts) if p == ".." and i > 1]
        return found


def named_paths(arguments: Sequence[str]) -> NamedPaths:
    values: list[str] = []
    includes: list[str] = []

    def note(value: str, option: Option | None) -> str:
        values.append(value)
        if option is not None and option.name in _INCLUDE_OPTIONS:
            includes.append(value)
        return value

    map_path_arguments(arguments, note)
    return NamedPaths(tuple(values), tuple(includes))


_INCLUDE_OPTIONS = ("-I", "-idirafter", "-iquote", "-isystem")


def sandbox_arguments(arguments: Sequence[str], paths: PathMap, used: Sequence[str]) -> list[str]:
    """`arguments` for the remote compiler: each absolute path placed in the
    sandbox, each of the user's prefix maps translated for the `used` paths
    (those the compile may write into its outputs: its directory, the files
    it reads, its outputs)."""

    def change(value: str, option: Option | None) -> str:
        return paths.remote_text(value) if os.path.isabs(value) else value

    mapped = map_path_arguments(arguments, change)
    result: list[str] = []
    for argument in mapped:
        if argument.startswith(_PREFIX_MAPS):
            result.extend(translate_prefix_map(argument, paths, used))
        else:
            result.append(argument)
    return result


def translate_prefix_map(argument: str, paths: PathMap, used: Sequence[str]) -> list[str]:
    """A user's `-f...-prefix-map=OLD=NEW` for the sandbox. gcc applies it to
    any path that starts with the string OLD. Here that path P would be a
    sandbox path: for each place standing for the local prefix L, either L
    starts with OLD (every path there maps: the place maps to NEW and the
    rest of L) or OLD starts with L (the paths there under the rest of OLD
    map). Only for places where some `used` path would be mapped: each
    translation names a local path, which keeps checkouts from sharing. The
    original stays where it could match provided paths (which keep their
    names in the sandbox), before the translations (gcc tries the last given
    first): else it would only put a local path in the action.
    Raises Unmappable for an OLD that would also match sandbox paths it does
    not stand for."""
    option, _, value = argument.partition("=")
    old, sep, new = value.partition("=")
    if not sep or not old.startswith("/"):
        return [argument]
    if old.startswith(SANDBOX_ROOT) or f"{SANDBOX_ROOT}/".startswith(old):
        raise Unmappable("prefix-map-over-sandbox")
    provided = any(d.startswith(old) or old.startswith(d) for d in paths.provided)
    translated = [argument] if provided else []
    mapped = [paths.remote(path) for path in used if path.startswith(old)]
    for remote, local in paths.places:
        if not any(is_under(path, remote) for path in mapped):
            continue
        if local and local.startswith(old):
            translated.append(f"{option}={remote}={new}{local[len(old) :]}")
        elif old.startswith(local):
            translated.append(f"{option}={remote}{old[len(local) :]}={new}")
    return translated


# Where a sandbox path may start in a diagnostic: the line's start, a blank,
# an opening quote or parenthesis, or the end of a colour escape (CMake's
# Ninja builds ask gcc for colours).
_PATH_START = rb"(?:^|(?<=[\s'\"(\x60])|(?<=\x1b\[K)|(?<=\x1b\[m))"
# A quoted source line in a diagnostic ("  12 | code"): the user's own text.
_SOURCE_LINE = re.compile(rb"^\s*\d*\s+\|")


def to_local_text(text: bytes, paths: PathMap, make_syntax: bool = False) -> bytes:
    """`text` (a dependency file, diagnostics) with every sandbox path that
    starts a word put back to the local path it stands for. In `make_syntax`
    (a dependency file) the local part is escaped as gcc escapes one (space,
    #, $), and a word starts only after an unescaped blank."""
    if SANDBOX_ROOT.encode() not in text:
        return text
    if make_syntax and b"\\ " not in text:
        return _to_local_words(text, paths)
    places = b"|".join(re.escape(remote.encode()) for remote, _ in paths.places)
    start = rb"(?:^|(?<=[^\\][ \t])|(?<=^[ \t]))" if make_syntax else _PATH_START
    pattern = re.compile(start + rb"(" + places + rb")(?=[/\s:,'\")\x1b\x60]|$)", re.MULTILINE)
    locals_ = {remote.encode(): local.encode() for remote, local in paths.places}

    def back(match: re.Match[bytes]) -> bytes:
        local = locals_[match.group(1)]
        if make_syntax:
            local = local.replace(b"$", b"$$").replace(b"#", b"\\#").replace(b" ", b"\\ ")
        return local

    if make_syntax:
        return pattern.sub(back, text)
    lines = text.split(b"\n")
    return b"\n".join(
        line if _SOURCE_LINE.match(line) else pattern.sub(back, line) for line in lines
    )


def _to_local_words(text: bytes, paths: PathMap) -> bytes:
    """to_local_text for a dependency file without escaped blanks: a word
    starts after a blank or a line's start (bytes.replace: a build's worth
    of these files costs a regular expression about a second)."""
    for remote, local in paths.places:
        place = remote.encode()
        if place not in text:
            continue
        here = local.encode().replace(b"$", b"$$").replace(b"#", b"\\#").replace(b" ", b"\\ ")
        for follow in (b"/", b":", b" ", b"\n"):
            for start in (b" ", b"\n"):
                text = text.replace(start + place + follow, start + here + follow)
            if text.startswith(place + follow):
                text = here + text[len(place) :]
    return text
