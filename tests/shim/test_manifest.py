"""The system-file manifest the agent builds for a compile (shim/agent.py), in
`deps` and `scan` modes, with the real gcc and the real system headers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from reapi.conventions import ABSENT
from shim.agent import MANIFEST, Agent, Stats
from shim.classify import RemoteCompile, classify
from shim.scan import Scanner, search_arguments


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
    build = agent._prepare_scan if mode == "scan" else agent._prepare_deps
    prepared = asyncio.run(build(cwd, "/usr/bin/gcc", decision, env))
    manifest = prepared.contents[MANIFEST].decode().splitlines()
    absent = {line.split(" ", 2)[2] for line in manifest if line.startswith(f"{ABSENT} ")}
    read = {line.split(" ", 2)[2] for line in manifest if not line.startswith(f"{ABSENT} ")}
    search = search_arguments(decision.arguments).search
    chain = asyncio.run(Scanner().search_path("/usr/bin/gcc", "c", search, cwd, env)).bracket
    before = [d for d in chain[: chain.index("/usr/include")] if d.startswith("/usr/")]
    assert before, chain  # gcc's own directories come first
    assert {f"{d}/stdio.h" for d in before} <= absent
    assert "/usr/include/stdio.h" in read
    assert not any(path.startswith(cwd) for path in absent | read)
    assert prepared.depends is not None  # and direct mode may take it again


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
    prepared = asyncio.run(agent._prepare_deps(str(tmp_path), "/usr/bin/gcc", decision, {}))
    assert "a.c" in prepared.files and prepared.depends is None
    assert b"/usr/include/stdio.h" in prepared.contents[MANIFEST]  # -M's list, as before
