"""Garbage collection, stats and verification of a storage directory (cas/gc.py,
cas/inventory.py, cas/verify.py), on real DiskStore directories. Every store is
left checked by `verify`: no corrupt blob, no action result naming a missing one."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cas.action_cache import ActionCache, DiskActionResultStore, instance_root
from cas.disk import DiskStore
from cas.gc import GRACE, collect, parse_size
from cas.inventory import Storage, StorageError, stats
from cas.small_blobs import SMALL_BLOB, SMALL_DB
from cas.verify import verify
from reapi.core.digests import Digest, DigestFunction
from reapi.frontend.cas_commands import _stats_text
from reapi.protos import remote_execution_pb2 as re_pb2
from tests.helpers import REPO

HOUR = 3600.0


def blob(size: int, seed: int) -> tuple[Digest, bytes]:
    data = (seed.to_bytes(4, "big") * (size // 4 + 1))[:size]
    return DigestFunction.SHA256.digest_of(data), data


def put(root: Path, blobs: list[tuple[Digest, bytes]]) -> None:
    store = DiskStore(root)
    try:
        for error in asyncio.run(store.put_many(blobs)):
            assert error is None
    finally:
        store.close()


def set_age(root: Path, digest: Digest, seconds: float) -> None:
    """Make `digest`'s last use `seconds` ago."""
    when = time.time() - seconds
    if digest.size > SMALL_BLOB:
        path = root / "cas" / "sha256" / digest.hash[:2] / digest.hash
        os.utime(path, (when, when))
        return
    with sqlite3.connect(root / SMALL_DB) as db:
        db.execute(
            "UPDATE blob_keys SET last_access = ? WHERE hash = ?",
            (when, bytes.fromhex(digest.hash)),
        )


def add_results(
    root: Path, entries: list[tuple[int, list[Digest], float]], instance: str = ""
) -> list[Path]:
    """Action-cache entries (seed, outputs, age in seconds) of `instance`; returns
    their files."""
    cas = DiskStore(root)
    cache = ActionCache(DiskActionResultStore(root), cas)
    paths = []
    try:
        for seed, outputs, age in entries:
            action = DigestFunction.SHA256.digest_of(b"action %d" % seed)
            result = re_pb2.ActionResult(
                output_files=[
                    re_pb2.OutputFile(path=f"out{i}", digest=d.to_proto())
                    for i, d in enumerate(outputs)
                ]
            )
            asyncio.run(cache.put(action, result, instance))
            base = instance_root(root / "ac", instance)
            path = base / "sha256" / action.hash[:2] / f"{action.hash}-{action.size}"
            when = time.time() - age
            os.utime(path, (when, when))
            paths.append(path)
    finally:
        cas.close()
    return paths


def add_result(root: Path, seed: int, outputs: list[Digest], age: float = 0) -> Path:
    return add_results(root, [(seed, outputs, age)])[0]


def present(root: Path, digests: list[Digest]) -> list[bool]:
    storage = Storage(root, writable=False)
    try:
        return [storage.present([(d.function, d.hash)]) for d in digests]
    finally:
        storage.close()


def run_gc(root: Path, max_size: int, **options: object):  # type: ignore[no-untyped-def]
    storage = Storage(root, writable=True)
    try:
        return collect(storage, max_size, **options)  # type: ignore[arg-type]
    finally:
        storage.close()


def assert_consistent(root: Path) -> None:
    storage = Storage(root, writable=False)
    try:
        report = verify(storage)
    finally:
        storage.close()
    assert report.problems == 0, (report.corrupt, report.incomplete_entries)


