#!/usr/bin/env python3
"""make on a real project (git, ~400 C files, from Debian's source package):
plain gcc, ccache, distcc and reapi-cc side by side, all at -j equal to the cores.

Each round, in a fresh copy of the tree at the same path:

  gcc           `make` with plain gcc
  ccache        cold (empty cache), then `make clean` and a fully cached rebuild
  distcc        distccd on 127.0.0.1 (plain mode: preprocessed sources sent)
  reapi deps    a fresh `reapi serve` with local bubblewrap workers and a fresh
                agent: cold, then `make clean` and a fully cached rebuild
  reapi scan    the same in REAPI_CC_MODE=scan

Once, through a byte-counting TCP proxy: what distcc and reapi-cc send for a
cold build, and for a rebuild after editing one .c file.

reapi-cc is installed into a virtualenv (not editable), as a user would have
it. Agent CPU is read from /proc (the agent and the preprocessors it ran).

    python benchmarks/make_bench.py [--rounds 3] [--work /tmp/make-bench]
    python benchmarks/make_bench.py --discovery-only   # deps vs scan, discovery alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.helpers import ServerProcess  # noqa: E402

JOBS = os.cpu_count() or 2
GIT_OPTIONS = [
    "NO_CURL=1", "NO_OPENSSL=1", "NO_EXPAT=1", "NO_GETTEXT=1", "NO_TCLTK=1",
    "NO_PERL=1", "NO_PYTHON=1",
]  # fmt: skip
EDITED = "builtin/add.c"


def git_source() -> Path:
    out = subprocess.run(
        ["bash", str(REPO_ROOT.parent / "shared/tools/debsrc.sh"), "git"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return Path(out[-1])


class Proxy:
    """A TCP relay to `target` port on loopback, counting bytes each way."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sent = self.received = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    if up:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Bench:
    def __init__(self, work: Path, source: Path, reapi_cc: str) -> None:
        self.work = work
        self.source = source
        self.tree = work / "tree"
        self.reapi_cc = reapi_cc

    def fresh_tree(self) -> None:
        shutil.rmtree(self.tree, ignore_errors=True)
        shutil.copytree(self.source, self.tree, symlinks=True)

    def make(self, cc: str, env: dict[str, str], *targets: str) -> float:
        start = time.perf_counter()
        subprocess.run(
            ["make", f"-j{JOBS}", f"CC={cc}", *GIT_OPTIONS, *(targets or ("git",))],
            cwd=self.tree, env=env, check=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return time.perf_counter() - start

    def clean(self, cc: str, env: dict[str, str]) -> None:
        self.make(cc, env, "clean")

    # One run of each side; each returns its timings.

    def gcc(self) -> dict[str, float]:
        self.fresh_tree()
        return {"cold": self.make("gcc", dict(os.environ))}

    def ccache(self) -> dict[str, float]:
        self.fresh_tree()
        cache = self.work / "ccache"
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, CCACHE_DIR=str(cache))
        cold = self.make("ccache gcc", env)
        self.clean("ccache gcc", env)
        return {"cold": cold, "cached": self.make("ccache gcc", env)}

    def distccd(self) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        daemon = subprocess.Popen(
            ["distccd", "--daemon", "--no-detach", "--allow", "127.0.0.1", "--listen",
             "127.0.0.1", "--port", str(port), "--jobs", str(JOBS), "--log-level", "error",
             "--log-stderr"],
        )  # fmt: skip
        wait_for_port(port)
        return daemon, port

    def distcc(self, proxy: bool = False) -> dict[str, float]:
        self.fresh_tree()
        daemon, port = self.distccd()
        relay = Proxy(port) if proxy else None
        hosts = f"127.0.0.1:{relay.port if relay else port}/{JOBS}"
        (self.work / "distcc").mkdir(exist_ok=True)
        # No silent local fallback: a distcc that cannot reach distccd fails the run.
        env = dict(
            os.environ,
            DISTCC_HOSTS=hosts,
            DISTCC_DIR=str(self.work / "distcc"),
            DISTCC_FALLBACK="0",
            DISTCC_SKIP_LOCAL_RETRY="1",
        )
        try:
            result = {"cold": self.make("distcc gcc", env)}
            if relay:
                result["cold_bytes"] = relay.sent
                self.edit_one_file()
                relay.sent = 0
                self.make("distcc gcc", env)
                result["edit_bytes"] = relay.sent
            return result
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()

    def reapi(self, mode: str, proxy: bool = False) -> dict[str, float]:
        self.fresh_tree()
        storage = self.work / "reapi-storage"
        home = self.work / "reapi-home"
        server_home = self.work / "server-home"
        # Cold: the CAS, the action cache, the agent's state and the workers'
        # local caches of input files all start empty.
        for path in (storage, home, server_home):
            shutil.rmtree(path, ignore_errors=True)
        server = ServerProcess(storage, workers=JOBS, home=server_home)
        relay = Proxy(server.port) if proxy else None
        env = dict(
            os.environ,
            REAPI_HOME=str(home),
            REAPI_CC_MODE=mode,
            REAPI_SERVER=f"grpc://127.0.0.1:{relay.port if relay else server.port}",
        )
        cc = f"{self.reapi_cc} gcc"
        try:
            subprocess.run([self.reapi_cc, "--zero-stats"], env=env, capture_output=True)
            agent = int((home / "shim" / "agent.pid").read_text())
            # The agent builds the native client once when it starts: setup, not
            # per-compile CPU, so the count starts after it.
            native = home / "shim" / "reapi-cc-native.sha256"
            deadline = time.monotonic() + 60
            while not native.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            cpu = agent_cpu(agent)
            result = {"cold": self.make(cc, env)}
            compiles = self.stats(env)["invocations"]
            result["agent_cpu_ms_per_compile"] = (agent_cpu(agent) - cpu) * 1000 / compiles
            result["compiles"] = compiles
            if relay:
                result["cold_bytes"] = relay.sent
                self.edit_one_file()
                relay.sent = 0
                self.make(cc, env)
                result["edit_bytes"] = relay.sent
            else:
                self.clean(cc, env)
                result["cached"] = self.make(cc, env)
                stats = self.stats(env)
                assert stats["cache_hits"] >= compiles - stats["local_fallbacks"], stats
            result["scan_fallbacks"] = self.stats(env).get("scan_fallbacks", 0)
            return result
        finally:
            stop_agent(home)
            server.stop()

    def stats(self, env: dict[str, str]) -> dict[str, int]:
        return reapi_stats(self.reapi_cc, env)

    def edit_one_file(self) -> None:
        path = self.tree / EDITED
        path.write_text(path.read_text() + "\n/* edited by the benchmark */\n")


