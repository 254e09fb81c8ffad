"""The system-file manifest the agent builds for a compile (shim/agent.py), in
`deps` and `scan` modes, with the real gcc and the real system headers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from reapi.core.conventions import ABSENT, PROVIDED_DIRS
from shim.agent import Agent
from shim.classify import RemoteCompile, classify
from shim.layout import lay_out
from shim.manifest import MANIFEST
from shim.modes import Compile
from shim.scan import Scanner, search_arguments
from shim.stats import Stats


def prepare(agent: Agent, compile: Compile) -> tuple[dict[str, bytes], bool]:
    """The compile's input tree (files made here) and whether direct mode may take it."""
    inputs = asyncio.run(agent.modes[compile.mode].find(compile))
    spec = lay_out(compile, inputs, agent.digests, agent.manifests, None).spec
    return spec.contents, inputs.scanned is not None and "src/a.c" in spec.files


@pytest.mark.parametrize("mode", ["deps", "scan"])
def test_system_places_tried_before_a_header_must_be_absent(tmp_path: Path, mode: str) -> None:
    """A worker with a stdio.h in /usr/local/include (a directory gcc searches
    before /usr/include) would compile something else: the manifest makes it
    refuse. Project places are not listed: the worker's tree has only what
    was sent."""
    (tmp_path / "a.c").write_text('#include <stdio.h>\n#include "a.h"\n')
    (tmp_path / "include").mkdir()
    (tmp_path / "include/a.h").write_text("\n")
    arguments = ["-Iinclude", "-c", "a.c", "-o", "a.o"]
    decision = classify(arguments)
    assert isinstance(decision, RemoteCompile)
    agent = Agent(Stats(tmp_path / "stats.json"))
    env = dict(os.environ, REAPI_CC_MODE=mode)
    cwd = str(tmp_path)
    contents, direct = prepare(
        agent, Compile(cwd, "/usr/bin/gcc", decision, env, mode, PROVIDED_DIRS)
    )
    manifest = contents[MANIFEST].decode().splitlines()
    absent = {line.split(" ", 2)[2] for line in manifest if line.startswith(f"{ABSENT} ")}
    read = {line.split(" ", 2)[2] for line in manifest if not line.startswith(f"{ABSENT} ")}
    search = search_arguments(decision.arguments).search
    chain = asyncio.run(Scanner().search_path("/usr/bin/gcc", "c", search, cwd, env)).bracket
    before = [d for d in chain[: chain.index("/usr/include")] if d.startswith("/usr/")]
    assert before, chain  # gcc's own directories come first
    assert {f"{d}/stdio.h" for d in before} <= absent
    assert "/usr/include/stdio.h" in read
    assert not any(path.startswith(cwd) for path in absent | read)
    assert direct  # and direct mode may take it again


def test_a_scan_that_fails_in_deps_mode_only_costs_direct_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.c").write_text("#include <stdio.h>\n")
    decision = classify(["-c", "a.c", "-o", "a.o"])
    assert isinstance(decision, RemoteCompile)
    agent = Agent(Stats(tmp_path / "stats.json"))

    def broken(*args: object) -> None:
        raise OSError("a header vanished mid-scan")

    monkeypatch.setattr(agent.scanner, "scan", broken)
    compile = Compile(str(tmp_path), "/usr/bin/gcc", decision, {}, "deps", PROVIDED_DIRS)
    inputs = asyncio.run(agent.modes["deps"].find(compile))
    spec = lay_out(compile, inputs, agent.digests, agent.manifests, None).spec
    assert "src/a.c" in spec.files and inputs.scanned is None
    assert b"/usr/include/stdio.h" in spec.contents[MANIFEST]  # -M's list, as before
