#!/usr/bin/env python3
"""Bazel on a generated C++ workspace: local build vs our remote execution, one run.

Generates a workspace of LIBS cc_libraries (FILES sources each, each library
depending on the two before it) and a few cc_binaries, about 300 actions in
all. Then, each round, with one warm Bazel server (Debian's Bazel 4, offline):

  local   `bazel clean`, then `bazel build //...` on this machine
  remote  `bazel clean`, then the same build with --remote_executor pointing at
          a fresh `reapi serve --workers 2` (bubblewrap) on this machine
  cached  `bazel clean`, then the remote build again: every action a cache hit
  redis remote, redis cached
          the same two builds against two frontends + Redis: a fresh standalone
          redis-server, two `reapi serve --redis URL --workers 1` (2 local
          workers in all, as above) and HAProxy in front of them, which
          --remote_executor points at (skipped with --no-redis)

and prints the median wall times, the ratios to local and those of the Redis
builds to the embedded default's (`reapi serve --workers 2`, disk storage).

    python benchmarks/bazel_bench.py [--rounds 3] [--libs 30] [--files 8] [--no-redis]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests import redis_servers  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402
from tests.integration.bazel_helpers import (  # noqa: E402
    Bazel,
    offline_flags,
    process_summary,
    require_bazel,
)
from tests.redis.haproxy import haproxy  # noqa: E402

LABELS = {
    "local": "local",
    "remote": "remote (embedded: --workers 2)",
    "cached": "cached (embedded)",
    "redis remote": "remote (2 frontends + Redis)",
    "redis cached": "cached (2 frontends + Redis)",
}
TARGETS = {"remote": "<= 1.3", "cached": "<= 0.2"}

SOURCE = """#include "lib{lib}/file{n}.h"
{includes}
#include <map>
#include <string>
#include <vector>

