#!/usr/bin/env python3
"""CMake + Ninja on a real project (git's contrib/buildsystems/CMakeLists.txt,
about 500 C files, from Debian's source package): plain Ninja, ccache (with
base_dir), distcc and reapi-cc side by side, all at -j equal to the cores.

Each side configures a fresh out-of-source build directory at the same path
(plain gcc as the compiler; the side's tool as CMAKE_C_COMPILER_LAUNCHER), then
times `ninja` alone:

  ninja         plain gcc
  ccache        cold (empty cache), then `ninja clean` and a fully cached rebuild;
                CCACHE_BASEDIR covers the source and the build directory
  distcc        distccd on 127.0.0.1 (plain mode: preprocessed sources sent)
  reapi deps    a fresh `reapi serve` with local bubblewrap workers and a fresh
                agent: cold, then `ninja clean` and a fully cached rebuild
  reapi scan    the same in REAPI_CC_MODE=scan

reapi's objects are compared with plain Ninja's, byte for byte, every round.
The share of compiles that ran remotely or hit the cache comes from
`reapi-cc --stats` (a link is not a compile), with every local reason.

    python benchmarks/cmake_bench.py [--rounds 3] [--work /tmp/cmake-bench]

Needs cmake, ninja, ccache, distcc, gcc, and git's build dependencies
(`apt-get install cmake ninja-build ccache distcc zlib1g-dev libcurl4-openssl-dev
libexpat1-dev libssl-dev gettext`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.make_bench import (  # noqa: E402
    JOBS,
    agent_cpu,
    free_port,
    git_source,
    reapi_stats,
    stop_agent,
    venv_reapi_cc,
    wait_for_port,
)
from tests.helpers import ServerProcess  # noqa: E402

TOOLS = ("cmake", "ninja", "ccache", "distcc", "distccd", "gcc", "msgfmt")


class Bench:
    def __init__(self, work: Path, source: Path, reapi_cc: str) -> None:
        self.work = work
        self.source = source
        self.tree = work / "git"  # the source tree, copied fresh each time
        self.build = work / "build"  # out of source
        self.reapi_cc = reapi_cc

    def configure(self, env: dict[str, str], launcher: str | None = None) -> None:
        shutil.rmtree(self.tree, ignore_errors=True)
        shutil.rmtree(self.build, ignore_errors=True)
        shutil.copytree(self.source, self.tree, symlinks=True)
        options = [f"-DCMAKE_C_COMPILER_LAUNCHER={launcher}"] if launcher else []
        subprocess.run(
            ["cmake", "-S", str(self.tree / "contrib/buildsystems"), "-B", str(self.build),
             "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_C_COMPILER=gcc", *options],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def ninja(self, env: dict[str, str], *targets: str) -> float:
        start = time.perf_counter()
        subprocess.run(
            ["ninja", "-C", str(self.build), f"-j{JOBS}", *targets],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return time.perf_counter() - start

    def objects(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.build)): p.read_bytes() for p in self.build.rglob("*.o")}

    # One run of each side; each returns its timings.

    def plain(self) -> dict[str, Any]:
        env = dict(os.environ)
        self.configure(env)
        result: dict[str, Any] = {"cold": self.ninja(env)}
        self.reference = self.objects()
        return result

    def ccache(self) -> dict[str, Any]:
        cache = self.work / "ccache"
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, CCACHE_DIR=str(cache), CCACHE_BASEDIR=str(self.work))
        self.configure(env, "ccache")
        cold = self.ninja(env)
        self.ninja(env, "clean")
        return {"cold": cold, "cached": self.ninja(env)}

    def distcc(self) -> dict[str, Any]:
        port = free_port()
        daemon = subprocess.Popen(
            ["distccd", "--daemon", "--no-detach", "--allow", "127.0.0.1", "--listen",
             "127.0.0.1", "--port", str(port), "--jobs", str(JOBS), "--log-level", "error",
             "--log-stderr"],
        )  # fmt: skip
        wait_for_port(port)
        (self.work / "distcc").mkdir(exist_ok=True)
        # No silent local fallback: a distcc that cannot reach distccd fails the run.
        env = dict(
            os.environ,
            DISTCC_HOSTS=f"127.0.0.1:{port}/{JOBS}",
            DISTCC_DIR=str(self.work / "distcc"),
            DISTCC_FALLBACK="0",
            DISTCC_SKIP_LOCAL_RETRY="1",
        )
        try:
            self.configure(env, "distcc")
            return {"cold": self.ninja(env)}
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()

    def reapi(self, mode: str) -> dict[str, Any]:
        storage = self.work / "reapi-storage"
        home = self.work / "reapi-home"
        server_home = self.work / "server-home"
        # Cold: the CAS, the action cache, the agent's state and the workers'
        # local caches of input files all start empty.
        for path in (storage, home, server_home):
            shutil.rmtree(path, ignore_errors=True)
        server = ServerProcess(storage, workers=JOBS, home=server_home)
        env = dict(
            os.environ,
            REAPI_HOME=str(home),
            REAPI_CC_MODE=mode,
            REAPI_SERVER=f"grpc://127.0.0.1:{server.port}",
        )
        try:
            self.configure(env, self.reapi_cc)
            subprocess.run([self.reapi_cc, "--zero-stats"], env=env, capture_output=True)
            agent = int((home / "shim" / "agent.pid").read_text())
            native = home / "shim" / "reapi-cc-native.sha256"
            deadline = time.monotonic() + 60
            while not native.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            cpu = agent_cpu(agent)
            result: dict[str, Any] = {"cold": self.ninja(env)}
            cold = self.stats(env)
            result["agent_cpu_ms_per_compile"] = (
                (agent_cpu(agent) - cpu) * 1000 / max(1, cold["invocations"])
            )
            result["identical"] = self.objects() == self.reference
            result["cold_stats"] = cold
            self.ninja(env, "clean")
            subprocess.run([self.reapi_cc, "--zero-stats"], env=env, capture_output=True)
            result["cached"] = self.ninja(env)
            result["cached_stats"] = self.stats(env)
            return result
        finally:
            stop_agent(home)
            server.stop()

    def stats(self, env: dict[str, str]) -> dict[str, Any]:
        return reapi_stats(self.reapi_cc, env)


def share(stats: dict[str, Any]) -> tuple[float, int, dict[str, int]]:
    """The share of compiles (invocations that are not links) that ran
    remotely or hit the cache; the compiles; the local reasons but links."""
    reasons = dict(stats.get("local_reasons", {}))
    links = reasons.pop("link", 0)
    compiles = stats["invocations"] - links
    served = stats["remote_executions"] + stats["cache_hits"]
    return served / compiles if compiles else 0.0, compiles, reasons


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(run[key]) for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cmake-bench"))
    args = parser.parse_args()
    for tool in TOOLS:
        if shutil.which(tool) is None:
            sys.exit(f"cmake_bench: {tool} is not installed (see this script's docstring)")
    args.work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.work, git_source(), venv_reapi_cc(args.work))
    sides: dict[str, Callable[[], dict[str, Any]]] = {
        "ninja": bench.plain,
        "ccache": bench.ccache,
        "distcc": bench.distcc,
        "deps": lambda: bench.reapi("deps"),
        "scan": lambda: bench.reapi("scan"),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name, side in sides.items():
            runs[name].append(side())
            shown = {k: v for k, v in runs[name][-1].items() if not k.endswith("_stats")}
            print(f"round {round_ + 1} {name}: {shown}", flush=True)
    for mode in ("deps", "scan"):
        for run in runs[mode]:
            assert run["identical"], f"{mode}: objects differ from plain Ninja's"

    ninja = median(runs["ninja"], "cold")
    distcc = median(runs["distcc"], "cold")
    ccache_cached = median(runs["ccache"], "cached")
    print(f"\n-j{JOBS}, medians of {args.rounds} rounds; objects identical to plain Ninja's")
    print(f"{'':34} {'seconds':>8} {'ratio':>8}")
    print(f"{'ninja (plain gcc) cold':34} {ninja:8.2f} {1.0:8.2f}")
    print(f"{'distcc cold / ninja':34} {distcc:8.2f} {distcc / ninja:8.2f}")
    ccache_cold = median(runs["ccache"], "cold")
    print(f"{'ccache cold / ninja':34} {ccache_cold:8.2f} {ccache_cold / ninja:8.2f}")
    print(f"{'ccache cached':34} {ccache_cached:8.2f}")
    for mode in ("deps", "scan"):
        cold = median(runs[mode], "cold")
        cached = median(runs[mode], "cached")
        per_round = [r["cold"] / d["cold"] for r, d in zip(runs[mode], runs["distcc"], strict=True)]
        print(f"{'reapi ' + mode + ' cold / distcc':34} {cold:8.2f} {cold / distcc:8.2f}"
              f"   (per round {', '.join(f'{x:.2f}' for x in per_round)})")  # fmt: skip
        print(f"{'reapi ' + mode + ' cold / ninja':34} {cold:8.2f} {cold / ninja:8.2f}")
        print(f"{'reapi ' + mode + ' cached / ccache':34} {cached:8.2f} "
              f"{cached / ccache_cached:8.2f}")  # fmt: skip
        fraction, compiles, reasons = share(runs[mode][-1]["cold_stats"])
        print(f"  {mode}: {fraction:.1%} of {compiles} compiles remote or cached; local: "
              f"{reasons or 'none'}; agent CPU {median(runs[mode], 'agent_cpu_ms_per_compile'):.1f}"
              f" ms/compile")  # fmt: skip
        cached_fraction, _, cached_reasons = share(runs[mode][-1]["cached_stats"])
        print(f"  {mode} cached rebuild: {cached_fraction:.1%} hits; local: "
              f"{cached_reasons or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
