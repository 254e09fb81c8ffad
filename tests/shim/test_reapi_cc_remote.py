"""make through reapi-cc against the real server and a real worker: objects
byte-identical to plain gcc, cache hits after `make clean` and in another
checkout, compile errors as gcc reports them, and a dead server changes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess

MAKEFILE = """\
CFLAGS ?= -O2 -Wall
OBJS = main.o util.o lib/strings.o
app: $(OBJS)
\t$(CC) -o $@ $(OBJS)
%.o: %.c
\t$(CC) $(CFLAGS) -Iinclude -MMD -MP -c $< -o $@
clean:
\trm -f app $(OBJS) $(OBJS:.o=.d)
-include $(OBJS:.o=.d)
"""
FILES = {
    "Makefile": MAKEFILE,
    "include/config.h": '#define GREETING "hello"\n',
    "util.h": "int twice(int x);\n",
    "main.c": '#include <stdio.h>\n#include "config.h"\n#include "util.h"\n'
    "const char *shout(const char *s);\n"
    'int main(void) { printf("%s %d %s\\n", GREETING, twice(21), shout("x")); '
    "return 0; }\n",
    "util.c": '#include "util.h"\nint twice(int x) { return 2 * x; }\n',
    "lib/strings.c": "#include <ctype.h>\nstatic char b[64];\nconst char *shout(const char *s)"
    " { int i = 0; for (; s[i] && i < 63; i++) b[i] = (char)toupper(s[i]); "
    "b[i] = 0; return b; }\n",
}
OBJECTS = ["main.o", "util.o", "lib/strings.o"]


def write_project(root: Path) -> Path:
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def make(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-j2", *args], cwd=project, env=env, capture_output=True, text=True, check=True
    )


def objects(project: Path) -> dict[str, bytes]:
    return {name: (project / name).read_bytes() for name in [*OBJECTS, "main.d"]}


def stats(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        ["reapi-cc", "--stats", "--json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["deps", "cpp", "scan"])
def test_make_through_the_shim(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    shim_env = shim_env | {"REAPI_CC_MODE": mode}
    plain_env = {k: v for k, v in shim_env.items() if k != "CC"} | {"CC": "gcc"}
    reference = write_project(tmp_path / "reference")
    make(reference, plain_env)
    expected = objects(reference)

    project = write_project(tmp_path / "project")
    make(project, shim_env)
    assert objects(project) == expected
    assert subprocess.run([project / "app"], capture_output=True, text=True).stdout == (
        "hello 42 X\n"
    )
    first = stats(shim_env)
    assert first["remote_executions"] == 3, first
    assert first["scan_fallbacks"] == 0, first
    assert first["local_reasons"].get("link") == 1, first

    make(project, shim_env, "clean")
    make(project, shim_env)
    assert objects(project) == expected
    again = stats(shim_env)
    assert again["cache_hits"] - first["cache_hits"] == 3, again
    assert again["remote_executions"] == first["remote_executions"]

    elsewhere = write_project(tmp_path / "second" / "checkout")
    make(elsewhere, shim_env)
    assert objects(elsewhere) == expected
    assert stats(shim_env)["cache_hits"] - again["cache_hits"] == 3


@pytest.mark.parametrize("mode", ["deps", "scan"])
def test_direct_mode(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    """A rebuild goes straight to the cache; an edited header, and a new one
    that shadows another, are seen: objects always match gcc's."""
    shim_env = shim_env | {"REAPI_CC_MODE": mode}
    plain_env = {k: v for k, v in shim_env.items() if k != "CC"} | {"CC": "gcc"}
    project = write_project(tmp_path / "project")
    reference = write_project(tmp_path / "reference")
    time.sleep(2.1)  # files changed in the last 2 s are not trusted by direct mode

    def build_both() -> None:
        for tree, env in ((reference, plain_env), (project, shim_env)):
            make(tree, env, "clean")
            make(tree, env)
        assert objects(project) == objects(reference)

    build_both()
    first = stats(shim_env)
    assert (first["remote_executions"], first["direct_hits"]) == (3, 0), first
    build_both()
    again = stats(shim_env)
    assert again["direct_hits"] == 3, again
    assert again["remote_executions"] == 3, again

    for tree in (project, reference):  # an edit, then a header shadowing include/config.h
        (tree / "include/config.h").write_text('#define GREETING "howdy"\n')
    time.sleep(2.1)  # so that main.c's new action is remembered
    build_both()
    edited = stats(shim_env)
    assert edited["remote_executions"] == 4, edited  # main.c again; the others unchanged
    assert edited["direct_hits"] == 5, edited
    for tree in (project, reference):
        (tree / "config.h").write_text('#define GREETING "shadowed"\n')
    build_both()
    shadowing = stats(shim_env)
    assert shadowing["remote_executions"] == 5, shadowing
    assert shadowing["direct_hits"] == 7, shadowing
    shadowed = subprocess.run([project / "app"], capture_output=True, text=True).stdout
    assert shadowed == "shadowed 42 X\n"


