"""`reapi cas gc | stats | verify`: the storage directory's lifecycle tools.

    reapi cas gc --storage DIR --max-size SIZE [--dry-run] [--grace SECONDS] [--if-above SIZE]
    reapi cas stats --storage DIR [--json]
    reapi cas verify --storage DIR [--repair]

With `--redis URL` (repeatable) instead of `--storage`, on the CAS and action
cache that `reapi serve --redis` keeps in Redis (cas/redis_lifecycle.py).
They work on a directory or a Redis whether or not a server is using it (see
cas/gc.py for why that is safe). Exit status: 0 when done (verify: nothing wrong, or
everything repaired), 1 when verify found problems it left, 2 with one line
on stderr for bad input (a missing or unwritable directory, a bad size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cas.gc import GRACE, GcReport, collect, human, parse_size
from cas.inventory import Storage, StorageError, stats
from cas.redis_conn import RedisConfigError, RedisTarget, connect
from cas.redis_lifecycle import GcRunning, collect_redis, stats_redis, verify_redis
from cas.verify import VerifyReport, verify
from reapi.core.errors import ReapiError
from reapi.frontend.security import ConfigError
from reapi.frontend.server import default_storage

# Progress lines start after this many seconds, then come this often.
PROGRESS_AFTER = 2.0
PROGRESS_EVERY = 1.0

Report = TypeVar("Report")


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cas = commands.add_parser("cas", help="storage lifecycle: gc, stats, verify")
    tools = cas.add_subparsers(dest="cas_command", required=True)
    storage_help = f"storage directory (default {default_storage()})"
    redis_help = "the Redis (Cluster) of `reapi serve --redis`, instead of --storage (repeatable)"

    gc = tools.add_parser("gc", help="evict least recently used blobs down to a size")
    gc.add_argument("--storage", help=storage_help)
    gc.add_argument("--redis", action="append", help=redis_help)
    gc.add_argument("--max-size", required=True, help="size to get under: 500M, 10G, ...")
    gc.add_argument("--dry-run", action="store_true", help="change nothing; report what would go")
    gc.add_argument(
        "--grace",
        default=str(GRACE),
        help=f"keep blobs used in the last SECONDS (default {GRACE:.0f}); "
        "below 300 a running server's clients may lose blobs they were told exist",
    )
    gc.add_argument(
        "--if-above", help="do nothing unless the store holds more than this (a high watermark)"
    )

    stats_cmd = tools.add_parser("stats", help="blobs, bytes, action results, access times")
    stats_cmd.add_argument("--storage", help=storage_help)
    stats_cmd.add_argument("--redis", action="append", help=redis_help)
    stats_cmd.add_argument("--json", action="store_true", help="machine-readable output")

    verify_cmd = tools.add_parser("verify", help="re-hash every blob, check the action cache")
    verify_cmd.add_argument("--storage", help=storage_help)
    verify_cmd.add_argument("--redis", action="append", help=redis_help)
    verify_cmd.add_argument(
        "--repair", action="store_true", help="remove what is corrupt or incomplete"
    )


@dataclass(frozen=True)
class GcOptions:
    max_size: int
    if_above: int | None
    grace: float
    dry_run: bool


def _gc_options(args: argparse.Namespace) -> GcOptions:
    try:
        grace = float(args.grace)
    except ValueError:
        grace = -1.0
    if grace < 0:
        raise ConfigError(f"--grace {args.grace!r}: expected a number of seconds")
    return GcOptions(
        size_option("--max-size", args.max_size),
        size_option("--if-above", args.if_above) if args.if_above else None,
        grace,
        args.dry_run,
    )


def run(args: argparse.Namespace) -> int:
    """Run a `reapi cas` command; raises ConfigError or StorageError on bad input."""
    gc = _gc_options(args) if args.cas_command == "gc" else None
    if args.redis:
        if args.storage:
            raise ConfigError("--redis and --storage exclude each other")
        try:
            target = RedisTarget(tuple(args.redis))
        except RedisConfigError as error:
            raise ConfigError(str(error)) from None
        return asyncio.run(_run_on_redis(args, target, gc))
    root = Path(args.storage) if args.storage else default_storage()
    changes = args.repair if args.cas_command == "verify" else gc is not None and not gc.dry_run
    storage = Storage(root, writable=changes)
    try:
        if gc is not None:
            report = collect(
                storage,
                gc.max_size,
                grace=gc.grace,
                dry_run=gc.dry_run,
                if_above=gc.if_above,
                progress=_progress(_gc_progress),
            )
            return _shown(args, gc, report)
        if args.cas_command == "stats":
            return _shown(args, gc, stats(storage))
        return _shown(args, gc, verify(storage, args.repair, _progress(_verify_progress)))
    except sqlite3.Error as error:
        raise StorageError(f"storage {root}: {error}") from None
    finally:
        storage.close()


async def _run_on_redis(args: argparse.Namespace, target: RedisTarget, gc: GcOptions | None) -> int:
    """The same commands on the CAS in Redis."""
    try:
        client = await connect(target)
    except RedisConfigError as error:
        raise ConfigError(str(error)) from None
    try:
        if gc is not None:
            report = await collect_redis(
                client,
                gc.max_size,
                grace=gc.grace,
                dry_run=gc.dry_run,
                if_above=gc.if_above,
                progress=_progress(_gc_progress),
            )
            return _shown(args, gc, report)
        if args.cas_command == "stats":
            return _shown(args, gc, await stats_redis(client, f"Redis {target}"))
        checked = await verify_redis(client, args.repair, _progress(_verify_progress))
        return _shown(args, gc, checked)
    except GcRunning as error:
        raise StorageError(str(error)) from None
    except ReapiError as error:  # Redis lost or full meanwhile
        raise StorageError(f"Redis {target}: {error.message}") from None
    finally:
        await client.aclose()


def _shown(
    args: argparse.Namespace,
    gc: GcOptions | None,
    outcome: GcReport | VerifyReport | dict[str, Any],
) -> int:
    """Print what a command found, whichever store it ran on; its exit status."""
    if isinstance(outcome, GcReport):
        assert gc is not None
        print(_gc_outcome(outcome, gc))
        return 0
    if isinstance(outcome, VerifyReport):
        print(_verify_summary(outcome, args.repair))
        return 1 if outcome.problems and not args.repair else 0
    print(json.dumps(outcome, indent=1) if args.json else _stats_text(outcome))
    return 0


def _gc_outcome(report: GcReport, gc: GcOptions) -> str:
    if gc.if_above is not None and report.bytes_before <= gc.if_above:
        return (
            f"nothing to do: {human(report.bytes_before)} stored, --if-above {human(gc.if_above)}"
        )
    return _gc_summary(report, gc.max_size, gc.grace)


def size_option(option: str, text: str) -> int:
    """`text` parsed as a size; ConfigError naming `option` if it is not one."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise ConfigError(f"{option} {error}") from None


