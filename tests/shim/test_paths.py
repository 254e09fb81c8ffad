"""Where a compile's paths lie in the sandbox, and the way back (shim/paths.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from reapi.core.conventions import PROVIDED_DIRS
from shim.paths import (
    BUILD_PLACE,
    DEBUG_MAPS,
    EXTERNAL,
    MACRO_MAPS,
    SOURCE_PLACE,
    PathMap,
    RootFinder,
    Roots,
    Unmappable,
    choose,
    cmake_roots,
    named_paths,
    sandbox_arguments,
    to_local_text,
    translate_prefix_map,
)

CMAKE = PathMap(
    (("/home/me/proj/build", BUILD_PLACE), ("/home/me/proj", SOURCE_PLACE)), PROVIDED_DIRS
)


@pytest.mark.parametrize(
    ("local", "remote"),
    [
        ("/home/me/proj/src/a.c", "/build/src/src/a.c"),
        ("/home/me/proj", "/build/src"),
        ("/home/me/proj/build/CMakeFiles/a.o", "/build/bin/CMakeFiles/a.o"),
        ("/home/me/proj/build", "/build/bin"),
        ("/home/me/project/x.h", f"{EXTERNAL}/home/me/project/x.h"),  # not under the root
        ("/opt/sdk/include/probe.h", f"{EXTERNAL}/opt/sdk/include/probe.h"),
        ("/usr/include/stdio.h", "/usr/include/stdio.h"),
        ("/build/x.h", f"{EXTERNAL}/build/x.h"),  # a local /build is not the sandbox's
    ],
)
def test_places_and_back(local: str, remote: str) -> None:
    assert CMAKE.remote(local) == remote
    assert CMAKE.local(remote) == local
    assert (CMAKE.place(local) is None) == (local == remote)


def test_sandbox_places_never_nest() -> None:
    """gcc's prefix maps compare strings: a map made for one place must never
    match another's paths."""
    places = [remote for remote, _ in CMAKE.places]
    for place in places:
        assert not any(other.startswith(place) for other in places if other != place)


def test_cmake_roots() -> None:
    cache = "CMAKE_HOME_DIRECTORY:INTERNAL=/src/zlib\nOTHER:STRING=x\n"
    assert cmake_roots("/tmp/build", cache) == Roots(
        (("/tmp/build", BUILD_PLACE), ("/src/zlib", SOURCE_PLACE)), stretch=True
    )
    assert cmake_roots("/src/zlib", cache) == Roots((("/src/zlib", SOURCE_PLACE),), stretch=True)
    nested = cmake_roots("/src/zlib/build", cache)
    assert nested is not None and nested.places[0] == ("/src/zlib/build", BUILD_PLACE)
    assert cmake_roots("/tmp/b", "CMAKE_HOME_DIRECTORY:INTERNAL=relative\n") is None
    assert cmake_roots("/tmp/b", "garbage") is None


