"""`reapi cas gc | stats | verify`: the storage directory's lifecycle tools.

    reapi cas gc --storage DIR --max-size SIZE [--dry-run] [--grace SECONDS] [--if-above SIZE]
    reapi cas stats --storage DIR [--json]
    reapi cas verify --storage DIR [--repair]

They work on a directory whether or not a server is using it (see cas/gc.py
for why that is safe). Exit status: 0 when done (verify: nothing wrong, or
everything repaired), 1 when verify found problems it left, 2 with one line
on stderr for bad input (a missing or unwritable directory, a bad size).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cas.gc import GRACE, GcReport, collect, human, parse_size
from cas.inventory import Storage, StorageError, stats
from cas.verify import VerifyReport, verify
from reapi.security import ConfigError
from reapi.server import default_storage

# Progress lines start after this many seconds, then come this often.
PROGRESS_AFTER = 2.0
PROGRESS_EVERY = 1.0

Report = TypeVar("Report")


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cas = commands.add_parser("cas", help="storage lifecycle: gc, stats, verify")
    tools = cas.add_subparsers(dest="cas_command", required=True)
    storage_help = f"storage directory (default {default_storage()})"

    gc = tools.add_parser("gc", help="evict least recently used blobs down to a size")
    gc.add_argument("--storage", help=storage_help)
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
    stats_cmd.add_argument("--json", action="store_true", help="machine-readable output")

    verify_cmd = tools.add_parser("verify", help="re-hash every blob, check the action cache")
    verify_cmd.add_argument("--storage", help=storage_help)
    verify_cmd.add_argument(
        "--repair", action="store_true", help="remove what is corrupt or incomplete"
    )


def run(args: argparse.Namespace) -> int:
    """Run a `reapi cas` command; raises ConfigError or StorageError on bad input."""
    root = Path(args.storage) if args.storage else default_storage()
    if args.cas_command == "gc":
        max_size = size_option("--max-size", args.max_size)
        if_above = size_option("--if-above", args.if_above) if args.if_above else None
        try:
            grace = float(args.grace)
        except ValueError:
            grace = -1.0
        if grace < 0:
            raise ConfigError(f"--grace {args.grace!r}: expected a number of seconds")
    changes = args.repair if args.cas_command == "verify" else args.cas_command == "gc"
    storage = Storage(root, writable=changes and not getattr(args, "dry_run", False))
    try:
        if args.cas_command == "gc":
            report = collect(
                storage,
                max_size,
                grace=grace,
                dry_run=args.dry_run,
                if_above=if_above,
                progress=_progress(_gc_progress),
            )
            if if_above is not None and report.bytes_before <= if_above:
                print(f"nothing to do: {human(report.bytes_before)} stored, --if-above "
                      f"{human(if_above)}")  # fmt: skip
            else:
                print(_gc_summary(report, max_size, grace))
            return 0
        if args.cas_command == "stats":
            found = stats(storage)
            print(json.dumps(found, indent=1) if args.json else _stats_text(found))
            return 0
        checked = verify(storage, args.repair, _progress(_verify_progress))
        print(_verify_summary(checked, args.repair))
        return 1 if checked.problems and not args.repair else 0
    except sqlite3.Error as error:
        raise StorageError(f"storage {root}: {error}") from None
    finally:
        storage.close()


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
            f"{'  small':16} {count(found['small_blobs'], found['small_bytes'])}, "
            f"database {human(int(found['database_bytes']))} on disk",
            f"{'  large':16} {count(found['large_blobs'], found['large_bytes'])}",
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
