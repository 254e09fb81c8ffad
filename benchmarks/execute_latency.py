#!/usr/bin/env python3
"""End-to-end Execute latency of a trivial action, over loopback.

Starts `reapi serve` with local workers (bubblewrap sandbox), uploads one input
tree and Command, then runs N distinct Actions (`/bin/true`, differing only in
their salt, so each one really executes) one after another, timing each
Execute call from request to the COMPLETED operation. Prints p50, p90 and p99.

    python benchmarks/execute_latency.py [--actions 500] [--workers 1] [--sandbox bwrap]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.actions import execute, upload_action  # noqa: E402
from tests.helpers import ServerProcess  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(address: str, count: int) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        actions = [
            await upload_action(
                channel,
                ["/bin/true"],
                files={"input.txt": b"x"},
                salt=f"{os.getpid()}-{n}".encode(),
            )
            for n in range(count + 20)
        ]
        for warmup in actions[:20]:  # worker connected, caches warm
            await execute(channel, warmup)
        latencies = []
        for action in actions[20:]:
            start = time.perf_counter()
            _ops, response = await execute(channel, action)
            latencies.append(time.perf_counter() - start)
            assert response.result.exit_code == 0 and not response.cached_result
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sandbox", choices=("bwrap", "none"), default="bwrap")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reapi-latency-") as tmp:
        server = ServerProcess(
            Path(tmp) / "storage", "--sandbox", args.sandbox, workers=args.workers
        )
        try:
            latencies = asyncio.run(measure(server.address, args.actions))
        finally:
            server.stop()
    ms = [value * 1000 for value in latencies]
    print(
        f"Command: `python benchmarks/execute_latency.py --actions {args.actions} "
        f"--workers {args.workers} --sandbox {args.sandbox}`"
    )
    print()
    print("| actions | sandbox | p50 | p90 | p99 | mean |")
    print("|---:|---|---:|---:|---:|---:|")
    print(
        f"| {len(ms)} | {args.sandbox} | {percentile(ms, 0.5):.1f} ms | "
        f"{percentile(ms, 0.9):.1f} ms | {percentile(ms, 0.99):.1f} ms | "
        f"{statistics.mean(ms):.1f} ms |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