def test_root_finder(tmp_path: Path) -> None:
    build, source = tmp_path / "b", tmp_path / "s"
    (build / "sub" / "dir").mkdir(parents=True)
    source.mkdir()
    finder = RootFinder()
    assert finder.roots(str(build / "sub"), {}) is None
    (build / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={source}\n")
    finder = RootFinder()  # (a missing cache is believed for a few seconds)
    assert finder.roots(str(build / "sub" / "dir"), {}) == Roots(
        ((str(build), BUILD_PLACE), (str(source), SOURCE_PLACE)), stretch=True
    )
    base = {"REAPI_CC_BASEDIR": str(tmp_path)}
    assert finder.roots(str(build), base) == Roots(((str(tmp_path), SOURCE_PLACE),))
    # Nonsense in the variable is ignored: `/` would send the system too.
    assert finder.roots(str(build), {"REAPI_CC_BASEDIR": "/"}) == finder.roots(str(build), {})
    assert finder.roots(str(build), {"REAPI_CC_BASEDIR": "rel"}) == finder.roots(str(build), {})


def test_choose_takes_the_roots_unless_a_relative_path_would_break() -> None:
    roots = Roots(CMAKE.roots)
    cwd = "/home/me/proj/build/lib"
    chosen = choose(cwd, roots, ["CMakeFiles/x.o"], ["/home/me/proj/a.c"], PROVIDED_DIRS)
    assert chosen.roots == roots.places
    # -I../../include leads from the build tree into the source tree: the two
    # places cannot hold that, one root must.
    chosen = choose(cwd, roots, ["../../include"], ["/home/me/proj/a.c"], PROVIDED_DIRS)
    assert chosen.roots == (("/home/me/proj", SOURCE_PLACE),)
    assert chosen.keeps_relative(cwd, "../../include")


def test_a_cmake_source_root_grows_to_hold_the_files_read() -> None:
    """git's CMakeLists.txt is in contrib/buildsystems; its sources two up."""
    cmake = Roots((("/b", BUILD_PLACE), ("/g/contrib/buildsystems", SOURCE_PLACE)), stretch=True)
    files = ["/g/strbuf.h", "/g/contrib/buildsystems/x.h", "/b/gen.h", "/usr/include/stdio.h"]
    chosen = choose("/b", cmake, [], files, PROVIDED_DIRS)
    assert set(chosen.roots) == {("/g", SOURCE_PLACE), ("/b", BUILD_PLACE)}
    # Not up to /: a file that far away travels as external.
    chosen = choose("/b", cmake, [], [*files, "/opt/sdk/x.h"], PROVIDED_DIRS)
    assert chosen.roots == cmake.places
    fixed = Roots((("/g/contrib", SOURCE_PLACE),))  # REAPI_CC_BASEDIR: as the user says
    assert choose("/g/contrib", fixed, [], files, PROVIDED_DIRS).roots == fixed.places


@pytest.mark.parametrize(
    ("written", "remote"),
    [
        ("/home/me/proj/contrib/cmake/../..", "/build/src/contrib/cmake/../.."),
        ("/home/me/proj//a.c", "/build/src//a.c"),
        ("/home/me/proj/include/", "/build/src/include/"),
        ("/home/me/proj/build/./x.o", "/build/bin/./x.o"),
        ("/opt/sdk/lib/../include", f"{EXTERNAL}/opt/sdk/lib/../include"),
        ("/usr/include/../include/stdio.h", "/usr/include/../include/stdio.h"),
        ("/home/me/other/../x.h", f"{EXTERNAL}/home/me/other/../x.h"),
    ],
)
def test_paths_keep_their_text(written: str, remote: str) -> None:
    """gcc writes names as given into __FILE__, debug info and dependency files."""
    assert CMAKE.remote_text(written) == remote
    assert os.path.normpath(remote) == CMAKE.remote(os.path.normpath(written))


def test_a_path_that_climbs_out_of_its_place_cannot_be_written() -> None:
    with pytest.raises(Unmappable, match="path-leaves-its-place"):
        CMAKE.remote_text("/home/me/proj/build/../a.c")  # bin, then up into src
    with pytest.raises(Unmappable, match="path-leaves-its-place"):
        CMAKE.remote_text("/home/me/proj/../project/x.h")  # src, then up and out


def test_choose_without_roots_is_the_deepest_common_directory() -> None:
    chosen = choose("/p/app", None, ["../lib/a.c", "x.o"], ["/p/lib/a.h"], PROVIDED_DIRS)
    assert chosen.roots == (("/p", SOURCE_PLACE),)
    # A file elsewhere does not pull the root up to /: it travels as external.
    chosen = choose("/p/app", None, ["a.c"], ["/p/app/a.c", "/opt/sdk/x.h"], PROVIDED_DIRS)
    assert chosen.roots == (("/p/app", SOURCE_PLACE),)
    assert chosen.remote("/opt/sdk/x.h") == f"{EXTERNAL}/opt/sdk/x.h"
    with pytest.raises(Unmappable, match="inputs-scattered"):
        choose("/p/app", None, ["../../../../etc/x.c"], [], PROVIDED_DIRS)


def test_arguments_are_placed_in_the_sandbox() -> None:
    arguments = [
        "-I/home/me/proj/include", "-I", "/home/me/proj/build/gen", "-Ilocal",
        "-isystem/opt/sdk/include", "-I/usr/include/glib-2.0", "-DX=/home/me/proj",
        "-include", "/home/me/proj/config.h", "-MD", "-MT", "/home/me/proj/build/a.o",
        "-MF", "/home/me/proj/build/a.d", "-Wp,-MD,/home/me/proj/build/b.d",
        "--sysroot=/opt/root", "-iprefix", "/opt/sdk/", "-x", "c",
        "-o", "/home/me/proj/build/a.o", "-c", "/home/me/proj/a.c",
    ]  # fmt: skip
    assert sandbox_arguments(arguments, CMAKE, []) == [
        "-I/build/src/include", "-I", "/build/bin/gen", "-Ilocal",
        f"-isystem{EXTERNAL}/opt/sdk/include", "-I/usr/include/glib-2.0", "-DX=/home/me/proj",
        "-include", "/build/src/config.h", "-MD", "-MT", "/build/bin/a.o",
        "-MF", "/build/bin/a.d", "-Wp,-MD,/build/bin/b.d",
        f"--sysroot={EXTERNAL}/opt/root", "-iprefix", f"{EXTERNAL}/opt/sdk/", "-x", "c",
        "-o", "/build/bin/a.o", "-c", "/build/src/a.c",
    ]  # fmt: skip
    named = named_paths(["-Ilocal", "-o", "x.o", "-c", "a.c", "-x", "c", "-DY=z", "-I/abs/../i"])
    assert named.relative == ["local", "x.o", "a.c"]
    assert named.includes == ("local", "/abs/../i")
    assert named.climbed("/w") == ["/abs"]


def remap(maps: Sequence[str], option_kinds: tuple[str, ...], path: str) -> str:
    """What gcc does with `path` given prefix-map options `maps`: the last
    matching map given wins; a map matches by plain string prefix."""
    for argument in reversed(maps):
        if argument.startswith(option_kinds):
            old, _, new = argument.partition("=")[2].partition("=")
            if path.startswith(old):
                return new + path[len(old) :]
    return path


USER_MAPS = [
    [],
    ["-fdebug-prefix-map=/home/me/proj=."],
    ["-fdebug-prefix-map=/home/me=/src"],
    ["-fdebug-prefix-map=/home/me/proj/sub=/x"],
    ["-ffile-prefix-map=/home/me/pr=/y"],  # a prefix of a name, as gcc allows
    ["-fdebug-prefix-map=/opt=/O", "-fdebug-prefix-map=/home/me/proj/build=/B"],
    ["-fdebug-prefix-map=/home/me/proj=/1", "-fdebug-prefix-map=/home/me=/2"],  # order matters
    ["-fdebug-prefix-map=/usr/include=/sys"],
]
PATHS = [
    "/home/me/proj/a.c",
    "/home/me/proj/sub/b.h",
    "/home/me/proj/build",
    "/home/me/proj/build/gen/c.h",
    "/home/me/project/d.h",
    "/opt/sdk/e.h",
    "/usr/include/stdio.h",
]


@pytest.mark.parametrize("user", USER_MAPS, ids=lambda maps: " ".join(maps) or "none")
def test_debug_paths_read_as_they_would_here(user: list[str]) -> None:
    """The remote compile's maps (ours, then the user's translated) turn each
    sandbox path into exactly what the user's maps make of the local path."""
    remote_arguments = [
        *CMAKE.prefix_maps(DEBUG_MAPS, user, PATHS),
        *sandbox_arguments(user, CMAKE, PATHS),
    ]
    for path in PATHS:
        assert remap(remote_arguments, DEBUG_MAPS, CMAKE.remote(path)) == remap(
            user, DEBUG_MAPS, path
        ), path


def test_a_place_the_user_maps_whole_needs_no_map_of_ours() -> None:
    """Ours name local paths, which would keep two checkouts from sharing."""
    user = ["-fmacro-prefix-map=/home/me/proj=."]
    maps = CMAKE.prefix_maps(MACRO_MAPS, user, PATHS)
    assert not any("/home/me/proj" in m for m in maps)
    assert f"-fmacro-prefix-map={EXTERNAL}=" in maps
    assert CMAKE.prefix_maps(MACRO_MAPS, [], ["/home/me/proj/a.c"]) == [
        "-fmacro-prefix-map=/build/src=/home/me/proj",
        f"-fmacro-prefix-map={EXTERNAL}=",  # (names no local path: always there)
    ]


def test_a_user_map_over_the_sandbox_is_refused() -> None:
    with pytest.raises(Unmappable, match="prefix-map-over-sandbox"):
        translate_prefix_map("-fdebug-prefix-map=/bu=/x", CMAKE, PATHS)
    assert translate_prefix_map("-fdebug-prefix-map=rel=/x", CMAKE, PATHS) == [
        "-fdebug-prefix-map=rel=/x"
    ]


def test_dependency_files_come_back_with_local_paths() -> None:
    remote = (
        b"CMakeFiles/a.o: /build/src/a.c /usr/include/stdio.h \\\n"
        b" /build/bin/gen/config.h " + EXTERNAL.encode() + b"/opt/sdk/e.h \\\n"
        b" /build/src/with\\ space/x.h\n"
        b"/build/src/with\\ space/x.h:\n"
    )
    spaced = PathMap((("/home/my proj", SOURCE_PLACE), ("/tmp/b#1", BUILD_PLACE)), PROVIDED_DIRS)
    assert to_local_text(remote, spaced, make_syntax=True) == (
        b"CMakeFiles/a.o: /home/my\\ proj/a.c /usr/include/stdio.h \\\n"
        b" /tmp/b\\#1/gen/config.h /opt/sdk/e.h \\\n"
        b" /home/my\\ proj/with\\ space/x.h\n"
        b"/home/my\\ proj/with\\ space/x.h:\n"
    )


def test_diagnostics_come_back_with_local_paths_but_quoted_source_stays() -> None:
    remote = (
        b"In file included from /build/src/a.c:1:\n"
        b"/build/src/a.h:3:5: warning: unused variable 'x' [-Wunused-variable]\n"
        b'    3 |     const char *s = "/build/src/a.h";\n'
        b"      |                 ^\n"
        b"\x1b[01m\x1b[K/build/bin/gen.h:1:1:\x1b[m\x1b[K note: here ('/build/src/q.h')\n"
    )
    assert to_local_text(remote, CMAKE) == (
        b"In file included from /home/me/proj/a.c:1:\n"
        b"/home/me/proj/a.h:3:5: warning: unused variable 'x' [-Wunused-variable]\n"
        b'    3 |     const char *s = "/build/src/a.h";\n'
        b"      |                 ^\n"
        b"\x1b[01m\x1b[K/home/me/proj/build/gen.h:1:1:\x1b[m\x1b[K note: here "
        b"('/home/me/proj/q.h')\n"
    )
    assert to_local_text(b"/buildx/a.c: no\n", CMAKE) == b"/buildx/a.c: no\n"


def test_relative_paths_are_checked_against_the_sandbox() -> None:
    cwd = "/home/me/proj/build/lib"
    assert CMAKE.keeps_relative(cwd, "CMakeFiles/x.o")
    assert CMAKE.keeps_relative(cwd, "../gen")
    assert not CMAKE.keeps_relative(cwd, "../../include")  # build tree to source tree
    assert os.path.normpath(os.path.join(CMAKE.remote(cwd), "..")) == BUILD_PLACE


def test_a_user_map_names_a_local_path_only_where_it_must() -> None:
    """Kept as given only where it could apply to a provided path; else the
    translations do all its work, and the action names no local path."""
    assert translate_prefix_map("-fdebug-prefix-map=/home/me/proj=.", CMAKE, PATHS) == [
        "-fdebug-prefix-map=/build/bin=./build",
        "-fdebug-prefix-map=/build/src=.",
        # (/home/me/project/d.h is outside the root, and starts with the string)
        f"-fdebug-prefix-map={EXTERNAL}/home/me/proj=.",
    ]
    inside = ["/home/me/proj/a.c", "/home/me/proj/build/a.o"]
    assert translate_prefix_map("-fdebug-prefix-map=/home/me/proj=.", CMAKE, inside) == [
        "-fdebug-prefix-map=/build/bin=./build",
        "-fdebug-prefix-map=/build/src=.",
    ]
    assert translate_prefix_map("-fdebug-prefix-map=/usr/include=/sys", CMAKE, PATHS) == [
        "-fdebug-prefix-map=/usr/include=/sys"
    ]


def test_dependency_files_are_laid_out_as_gcc_lays_them_out(tmp_path: Path) -> None:
    """Names put back are longer or shorter than the sandbox's, and gcc
    breaks a rule's lines by length: the file is broken again as gcc would
    have broken it here (checked against gcc itself)."""
    import random
    import subprocess

    from shim.outputs import reflow_dependencies

    rng = random.Random(7)
    (tmp_path / "a.c").write_text('#include "h.h"\n#include <stdio.h>\n')
    for _ in range(20):
        include = tmp_path / ("x" * rng.randint(1, 60) + " sp" * rng.randint(0, 1)) / "inc"
        include.mkdir(parents=True, exist_ok=True)
        (include / "h.h").write_text("int h;\n")
        target = rng.choice(["a.o", "t" * rng.randint(1, 90)])
        subprocess.run(
            ["gcc", f"-I{include}", "-MD", "-MP", "-MT", target, "-MF", "a.d", "-c", "a.c"],
            cwd=tmp_path, check=True,
        )  # fmt: skip
        written = (tmp_path / "a.d").read_bytes()
        assert reflow_dependencies(written.replace(b" \\\n", b" ")) == written
    other = b"a.o: a.c \\\n  h.h\n"  # (clang's layout: left alone)
    assert reflow_dependencies(other) == other


def test_dependency_files_without_escapes_take_the_quick_way() -> None:
    remote = (
        b"/build/bin/a.o: /build/src/a.c /usr/include/stdio.h \\\n"
        b" /build/bin/gen/config.h " + EXTERNAL.encode() + b"/opt/sdk/e.h\n"
        b"/build/src/a.h:\n/build/srcx/not-ours.h:\n"
    )
    paths = PathMap((("/home/p#1", SOURCE_PLACE), ("/tmp/b$", BUILD_PLACE)), PROVIDED_DIRS)
    assert to_local_text(remote, paths, make_syntax=True) == (
        b"/tmp/b$$/a.o: /home/p\\#1/a.c /usr/include/stdio.h \\\n"
        b" /tmp/b$$/gen/config.h /opt/sdk/e.h\n"
        b"/home/p\\#1/a.h:\n/build/srcx/not-ours.h:\n"
    )