def _progress(line: Callable[[Report], str]) -> Callable[[Report], None]:
    """A progress callback printing `line(report)` on stderr, once a second
    after the first two seconds."""
    start = time.monotonic()
    last = start

    def report(value: Report) -> None:
        nonlocal last
        now = time.monotonic()
        if now - start >= PROGRESS_AFTER and now - last >= PROGRESS_EVERY:
            last = now
            print(line(value), file=sys.stderr, flush=True)

    return report


def _gc_progress(report: GcReport) -> str:
    return f"gc: evicted {report.evicted_blobs} blobs ({human(report.evicted_bytes)}) so far"


def _verify_progress(report: VerifyReport) -> str:
    return f"verify: {report.blobs} blobs ({human(report.bytes)}) checked so far"


def _gc_summary(report: GcReport, max_size: int, grace: float) -> str:
    evicted = "would evict" if report.dry_run else "evicted"
    after = "would remain" if report.dry_run else "after"
    lines = [
        f"{'before':12} {report.blobs_before:>10} blobs {human(report.bytes_before):>10}",
        f"{evicted:12} {report.evicted_blobs:>10} blobs {human(report.evicted_bytes):>10}"
        f"   ({report.dropped_action_results} action results with them)",
        f"{after:12} {report.blobs_after:>10} blobs {human(report.bytes_after):>10}",
        f"took {report.seconds:.1f} s" + (" (dry run: nothing changed)" if report.dry_run else ""),
    ]
    if report.kept_recent_bytes:
        lines.append(
            f"kept {human(report.kept_recent_bytes)} more than {human(max_size)} allows: "
            f"those blobs were used in the last {grace:.0f} s (the grace period)"
        )
    return "\n".join(lines)


def _stats_text(found: dict[str, Any]) -> str:
    def when(value: object) -> str:
        if not isinstance(value, float):
            return "-"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        return f"{stamp} ({_age(time.time() - value)} ago)"

    def count(blobs: int, size: int) -> str:
        return f"{blobs} ({human(size)})"

    tiers = []
    if "small_blobs" in found:  # a storage directory's two tiers
        tiers = [
            f"{'  small':16} {count(found['small_blobs'], found['small_bytes'])}, "
            f"database {human(int(found['database_bytes']))} on disk",
            f"{'  large':16} {count(found['large_blobs'], found['large_bytes'])}",
        ]
    instances = found["action_results_by_instance"]
    per_instance = (
        [f"  instance {name!r}: {count}" for name, count in sorted(instances.items())]
        if set(instances) - {""}
        else []
    )
    return "\n".join(
        [
            f"{'storage':16} {found['storage']}",
            f"{'blobs':16} {count(found['blobs'], found['bytes'])}",
            *tiers,
            f"{'action results':16} {found['action_results']}",
            *per_instance,
            f"{'oldest access':16} {when(found['oldest_access'])}",
            f"{'newest access':16} {when(found['newest_access'])}",
        ]
    )


def _verify_summary(report: VerifyReport, repair: bool) -> str:
    lines = [f"corrupt blob: {bad}" for bad in report.corrupt]
    lines += [f"unreadable action result: {path}" for path in report.unreadable_entries]
    lines += [f"incomplete action result: {path}" for path in report.incomplete_entries]
    lines.append(
        f"verified {report.blobs} blobs ({human(report.bytes)}) in {report.seconds:.1f} s: "
        f"{len(report.corrupt)} corrupt, {len(report.unreadable_entries)} unreadable and "
        f"{len(report.incomplete_entries)} incomplete action results"
    )
    if repair:
        lines.append(
            f"removed {report.removed_blobs} blobs and {report.removed_entries} action results"
        )
    elif report.problems:
        lines.append("run with --repair to remove them")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            amount = int(seconds // length)
            return f"{amount} {unit}{'s' if amount != 1 else ''}"
    return f"{max(0, int(seconds))} s"