namespace lib{lib} {{
int compute{n}(int x) {{
  std::map<std::string, std::vector<int>> table;
  for (int i = 0; i < 50; ++i) table["k" + std::to_string(i % 7)].push_back(i * x);
  int sum = 0;
  for (const auto& [key, values] : table) for (int v : values) sum += v + int(key.size());
  return sum{calls};
}}
}}  // namespace lib{lib}
"""


def generate(root: Path, libs: int, files: int) -> int:
    """Write the workspace; returns the number of compile actions."""
    root.mkdir(parents=True)
    (root / "WORKSPACE").write_text('workspace(name = "bench")\n')
    for lib in range(libs):
        deps = [d for d in (lib - 1, lib - 2) if d >= 0]
        directory = root / f"lib{lib}"
        directory.mkdir(parents=True)
        for n in range(files):
            (directory / f"file{n}.h").write_text(
                f"#pragma once\nnamespace lib{lib} {{ int compute{n}(int x); }}\n"
            )
            includes = "\n".join(f'#include "lib{d}/file0.h"' for d in deps)
            calls = "".join(f" + lib{d}::compute0(x)" for d in deps)
            (directory / f"file{n}.cc").write_text(
                SOURCE.format(lib=lib, n=n, includes=includes, calls=calls)
            )
        dep_labels = ", ".join(f'"//lib{d}"' for d in deps)
        (directory / "BUILD").write_text(
            'load("@rules_cc//cc:defs.bzl", "cc_library")\n'
            f'cc_library(name = "lib{lib}", srcs = glob(["*.cc"]), hdrs = glob(["*.h"]),\n'
            f'           deps = [{dep_labels}], visibility = ["//visibility:public"])\n'
        )
    apps = root / "apps"
    apps.mkdir()
    build = ['load("@rules_cc//cc:defs.bzl", "cc_binary")']
    for app in range(0, libs, max(1, libs // 5)):
        (apps / f"app{app}.cc").write_text(
            f'#include "lib{app}/file0.h"\nint main() {{ return lib{app}::compute0(1) == 0; }}\n'
        )
        build.append(f'cc_binary(name = "app{app}", srcs = ["app{app}.cc"], deps = ["//lib{app}"])')
    (apps / "BUILD").write_text("\n".join(build) + "\n")
    return libs * files


def timed(bazel: Bazel, flags: list[str]) -> tuple[float, dict[str, int]]:
    bazel.run("clean")
    start = time.perf_counter()
    output = bazel.run("build", *flags, "//...")
    return time.perf_counter() - start, process_summary(output)


@contextlib.contextmanager
def embedded(workdir: Path) -> Iterator[str]:
    """A fresh `reapi serve --workers 2` (disk storage); yields its address."""
    server = ServerProcess(workdir / "storage", workers=2, home=workdir / "home")
    try:
        yield server.address
    finally:
        server.stop()


@contextlib.contextmanager
def two_frontends(workdir: Path) -> Iterator[str]:
    """A fresh standalone Redis, two `reapi serve --redis URL --workers 1` on it
    (a home, so worker input caches, each) and HAProxy; yields HAProxy's address."""
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_servers.standalone(workdir / "redis"))
        addresses = []
        for name in ("a", "b"):
            frontend = ServerProcess(
                workdir / name, workers=1, home=workdir / f"home-{name}", redis=redis.urls
            )
            stack.callback(frontend.stop)
            addresses.append(frontend.address)
        yield stack.enter_context(haproxy(workdir, addresses))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--libs", type=int, default=30)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument(
        "--no-redis", action="store_true", help="skip the two frontends + Redis builds"
    )
    args = parser.parse_args()
    # Each round, a fresh service of each kind: a new CAS, action cache and worker input caches.
    services: dict[str, Callable[[Path], contextlib.AbstractContextManager[str]]] = {"": embedded}
    if not args.no_redis:
        services["redis "] = two_frontends
    times: dict[str, list[float]] = {"local": []}
    for prefix in services:
        times[f"{prefix}remote"] = []
        times[f"{prefix}cached"] = []
    with tempfile.TemporaryDirectory(prefix="reapi-bazel-bench-") as tmp_name:
        tmp = Path(tmp_name)
        compiles = generate(tmp / "ws", args.libs, args.files)
        bazel = Bazel(
            executable=require_bazel(), workspace=tmp / "ws", output_user_root=tmp / "bazel_root"
        )
        offline = offline_flags(repository_cache=tmp / "repository_cache")
        summaries = {}
        try:
            bazel.run("build", "--nobuild", *offline, "//...")  # start the Bazel server
            for round_number in range(args.rounds):
                seconds, summaries["local"] = timed(bazel, offline)
                times["local"].append(seconds)
                for prefix, service in services.items():
                    workdir = tmp / f"{prefix.strip() or 'embedded'}-{round_number}"
                    workdir.mkdir()
                    with service(workdir) as address:
                        remote = [*offline, f"--remote_executor=grpc://{address}"]
                        for kind in (f"{prefix}remote", f"{prefix}cached"):
                            seconds, summaries[kind] = timed(bazel, remote)
                            times[kind].append(seconds)
                print(
                    f"round {round_number + 1}: "
                    + ", ".join(f"{kind} {values[-1]:.1f}s" for kind, values in times.items()),
                    file=sys.stderr,
                )
        finally:
            bazel.shutdown()
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    print(
        f"Command: `python benchmarks/bazel_bench.py --rounds {args.rounds} "
        f"--libs {args.libs} --files {args.files}{' --no-redis' if args.no_redis else ''}`"
    )
    print()
    processes = "; ".join(f"{LABELS[kind]}: {summary}" for kind, summary in summaries.items())
    print(
        f"Workspace: {args.libs} libraries x {args.files} sources ({compiles} compiles); "
        f"processes per build, {processes}. Median of {args.rounds} rounds."
    )
    print()
    print("| build | wall time | ratio to local | ratio to embedded | target (to local) |")
    print("|---|---:|---:|---:|---:|")
    for kind, median in medians.items():
        to_embedded = ""
        if kind.startswith("redis "):
            to_embedded = f"{median / medians[kind.removeprefix('redis ')]:.2f}"
        print(
            f"| {LABELS[kind]} | {median:.1f} s | {median / medians['local']:.2f} "
            f"| {to_embedded} | {TARGETS.get(kind, '')} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
