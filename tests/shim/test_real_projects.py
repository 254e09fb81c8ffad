"""Real C projects from Debian's source packages, built with make through reapi-cc
against the real server and worker: every object byte-identical to a plain
build, the project's own tests pass, and rebuilds (after `make clean`, or in a
copy of the tree at another path) are all cache hits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

DEBSRC = Path(__file__).resolve().parents[3] / "shared" / "tools" / "debsrc.sh"


def debian_source(name: str) -> Path:
    """The unpacked source of Debian package `name` (downloaded once per machine)."""
    script = DEBSRC if DEBSRC.exists() else Path("/work/shared/tools/debsrc.sh")
    result = subprocess.run(
        ["bash", str(script), name], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"debsrc.sh {name} failed: {result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_cjson(tree: Path, cc: str, env: dict[str, str] | None = None) -> None:
    """cJSON's Makefile links cJSON.o into libcjson_utils without depending on it,
    so `make -j` races: compile the objects in parallel, then link serially."""
    run(["make", "-j2", cc, "cJSON.o", "cJSON_Utils.o"], tree, env)
    run(["make", cc, "all"], tree, env)


def shim_env_for(address: str, home: Path) -> dict[str, str]:
    """make's environment for builds through reapi-cc against the server at
    `address`, with the agent's state in `home`."""
    shim = f"{shutil.which('reapi-cc')} gcc"
    return dict(os.environ, REAPI_SERVER=f"grpc://{address}", REAPI_HOME=str(home), CC=shim)


def stop_agents(*homes: Path) -> None:
    """Stop the reapi-cc agents kept in `homes`, if they are running."""
    for home in homes:
        pid_file = home / "shim" / "agent.pid"
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def stats(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        ["reapi-cc", "--stats", "--json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def objects(tree: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*.o"))}


@pytest.mark.slow
def test_cjson(tmp_path: Path, shim_env: dict[str, str]) -> None:
    source = debian_source("cjson")
    plain = shutil.copytree(source, tmp_path / "plain")
    build_cjson(plain, "CC=gcc -std=c89")
    expected = objects(plain)
    assert set(expected) == {"cJSON.o", "cJSON_Utils.o"}

    shim_cc = f"CC={shutil.which('reapi-cc')} gcc -std=c89"
    tree = shutil.copytree(source, tmp_path / "tree")
    build_cjson(tree, shim_cc, shim_env)
    assert objects(tree) == expected
    test = subprocess.run(
        ["make", shim_cc, "test"], cwd=tree, env=shim_env, capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr
    first = stats(shim_env)
    assert first["remote_executions"] == 2, first

    run(["make", "clean"], tree)
    build_cjson(tree, shim_cc, shim_env)
    assert objects(tree) == expected
    elsewhere = shutil.copytree(source, tmp_path / "another" / "path")
    build_cjson(elsewhere, shim_cc, shim_env)
    assert objects(elsewhere) == expected
    after = stats(shim_env)
    assert after["cache_hits"] - first["cache_hits"] == 4, after
    assert after["remote_executions"] == first["remote_executions"]
    assert os.path.exists(tree / "cJSON_test")


@pytest.mark.slow
def test_zlib_configure_and_make(tmp_path: Path, shim_env: dict[str, str]) -> None:
    source = debian_source("zlib")
    shim = f"{shutil.which('reapi-cc')} gcc"

    def configure_and_build(tree: Path, cc: str, env: dict[str, str] | None) -> dict[str, str]:
        run(["env", f"CC={cc}", "./configure"], tree, env)
        configured = {
            name: (tree / name).read_text().replace(cc, "CC") for name in ("Makefile", "zconf.h")
        }
        run(["make", "-j2"], tree, env)
        return configured

    plain = shutil.copytree(source, tmp_path / "plain")
    expected_config = configure_and_build(plain, "gcc", None)
    expected = objects(plain)
    assert len(expected) > 15

    tree = shutil.copytree(source, tmp_path / "tree")
    assert configure_and_build(tree, shim, shim_env) == expected_config
    assert objects(tree) == expected
    run(["make", "test"], tree, shim_env)
    first = stats(shim_env)
    assert first["remote_executions"] >= len(expected), first

    run(["make", "distclean"], tree, shim_env)
    configure_and_build(tree, shim, shim_env)
    assert objects(tree) == expected
    elsewhere = shutil.copytree(source, tmp_path / "another" / "place")
    configure_and_build(elsewhere, shim, shim_env)
    assert objects(elsewhere) == expected
    after = stats(shim_env)
    assert after["cache_hits"] - first["cache_hits"] >= 2 * len(expected), after


@pytest.mark.slow
def test_libyaml_autotools_in_scan_mode(tmp_path: Path, shim_env: dict[str, str]) -> None:
    """An autoconf-generated ./configure (libyaml's, made by autoreconf here) run
    through the shim decides exactly what it decides with plain gcc; the libtool
    build that follows, in `scan` mode, gives the same objects and passes `make check`."""
    pristine = shutil.copytree(debian_source("libyaml"), tmp_path / "pristine")
    run(["autoreconf", "-fi"], pristine)
    shim_env = shim_env | {"REAPI_CC_MODE": "scan"}
    shim = f"{shutil.which('reapi-cc')} gcc"

    def configure_and_build(tree: Path, cc: str, env: dict[str, str] | None) -> dict[str, str]:
        run(["./configure", f"CC={cc}"], tree, env)
        launcher = cc.removesuffix("gcc")  # "" for plain gcc
        configured = {
            name: (tree / name).read_text().replace(str(tree), "TREE").replace(launcher, "")
            for name in ("include/config.h", "src/Makefile", "libtool")
        }
        run(["make", "-j2"], tree, env)
        return configured

    # Both builds at one path: the objects carry debug info (-g -O2) naming it.
    plain = shutil.copytree(pristine, tmp_path / "build")
    expected_config = configure_and_build(plain, "gcc", None)
    expected = objects(plain)
    assert len(expected) >= 8 and expected_config
    shutil.rmtree(plain)

    tree = shutil.copytree(pristine, tmp_path / "build")
    assert configure_and_build(tree, shim, shim_env) == expected_config
    assert objects(tree) == expected
    run(["make", "-j2", "check"], tree, shim_env)
    after = stats(shim_env)
    assert after["remote_executions"] >= len(expected), after
    assert after["scan_fallbacks"] == 0, after