@pytest.mark.parametrize(
    ("text", "size"),
    [("500M", 500 << 20), ("10G", 10 << 30), ("1.5K", 1536), ("2048", 2048), ("3KiB", 3072),
     ("10gb", 10 << 30), ("0", 0), (" 1T ", 1 << 40)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "abc", "-5M", "5X", "5 M", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size such as 500M or 10G"):
        parse_size(text)


def test_least_recently_used_go_first_across_both_tiers(tmp_path: Path) -> None:
    small = [blob(1000, i) for i in range(4)]
    large = [blob(SMALL_BLOB + 1000, 10 + i) for i in range(4)]
    put(tmp_path, small + large)
    # Ages interleave the tiers: the oldest are small[0], large[0], small[1], large[1].
    order = [small[0], large[0], small[1], large[1], small[2], large[2], small[3], large[3]]
    for rank, (digest, _) in enumerate(order):
        set_age(tmp_path, digest, 10 * HOUR - rank * HOUR)
    total = sum(d.size for d, _ in order)
    target = total - (1000 + SMALL_BLOB + 1000 + 1000) - 1  # one byte past the three oldest
    report = run_gc(tmp_path, target)
    assert report.blobs_before == 8 and report.bytes_before == total
    assert report.evicted_blobs == 4  # the three oldest free too little: the fourth goes
    assert present(tmp_path, [d for d, _ in order]) == [False] * 4 + [True] * 4
    assert report.bytes_after <= target
    assert stats(Storage(tmp_path, writable=False))["bytes"] == report.bytes_after
    assert_consistent(tmp_path)


def test_nothing_used_within_the_grace_period_goes(tmp_path: Path) -> None:
    blobs = [blob(2000, i) for i in range(5)]
    put(tmp_path, blobs)
    set_age(tmp_path, blobs[0][0], GRACE + 60)
    set_age(tmp_path, blobs[1][0], GRACE - 60)
    report = run_gc(tmp_path, 0)
    assert present(tmp_path, [d for d, _ in blobs]) == [False, True, True, True, True]
    assert report.evicted_blobs == 1
    assert report.kept_recent_bytes == 4 * 2000  # it says why the store stays above 0
    shorter = run_gc(tmp_path, 0, grace=30)
    assert shorter.evicted_blobs == 1  # only blobs[1] is older than 30 s


def test_dry_run_reports_what_a_real_run_does_and_changes_nothing(tmp_path: Path) -> None:
    blobs = [blob(3000 + i, i) for i in range(20)] + [blob(SMALL_BLOB + 5, 99)]
    put(tmp_path, blobs)
    for rank, (digest, _) in enumerate(blobs):
        set_age(tmp_path, digest, 2 * GRACE + rank)
    entry = add_result(tmp_path, 1, [blobs[-1][0]])
    before = stats(Storage(tmp_path, writable=False))
    dry = run_gc(tmp_path, 30_000, dry_run=True)
    assert stats(Storage(tmp_path, writable=False)) == before
    assert entry.exists()
    real = run_gc(tmp_path, 30_000)
    assert (dry.evicted_blobs, dry.evicted_bytes, dry.dropped_action_results) == (
        real.evicted_blobs,
        real.evicted_bytes,
        real.dropped_action_results,
    )
    assert real.dropped_action_results == 1 and not entry.exists()


def test_an_action_result_goes_before_its_blobs(tmp_path: Path) -> None:
    old_output, fresh_output, other = blob(500, 1), blob(SMALL_BLOB + 10, 2), blob(700, 3)
    put(tmp_path, [old_output, fresh_output, other])
    set_age(tmp_path, old_output[0], 3 * GRACE)
    names_old = add_result(tmp_path, 1, [old_output[0], fresh_output[0]])
    names_fresh = add_result(tmp_path, 2, [fresh_output[0]])
    unused_entry = add_result(tmp_path, 3, [other[0]], age=4 * GRACE)
    report = run_gc(tmp_path, 0)
    assert present(tmp_path, [old_output[0], fresh_output[0], other[0]]) == [False, True, True]
    assert not names_old.exists()  # it named an evicted blob
    assert names_fresh.exists()
    assert not unused_entry.exists()  # itself unused for longer than what was evicted
    assert report.dropped_action_results == 2
    assert_consistent(tmp_path)


def test_every_instance_keeps_its_own_results_and_gc_sees_them_all(tmp_path: Path) -> None:
    """Instance names keep action caches apart over one shared CAS: gc drops an
    entry of any instance that names an evicted blob, and keeps the blobs a fresh
    entry of any instance names; stats count them per instance."""
    old, kept = blob(500, 1), blob(600, 2)
    put(tmp_path, [old, kept])
    set_age(tmp_path, old[0], 3 * GRACE)
    [default_entry] = add_results(tmp_path, [(1, [kept[0]], 0)])
    [team_old] = add_results(tmp_path, [(1, [old[0]], 0)], instance="team/a")
    [team_kept] = add_results(tmp_path, [(2, [kept[0]], 0)], instance="100% b")
    assert team_old.parent.parent.parent.name == "@team%2Fa"
    found = stats(Storage(tmp_path, writable=False))
    assert found["action_results_by_instance"] == {"": 1, "team/a": 1, "100% b": 1}
    text = _stats_text(found)
    assert "action results   3\n  instance '': 1\n  instance '100% b': 1\n" in text
    report = run_gc(tmp_path, 0)
    assert present(tmp_path, [old[0], kept[0]]) == [False, True]
    assert not team_old.exists() and default_entry.exists() and team_kept.exists()
    assert report.dropped_action_results == 1
    assert_consistent(tmp_path)


def test_verify_finds_and_repairs_corruption(tmp_path: Path) -> None:
    good, bad_small, bad_large = blob(100, 1), blob(200, 2), blob(SMALL_BLOB + 1, 3)
    put(tmp_path, [good, bad_small, bad_large])
    with sqlite3.connect(tmp_path / SMALL_DB) as db:
        db.execute(
            "UPDATE blob_data SET data = ? "
            "WHERE id = (SELECT data_id FROM blob_keys WHERE hash = ?)",
            (b"x" * 200, bytes.fromhex(bad_small[0].hash)),
        )
    large_path = tmp_path / "cas" / "sha256" / bad_large[0].hash[:2] / bad_large[0].hash
    large_path.write_bytes(b"y" + bad_large[1][1:])
    names_bad = add_result(tmp_path, 1, [bad_small[0]])
    names_good = add_result(tmp_path, 2, [good[0]])
    garbage = add_result(tmp_path, 3, [good[0]])
    garbage.write_bytes(b"\xff\xff not a protobuf")
    missing = add_result(tmp_path, 4, [blob(300, 4)[0]])  # never stored

    storage = Storage(tmp_path, writable=True)
    found = verify(storage)
    assert {c.key[1] for c in found.corrupt} == {bad_small[0].hash, bad_large[0].hash}
    assert found.unreadable_entries == [str(garbage)]
    assert sorted(found.incomplete_entries) == sorted([str(names_bad), str(missing)])
    assert all(p.exists() for p in (names_bad, garbage, missing, large_path))  # reported only

    repaired = verify(storage, repair=True)
    assert (repaired.removed_blobs, repaired.removed_entries) == (2, 3)
    assert names_good.exists() and not names_bad.exists() and not large_path.exists()
    assert verify(storage).problems == 0
    storage.close()
    store = DiskStore(tmp_path)
    missing_now = asyncio.run(store.find_missing([good[0], bad_small[0], bad_large[0]]))
    store.close()
    assert missing_now == [bad_small[0], bad_large[0]]


def test_stats(tmp_path: Path) -> None:
    put(tmp_path, [blob(100, 1), blob(SMALL_BLOB + 100, 2)])
    add_result(tmp_path, 1, [blob(100, 1)[0]])
    found = stats(Storage(tmp_path, writable=False))
    assert (found["blobs"], found["bytes"], found["action_results"]) == (2, SMALL_BLOB + 200, 1)
    assert "instance" not in _stats_text(found)  # one instance: nothing to tell apart
    assert (found["small_blobs"], found["large_blobs"]) == (1, 1)
    assert isinstance(found["oldest_access"], float)
    assert found["oldest_access"] <= found["newest_access"] <= time.time()


def test_a_missing_or_foreign_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        Storage(tmp_path / "nowhere", writable=False)
    with pytest.raises(StorageError, match="is not a reapi storage directory"):
        Storage(tmp_path, writable=False)
    assert not (tmp_path / "cas").exists()  # nothing created at a mistyped path


def old_store(root: Path, small: int, large: int) -> list[Digest]:
    """A store of old blobs, a tenth of them named by action results."""
    blobs = [blob(1000 + i % 500, i) for i in range(small)]
    blobs += [blob(SMALL_BLOB + i, 10**6 + i) for i in range(large)]
    put(root, blobs)
    with sqlite3.connect(root / SMALL_DB) as db:
        db.execute("UPDATE blob_keys SET last_access = ? - size", (time.time() - 2 * GRACE,))
    for digest, _ in blobs[small:]:
        set_age(root, digest, 2 * GRACE + digest.size % 1000)
    add_results(root, [(n, [blobs[n][0]], GRACE / 2) for n in range(0, len(blobs), 10)])
    return [d for d, _ in blobs]


def gc_process(root: Path, max_size: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reapi", "cas", "gc", "--storage", str(root), "--max-size",
         max_size],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_concurrent_gc_runs_corrupt_nothing(tmp_path: Path) -> None:
    old_store(tmp_path, 3000, 30)
    expected = run_gc(tmp_path, 1 << 20, dry_run=True)
    runs = [gc_process(tmp_path, "1M") for _ in range(3)]
    evicted = 0
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        evicted += int(out.splitlines()[1].split()[1])  # "evicted N blobs ..."
    found = stats(Storage(tmp_path, writable=False))
    assert (found["blobs"], found["bytes"]) == (expected.blobs_after, expected.bytes_after)
    assert evicted == expected.evicted_blobs  # each blob evicted once, by one of them
    assert_consistent(tmp_path)


def test_an_interrupted_gc_leaves_a_consistent_store(tmp_path: Path) -> None:
    old_store(tmp_path, 20000, 50)
    storage = Storage(tmp_path, writable=False)
    before = stats(storage)["blobs"]
    run = gc_process(tmp_path, "0")
    deadline = time.monotonic() + 60
    while stats(storage)["blobs"] == before:  # let it start evicting
        assert run.poll() is None and time.monotonic() < deadline, "gc ended too soon"
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    storage.close()
    interrupted = stats(Storage(tmp_path, writable=False))["blobs"]
    assert 0 < interrupted < before
    assert_consistent(tmp_path)
    assert run_gc(tmp_path, 0).blobs_after == 0
    assert_consistent(tmp_path)