@pytest.mark.parametrize("mode", ["deps", "scan"])
def test_only_blobs_the_server_lacks_are_uploaded(
    tmp_path: Path, shim_env: dict[str, str], mode: str
) -> None:
    """Another user's agent, which knows nothing of what the server holds,
    builds a second checkout: every blob is already there, so none is sent."""
    shim_env = shim_env | {"REAPI_CC_MODE": mode}
    make(write_project(tmp_path / "project"), shim_env)
    assert stats(shim_env)["bytes_uploaded"] > 0
    other_home = tmp_path / "other-home"
    other_env = shim_env | {"REAPI_HOME": str(other_home)}
    try:
        make(write_project(tmp_path / "other" / "checkout"), other_env)
        other = stats(other_env)
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int((other_home / "shim" / "agent.pid").read_text()), signal.SIGTERM)
    assert other["cache_hits"] == 3, other
    assert other["bytes_uploaded"] == 0, other


@pytest.mark.parametrize("mode", ["deps", "cpp", "scan"])
def test_debug_builds_match_too(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    """Debug info names the compile's directory, so compare builds in one place."""
    shim_env = shim_env | {"REAPI_CC_MODE": mode}
    flags = "CFLAGS=-O1 -g"
    plain_env = {k: v for k, v in shim_env.items() if k != "CC"} | {"CC": "gcc"}
    project = write_project(tmp_path / "project")
    make(project, plain_env, flags)
    expected = objects(project)
    make(project, plain_env, "clean")
    make(project, shim_env, flags)
    assert objects(project) == expected
    assert stats(shim_env)["remote_executions"] == 3


@pytest.mark.parametrize("mode", ["deps", "scan"])
def test_compile_errors_are_gccs_own(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    shim_env = shim_env | {"REAPI_CC_MODE": mode}
    project = write_project(tmp_path / "project")
    (project / "util.c").write_text('#include "util.h"\nint twice(int x) { return y; }\n')
    command = ["-O2", "-Iinclude", "-c", "util.c", "-o", "util.o"]
    local = subprocess.run(["gcc", *command], cwd=project, capture_output=True, text=True)
    shim = subprocess.run(
        ["reapi-cc", "gcc", *command], cwd=project, env=shim_env, capture_output=True, text=True
    )
    assert local.returncode != 0
    assert (shim.returncode, shim.stderr) == (local.returncode, local.stderr)


def test_a_dead_server_changes_nothing(tmp_path: Path, shim_env: dict[str, str]) -> None:
    plain_env = {k: v for k, v in shim_env.items() if k != "CC"} | {"CC": "gcc"}
    reference = write_project(tmp_path / "reference")
    make(reference, plain_env)
    dead = shim_env | {"REAPI_SERVER": "grpc://127.0.0.1:1"}
    project = write_project(tmp_path / "project")
    make(project, dead)
    assert objects(project) == objects(reference)
    assert stats(dead)["local_reasons"].get("remote-error") == 3


def test_server_killed_mid_build(tmp_path: Path, reapi_home: Path) -> None:
    """The server dies while make runs: the build completes, objects identical."""
    many = {f"gen{n}.c": f"int gen{n}(int x) {{ return x * {n} + {n}; }}\n" for n in range(40)}
    plain = tmp_path / "plain"
    shimmed = tmp_path / "shimmed"
    makefile = "OBJS = " + " ".join(f"gen{n}.o" for n in range(40)) + "\nall: $(OBJS)\n"
    for tree in (plain, shimmed):
        tree.mkdir()
        (tree / "Makefile").write_text(makefile)
        for name, text in many.items():
            (tree / name).write_text(text)
    subprocess.run(["make", "-j2", "CC=gcc"], cwd=plain, check=True, capture_output=True)
    server = ServerProcess(tmp_path / "storage", workers=1)
    env = dict(os.environ, REAPI_SERVER=f"grpc://{server.address}", REAPI_HOME=str(reapi_home))
    build = subprocess.Popen(
        ["make", "-j2", f"CC={shutil.which('reapi-cc')} gcc"],
        cwd=shimmed,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    while not any(shimmed.glob("*.o")) and build.poll() is None:
        time.sleep(0.01)
    server.kill()
    _out, err = build.communicate(timeout=300)
    assert build.returncode == 0, err
    for n in range(40):
        assert (shimmed / f"gen{n}.o").read_bytes() == (plain / f"gen{n}.o").read_bytes()
    reasons = stats(env)["local_reasons"]
    assert reasons.get("remote-error", 0) > 0, reasons


def test_split_dwarf_output(tmp_path: Path, shim_env: dict[str, str]) -> None:
    project = write_project(tmp_path / "project")
    command = ["-O1", "-gsplit-dwarf", "-Iinclude", "-c", "util.c", "-o", "out/util.o"]
    (project / "out").mkdir()
    subprocess.run(["gcc", *command], cwd=project, check=True)
    expected = {name: (project / name).read_bytes() for name in ("out/util.o", "out/util.dwo")}
    for name in expected:
        (project / name).unlink()
    subprocess.run(["reapi-cc", "gcc", *command], cwd=project, env=shim_env, check=True)
    assert {name: (project / name).read_bytes() for name in expected} == expected
    assert stats(shim_env)["remote_executions"] == 1


def test_stats_and_zero_stats(tmp_path: Path, shim_env: dict[str, str]) -> None:
    project = write_project(tmp_path / "project")
    make(project, shim_env)
    counted = stats(shim_env)
    assert set(counted) >= {
        "invocations",
        "cache_hits",
        "remote_executions",
        "local_fallbacks",
        "local_reasons",
        "bytes_uploaded",
        "bytes_downloaded",
    }
    assert counted["invocations"] == 4 and counted["bytes_uploaded"] > 0
    assert counted["bytes_downloaded"] > 0
    human = subprocess.run(
        ["reapi-cc", "--stats"], env=shim_env, capture_output=True, text=True, check=True
    ).stdout
    assert "remote executions" in human and "local: link" in human
    subprocess.run(["reapi-cc", "--zero-stats"], env=shim_env, check=True)
    zeroed = stats(shim_env)
    assert zeroed["invocations"] == 0 and zeroed["local_reasons"] == {}


def test_cxx_and_masquerade_symlinks(tmp_path: Path, shim_env: dict[str, str]) -> None:
    """`g++` through the shim, reached as a symlink named like the compiler on PATH."""
    sources = {
        "shapes.hpp": "#pragma once\n#include <string>\n#include <vector>\n"
        "std::vector<std::string> names(int n);\n",
        "shapes.cpp": '#include "shapes.hpp"\nstd::vector<std::string> names(int n) {\n'
        "  std::vector<std::string> out;\n  for (int i = 0; i < n; ++i) "
        'out.push_back("shape" + std::to_string(i));\n  return out;\n}\n',
        "main.cpp": '#include <iostream>\n#include "shapes.hpp"\nint main() {\n'
        '  for (const auto& n : names(3)) std::cout << n << "\\n";\n}\n',
        "Makefile": "app: main.o shapes.o\n\t$(CXX) -o $@ $^\n"
        "%.o: %.cpp\n\t$(CXX) -O2 -std=c++17 -MMD -c $< -o $@\n",
    }
    trees = {}
    for name in ("plain", "shimmed"):
        trees[name] = tmp_path / name
        trees[name].mkdir()
        for file, text in sources.items():
            (trees[name] / file).write_text(text)
    subprocess.run(["make", "-j2", "CXX=g++"], cwd=trees["plain"], check=True, capture_output=True)
    masquerade = tmp_path / "bin"
    masquerade.mkdir()
    (masquerade / "g++").symlink_to(shutil.which("reapi-cc") or "reapi-cc")
    env = shim_env | {"PATH": f"{masquerade}:{shim_env['PATH']}"}
    subprocess.run(
        ["make", "-j2", "CXX=g++"], cwd=trees["shimmed"], env=env, check=True, capture_output=True
    )
    for name in ("main.o", "shapes.o", "main.d", "shapes.d"):
        assert (trees["shimmed"] / name).read_bytes() == (trees["plain"] / name).read_bytes()
    run = subprocess.run([trees["shimmed"] / "app"], capture_output=True, text=True)
    assert run.stdout == "shape0\nshape1\nshape2\n"
    assert stats(env)["remote_executions"] == 2
