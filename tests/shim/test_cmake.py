"""CMake builds through reapi-cc: real projects from Debian's sources (zlib,
cJSON, libyaml), out-of-source, with the Ninja and the Unix Makefiles
generators, against the real server and worker.

Each build is made twice at the same path, with plain gcc and through
reapi-cc: every object must be byte-identical, the project's own tests pass
(ctest), nearly every compile is remote (the local ones are links and
CMake's probing of the compiler), and the build tree is up to date for the
generator (the dependency files name local paths). A second build directory
elsewhere is all cache hits.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.shim.compiles import stats
from tests.shim.test_real_projects import debian_source

# Package, files its CMakeLists.txt wants that Debian's source lacks, options.
PROJECTS: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "zlib": ("zlib", {"win32/zlib1.rc": ""}, []),  # (listed for every platform)
    "cjson": ("cjson", {}, ["-DENABLE_CJSON_TEST=ON"]),
    "libyaml": ("libyaml", {}, []),
}
GENERATORS = {"ninja": "Ninja", "make": "Unix Makefiles"}
# Why a compile may stay local in a CMake build: links, and CMake's probing
# of the compiler (-v for its ABI, -print-sysroot, flags and headers it
# checks for that gcc lacks: those fail here as they would anyway).
CMAKE_LOCAL_REASONS = {"link", "verbose", "query", "preprocessor-failed", "compile-error"}


def source_tree(tmp_path: Path, project: str) -> Path:
    package, extra, _ = PROJECTS[project]
    tree = Path(shutil.copytree(debian_source(package), tmp_path / "src", symlinks=True))
    for name, text in extra.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    return tree


def build(
    source: Path, tree: Path, generator: str, env: dict[str, str], options: list[str]
) -> None:
    for command in (
        ["cmake", "-S", str(source), "-B", str(tree), "-G", generator,
         "-DCMAKE_BUILD_TYPE=Release", *options],
        ["cmake", "--build", str(tree), "-j2"],
    ):  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def objects(tree: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(tree)): path.read_bytes()
        for path in sorted(tree.rglob("*.o"))
        if "CMakeScratch" not in path.parts
    }


def through_reapi_cc(env: dict[str, str], launcher: bool = False) -> dict[str, str]:
    reapi_cc = shutil.which("reapi-cc")
    assert reapi_cc is not None
    if launcher:
        return {k: v for k, v in env.items() if k != "CC"} | {
            "CMAKE_C_COMPILER_LAUNCHER": reapi_cc,
            "CC": "gcc",
        }
    return env | {"CC": f"{reapi_cc} gcc"}


def up_to_date(tree: Path, generator: str) -> None:
    """The generator finds nothing to do: the dependency files reapi-cc wrote
    name the files as CMake and Ninja expect them."""
    if generator == "Ninja":
        done = subprocess.run(
            ["ninja", "-C", str(tree), "-n", "-d", "explain"], capture_output=True, text=True
        )
        assert "no work to do" in done.stdout, done.stdout + done.stderr
    else:
        done = subprocess.run(
            ["cmake", "--build", str(tree)], capture_output=True, text=True, check=True
        )
        assert "Building C object" not in done.stdout, done.stdout


def check_stats(moved: dict[str, Any], compiled: int) -> None:
    reasons = moved["local_reasons"]
    assert set(reasons) <= CMAKE_LOCAL_REASONS, reasons
    remote = moved["remote_executions"] + moved["cache_hits"]
    assert remote >= compiled, moved  # every object, and most of CMake's own compiles


@pytest.mark.slow
@pytest.mark.parametrize("generator", sorted(GENERATORS))
@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_cmake_project(
    tmp_path: Path, shim_env: dict[str, str], project: str, generator: str
) -> None:
    cmake_generator = GENERATORS[generator]
    options = PROJECTS[project][2]
    source = source_tree(tmp_path, project)
    tree = tmp_path / "build"
    plain = shim_env | {"CC": "gcc"}
    build(source, tree, cmake_generator, plain, options)
    expected = objects(tree)
    assert len(expected) >= 4
    shutil.move(tree, tmp_path / "reference")

    env = through_reapi_cc(shim_env)
    subprocess.run(["reapi-cc", "--zero-stats"], env=env, check=True, capture_output=True)
    build(source, tree, cmake_generator, env, options)
    assert objects(tree) == expected
    first = stats(env)
    check_stats(first, len(expected))
    tests = subprocess.run(["ctest", "--output-on-failure"], cwd=tree, capture_output=True)
    assert tests.returncode == 0, tests.stdout.decode()[-3000:]
    up_to_date(tree, cmake_generator)

    # Another build directory, elsewhere: every object a cache hit.
    subprocess.run(["reapi-cc", "--zero-stats"], env=env, check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere" / "b2"
    build(source, elsewhere, cmake_generator, env, options)
    assert objects(elsewhere) == expected
    second = stats(env)
    assert second["cache_hits"] >= len(expected), second


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "mode", "options"),
    [
        ("launcher", "scan", []),
        ("deps", "deps", []),
        ("debug", "scan", ["-DCMAKE_BUILD_TYPE=Debug"]),
    ],
)
def test_cmake_variants(
    tmp_path: Path, shim_env: dict[str, str], variant: str, mode: str, options: list[str]
) -> None:
    """CMAKE_C_COMPILER_LAUNCHER=reapi-cc as well as CC; deps mode (scan is
    the default); a debug build (objects name the build's paths: the same
    paths, the same bytes)."""
    source = source_tree(tmp_path, "libyaml")
    tree = tmp_path / "build"
    build(source, tree, "Ninja", shim_env | {"CC": "gcc"}, options)
    expected = objects(tree)
    shutil.move(tree, tmp_path / "reference")
    env = through_reapi_cc(shim_env, launcher=variant == "launcher") | {"REAPI_CC_MODE": mode}
    subprocess.run(["reapi-cc", "--zero-stats"], env=env, check=True, capture_output=True)
    build(source, tree, "Ninja", env, options)
    assert objects(tree) == expected
    check_stats(stats(env), len(expected))
    up_to_date(tree, "Ninja")
