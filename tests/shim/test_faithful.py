"""Ways the preprocessor's output depends on the file system beyond the text
of the files it reads, each compiled through reapi-cc against the real server
and workers, in every mode, and compared byte for byte with gcc's object:
#include_next chains, -include and -imacros, #pragma once copies, __FILE__
and __BASE_FILE__ under absolute paths, the user's own prefix maps in debug
builds, __TIMESTAMP__, and `..` after a symbolic link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.shim.compiles import MODES, compile_both, write


@pytest.mark.parametrize("mode", MODES)
def test_include_next_chains(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    """A project header that wraps a system one, and a project chain."""
    project = write(
        tmp_path / "p",
        {
            "a.c": "#include <stdlib.h>\n#include <chain.h>\nint v = WRAPPED + CHAIN;\n",
            "wrap/stdlib.h": "#include_next <stdlib.h>\n#define WRAPPED 1\n",
            "first/chain.h": "#include_next <chain.h>\n#define CHAIN_FIRST 1\n",
            "second/chain.h": "#define CHAIN (CHAIN_SECOND + 40)\n#define CHAIN_SECOND 2\n",
        },
    )
    arguments = ["-Iwrap", "-Ifirst", "-Isecond", "-O2", "-c", "a.c", "-o", "a.o"]
    compared = compile_both(project, arguments, shim_env, mode)
    assert compared.actual == compared.expected
    assert compared.remote, compared.moved


@pytest.mark.parametrize("mode", MODES)
def test_forced_includes(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    project = write(
        tmp_path / "p",
        {
            "a.c": "int v = FROM_CONFIG + FROM_MACROS;\n",
            "cfg/config.h": "#define FROM_CONFIG 1\nint from_config;\n",
            "macros.h": "#define FROM_MACROS 2\nint dropped_by_imacros;\n",
        },
    )
    for forced in (["-include", "cfg/config.h"], ["-include", str(project / "cfg/config.h")]):
        arguments = [*forced, "-imacros", "macros.h", "-O2", "-c", "a.c", "-o", "a.o"]
        compared = compile_both(project, arguments, shim_env, mode)
        assert compared.actual == compared.expected, forced
        assert compared.remote, compared.moved


ONCE = {
    "a.c": '#define X(n) + n\nint v = 0\n#include "a/once.h"\n#include "b/once.h"\n;\n',
    "a/once.h": "#pragma once\nX(1)\n",
    "b/once.h": "#pragma once\nX(1)\n",
}


@pytest.mark.parametrize("mode", MODES)
def test_pragma_once_copies(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    """gcc takes two `#pragma once` files of one content for one file when
    their mtimes match (here v = 1), and for two when they differ (v = 2).
    In the sandbox both are links to one cached file: copies whose mtimes
    differ here must not go as files."""
    project = write(tmp_path / "p", ONCE)
    arguments = ["-O2", "-c", "a.c", "-o", "a.o"]
    os.utime(project / "a/once.h", ns=(1_000_000_000, 1_000_000_000))
    os.utime(project / "b/once.h", ns=(2_000_000_000, 2_000_000_000))
    differing = compile_both(project, arguments, shim_env, mode)
    assert differing.actual == differing.expected
    if mode != "cpp":
        assert differing.moved.get("preprocessed_reasons") == {"once-only-copies": 1}
    os.utime(project / "b/once.h", ns=(1_000_000_000, 1_000_000_000))
    same = compile_both(project, arguments, shim_env, mode)
    assert same.actual == same.expected != differing.expected
    assert "preprocessed_here" not in same.moved and same.remote, same.moved
    (project / "b/once.h").unlink()
    os.link(project / "a/once.h", project / "b/once.h")  # hard links: one file here too
    linked = compile_both(project, arguments, shim_env, mode)
    assert linked.actual == linked.expected == same.expected
    assert "preprocessed_here" not in linked.moved and linked.remote, linked.moved


FILE_NAMES = {
    "src/a.c": '#include "where.h"\nconst char *here = __FILE__;\n'
    "const char *base(void) { return WHERE_BASE; }\n",
    "include/where.h": "#define WHERE_BASE __BASE_FILE__\nconst char *header = __FILE__;\n",
}


@pytest.mark.parametrize("mode", MODES)
def test_file_names_under_absolute_paths(
    tmp_path: Path, shim_env: dict[str, str], mode: str
) -> None:
    """CMake names every file by its absolute path: __FILE__ and __BASE_FILE__
    then hold this checkout's paths, which the sandbox names otherwise. A
    second checkout gets its own paths, never the first one's object."""
    for checkout in ("first", "second/deeper"):
        project = write(tmp_path / checkout, FILE_NAMES)
        arguments = [
            f"-I{project}/include", f"-DFROM_OPTION=\"{project}\"", "-O2",
            "-c", str(project / "src/a.c"), "-o", "a.o",
        ]  # fmt: skip
        compared = compile_both(project, arguments, shim_env, mode)
        assert compared.actual == compared.expected, checkout
        assert str(project).encode() in compared.actual
        assert compared.remote, compared.moved