def reapi_stats(reapi_cc: str, env: dict[str, str]) -> dict[str, Any]:
    """`reapi-cc --stats --json` for the agent `env` names."""
    out = subprocess.run([reapi_cc, "--stats", "--json"], env=env, capture_output=True, text=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def agent_cpu(pid: int) -> float:
    """Seconds of CPU used by `pid` and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def stop_agent(home: Path) -> None:
    pid_file = home / "shim" / "agent.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def venv_reapi_cc(work: Path) -> str:
    venv = work / "venv"
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    if not (venv / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, str(REPO_ROOT)], check=True)
    # This checkout's code, every time.
    subprocess.run([*pip, "--force-reinstall", "--no-deps", str(REPO_ROOT)], check=True)
    return str(venv / "bin" / "reapi-cc")


def discovery_cpu(bench: Bench) -> dict[str, float]:
    """Input discovery alone, per compile of the git build: `deps` (the local
    `gcc -M`, CPU of the child) against `scan` (this process's CPU), the scan
    cold (first pass, every header parsed) and warm (the agent's steady state)."""
    import resource
    import shlex

    from shim.classify import RemoteCompile, classify
    from shim.inputs import preprocessor_dependencies
    from shim.scan import Scanner, search_arguments

    bench.fresh_tree()
    env = dict(os.environ)
    bench.make("gcc", env)  # generated headers exist, as during a real build
    listing = subprocess.run(
        ["make", "-n", "-B", "V=1", "CC=gcc", *GIT_OPTIONS, "git"],
        cwd=bench.tree, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    compiles = []
    for line in listing.splitlines():
        words = shlex.split(line) if line.startswith("gcc ") and " -c " in line else []
        decision = classify(words[1:]) if words else None
        if isinstance(decision, RemoteCompile):
            compiles.append(decision)
    cwd = str(bench.tree)

    def deps() -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for decision in compiles:
            asyncio.run(preprocessor_dependencies("/usr/bin/gcc", decision.arguments, cwd, env))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    scanner = Scanner()

    def scan() -> float:
        start = time.process_time()
        for decision in compiles:
            arguments = search_arguments(decision.arguments)
            path = asyncio.run(
                scanner.search_path("/usr/bin/gcc", decision.language, arguments.search, cwd, env)
            )
            scanner.scan(cwd, decision.source, arguments, path)
        return time.process_time() - start

    count = len(compiles)
    return {
        "compiles": count,
        "deps_ms": deps() * 1000 / count,
        "scan_cold_ms": scan() * 1000 / count,
        "scan_warm_ms": scan() * 1000 / count,
    }


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/make-bench"))
    parser.add_argument(
        "--discovery-only", action="store_true", help="only input discovery CPU, deps vs scan"
    )
    parser.add_argument(
        "--sides", default="gcc,ccache,distcc,deps,scan", help="comma-separated sides to time"
    )
    args = parser.parse_args()
    for tool in ("ccache", "distcc", "distccd", "make", "gcc"):
        if shutil.which(tool) is None:
            sys.exit(f"make_bench: {tool} is not installed (apt-get install ccache distcc)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.discovery_only:
        bench = Bench(args.work, git_source(), "")
        found = discovery_cpu(bench)
        print(
            f"input discovery CPU per compile ({found['compiles']:.0f} compiles): deps "
            f"{found['deps_ms']:.1f} ms, scan cold {found['scan_cold_ms']:.1f} ms, scan warm "
            f"{found['scan_warm_ms']:.2f} ms: deps/scan warm "
            f"{found['deps_ms'] / found['scan_warm_ms']:.1f}x"
        )
        return
    bench = Bench(args.work, git_source(), venv_reapi_cc(args.work))
    sides: dict[str, Callable[[], dict[str, float]]] = {
        "gcc": bench.gcc,
        "ccache": bench.ccache,
        "distcc": bench.distcc,
        "deps": lambda: bench.reapi("deps"),
        "scan": lambda: bench.reapi("scan"),
    }
    chosen = args.sides.split(",")
    if unknown := set(chosen) - set(sides):
        sys.exit(f"make_bench: unknown sides {sorted(unknown)}; choose from {sorted(sides)}")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for round_ in range(args.rounds):
        for name in chosen:
            runs[name].append(sides[name]())
            print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
    if set(chosen) != set(sides):  # a partial run: medians only, no ratios
        for name, side_runs in runs.items():
            print(name, {key: round(median(side_runs, key), 3) for key in side_runs[0]})
        return
    distcc_bytes = bench.distcc(proxy=True)
    reapi_bytes = bench.reapi("deps", proxy=True)
    print(f"bytes: distcc {distcc_bytes}, reapi {reapi_bytes}", flush=True)

    gcc = median(runs["gcc"], "cold")
    ccache_cached = median(runs["ccache"], "cached")
    print(f"\n{runs['deps'][0]['compiles']:.0f} compiles, -j{JOBS}, medians of {args.rounds}")
    print(f"{'':32} {'seconds':>8} {'ratio':>8}")
    rows = [
        ("gcc cold", gcc, 1.0),
        ("distcc cold / gcc", median(runs["distcc"], "cold"), None),
        ("ccache cold / gcc", median(runs["ccache"], "cold"), None),
        ("reapi deps cold / gcc", median(runs["deps"], "cold"), None),
        ("reapi scan cold / gcc", median(runs["scan"], "cold"), None),
    ]
    for label, seconds, _ in rows:
        print(f"{label:32} {seconds:8.2f} {seconds / gcc:8.2f}")
    print(f"{'ccache cached':32} {ccache_cached:8.2f} {1.0:8.2f}")
    for mode in ("deps", "scan"):
        cached = median(runs[mode], "cached")
        print(
            f"{'reapi ' + mode + ' cached / ccache':32} {cached:8.2f} {cached / ccache_cached:8.2f}"
        )
    deps_cpu = median(runs["deps"], "agent_cpu_ms_per_compile")
    scan_cpu = median(runs["scan"], "agent_cpu_ms_per_compile")
    print(f"agent CPU per compile: deps {deps_cpu:.1f} ms, scan {scan_cpu:.1f} ms, "
          f"deps/scan {deps_cpu / scan_cpu:.1f}x; scan fallbacks "
          f"{median(runs['scan'], 'scan_fallbacks'):.0f}")  # fmt: skip
    for key, label in (("cold_bytes", "cold build"), ("edit_bytes", f"after editing {EDITED}")):
        ours, theirs = reapi_bytes[key], distcc_bytes[key]
        print(f"bytes sent, {label}: reapi {ours / 1e6:.2f} MB, distcc {theirs / 1e6:.2f} MB, "
              f"distcc/reapi {theirs / ours:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