@pytest.mark.parametrize("mode", ["deps", "scan"])
def test_objects_without_file_names_are_shared_between_checkouts(
    tmp_path: Path, shim_env: dict[str, str], mode: str
) -> None:
    """Absolute paths, and a debug build whose only paths the user's own map
    takes away: the object is the same in every checkout, and so is the
    action."""
    files = {
        "src/a.c": '#include "b.h"\nint f(void) { return B; }\n',
        "include/b.h": "#define B 2\n",
    }
    objects = []
    for number, checkout in enumerate(("first", "second/deeper")):
        project = write(tmp_path / checkout, files)
        arguments = [
            f"-I{project}/include", "-g", f"-fdebug-prefix-map={project}=.", "-O2",
            "-c", str(project / "src/a.c"), "-o", "a.o",
        ]  # fmt: skip
        env = shim_env | {"REAPI_CC_BASEDIR": str(project)}
        compared = compile_both(project, arguments, env, mode)
        assert compared.actual == compared.expected, checkout
        if number:
            assert compared.moved.get("cache_hits") == 1, compared.moved
        objects.append(compared.actual)
    assert objects[0] == objects[1]


@pytest.mark.parametrize("mode", MODES)
def test_timestamp_of_the_source(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    """__TIMESTAMP__ is the source's mtime, which a worker's copy does not keep."""
    project = write(tmp_path / "p", {"a.c": "const char *stamp = __TIMESTAMP__;\n"})
    os.utime(project / "a.c", ns=(1_500_000_000_000_000_000,) * 2)
    compared = compile_both(project, ["-O2", "-c", "a.c", "-o", "a.o"], shim_env, mode)
    assert compared.actual == compared.expected
    assert b"2017" in compared.actual
    if mode != "cpp":
        assert compared.moved.get("preprocessed_reasons") == {"timestamp-macro": 1}


@pytest.mark.parametrize("mode", MODES)
def test_parent_of_a_symbolic_link(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    """`sdk/../common/c.h` where sdk is a link: gcc (the kernel) climbs from
    the link's target; read as text, the name leads to another file."""
    write(tmp_path / "elsewhere", {"include/s.h": '#include "../common/c.h"\n'})
    write(tmp_path / "elsewhere", {"common/c.h": "#define C 1\n"})
    project = write(
        tmp_path / "p", {"a.c": '#include "s.h"\nint c = C;\n', "common/c.h": "#define C 2\n"}
    )
    (project / "sdk").symlink_to(tmp_path / "elsewhere" / "include")
    arguments = ["-Isdk", "-O2", "-c", "a.c", "-o", "a.o"]
    compared = compile_both(project, arguments, shim_env, mode)
    assert compared.actual == compared.expected
    if mode != "cpp":
        assert compared.moved.get("preprocessed_here") == 1, compared.moved


@pytest.mark.parametrize("mode", MODES)
def test_diagnostics_and_split_debug_info_read_as_here(
    tmp_path: Path, shim_env: dict[str, str], mode: str
) -> None:
    """Under absolute paths: warnings name this machine's files (and an empty
    include directory is there for -Wmissing-include-dirs), and the .dwo
    of -gsplit-dwarf is gcc's too."""
    project = write(
        tmp_path / "p",
        {
            "src/a.c": '#include "w.h"\nint f(void) { int unused; return W; }\n',
            "include/w.h": "#define W 1\nstatic int never_used;\n",
        },
    )
    (project / "empty").mkdir()
    (project / "build").mkdir()
    arguments = [
        f"-I{project}/include", f"-I{project}/empty", "-Wall", "-Wmissing-include-dirs",
        "-g", "-gsplit-dwarf", "-c", str(project / "src/a.c"), "-o", "build/a.o",
    ]  # fmt: skip
    compared = compile_both(project, arguments, shim_env, mode, others=("build/a.dwo",))
    assert compared.actual == compared.expected
    assert compared.others["build/a.dwo"][0] == compared.others["build/a.dwo"][1]
    assert (
        b"unused variable" in compared.gcc.stderr and str(project).encode() in compared.gcc.stderr
    )
    assert compared.shim.stderr == compared.gcc.stderr
    assert compared.remote, compared.moved


@pytest.mark.parametrize("mode", MODES)
def test_paths_written_with_dots(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    """git's CMakeLists.txt lies in contrib/buildsystems and names the tree
    `contrib/buildsystems/../..`: gcc keeps such names as written in __FILE__
    and in the dependency file, and so must the sandbox's."""
    project = write(
        tmp_path / "git",
        {
            "contrib/buildsystems/CMakeLists.txt": "# (not read)\n",
            "strbuf.h": "static const char *where = __FILE__;\n",
            "src/a.c": '#include "strbuf.h"\nconst char *f(void) { return where; }\n',
        },
    )
    cmake_dir = project / "contrib/buildsystems"
    build = tmp_path / "build"
    build.mkdir()
    (build / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={cmake_dir}\n")
    arguments = [
        f"-I{cmake_dir}/../..", "-O2", "-MD", "-MT", "a.o", "-MF", "a.o.d",
        "-c", f"{cmake_dir}/../../src/a.c", "-o", "a.o",
    ]  # fmt: skip
    compared = compile_both(build, arguments, shim_env, mode, others=("a.o.d",))
    assert compared.actual == compared.expected
    assert b"buildsystems/../../strbuf.h" in compared.expected
    assert compared.others["a.o.d"][0] == compared.others["a.o.d"][1]
    assert compared.remote, compared.moved
