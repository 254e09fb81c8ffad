"""`reapi cas gc | stats | verify` and `reapi serve --max-size` against real
server processes: bad input, the refresh that protects what clients were just
told about, the background gc, and a make build through reapi-cc that runs
while gc runs again and again."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from cas.gc import GRACE
from cas.small_blobs import SMALL_BLOB, SMALL_DB
from reapi.core.digests import Digest, DigestFunction
from reapi.protos import bytestream_pb2 as bs_pb2
from reapi.protos import bytestream_pb2_grpc as bs_grpc
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.helpers import REPO, ServerProcess
from tests.integration.test_server_process import one_line_error, run_reapi
from tests.shim.test_real_projects import (
    debian_source,
    objects,
    run,
    shim_env_for,
    stats,
    stop_agents,
)

OLD = 2 * GRACE


def age_everything(storage: Path, seconds: float) -> None:
    """Make every blob and action result in `storage` last used `seconds` ago."""
    when = time.time() - seconds
    with sqlite3.connect(storage / SMALL_DB) as db:
        db.execute("UPDATE blob_keys SET last_access = ?", (when,))
    for path in [*(storage / "cas").rglob("*"), *(storage / "ac").rglob("*")]:
        if path.is_file() and path.name != "small.db" and not path.name.startswith("small.db"):
            os.utime(path, (when, when))


def cas_json(storage: Path) -> dict[str, Any]:
    result = run_reapi("cas", "stats", "--storage", str(storage), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def upload(address: str, blobs: list[bytes]) -> list[Digest]:
    digests = [DigestFunction.SHA256.digest_of(b) for b in blobs]
    with grpc.insecure_channel(address) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        small = [(d, b) for d, b in zip(digests, blobs, strict=True) if d.size <= SMALL_BLOB]
        cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=b)
                    for d, b in small
                ]
            )
        )
        bytestream = bs_grpc.ByteStreamStub(channel)
        for digest, data in zip(digests, blobs, strict=True):
            if digest.size > SMALL_BLOB:
                name = f"uploads/x/blobs/{digest.hash}/{digest.size}"
                bytestream.Write(iter([bs_pb2.WriteRequest(resource_name=name, data=data,
                                                           finish_write=True)]))  # fmt: skip
    return digests


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ServerProcess(store).stop()  # a real, empty storage directory
    missing = str(tmp_path / "missing")
    assert "does not exist" in one_line_error(
        run_reapi("cas", "gc", "--storage", missing, "--max-size", "1G")
    )
    assert "does not exist" in one_line_error(run_reapi("cas", "stats", "--storage", missing))
    assert "not a reapi storage directory" in one_line_error(
        run_reapi("cas", "verify", "--storage", str(tmp_path))
    )
    for size in ("ten gigs", "5X", "-1G"):
        assert "expected a size such as 500M or 10G" in one_line_error(
            run_reapi("cas", "gc", "--storage", str(store), f"--max-size={size}")
        )
    assert "expected a number of seconds" in one_line_error(
        run_reapi("cas", "gc", "--storage", str(store), "--max-size", "1G", "--grace", "soon")
    )
    assert "--max-size" in one_line_error(run_reapi("serve", "--max-size", "lots"))
    # Read-only: the store bind-mounted read-only (root ignores permission bits).
    readonly = subprocess.run(
        ["bwrap", "--dev-bind", "/", "/", "--ro-bind", str(store), str(store),
         sys.executable, "-m", "reapi", "cas", "gc", "--storage", str(store), "--max-size", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "is not writable" in one_line_error(readonly)
    assert not missing_path_created(tmp_path)


def missing_path_created(tmp_path: Path) -> bool:
    return (tmp_path / "missing").exists() or (tmp_path / "cas").exists()


def test_stats_gc_and_verify_from_the_command_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = ServerProcess(store)
    try:
        digests = upload(server.address, [b"blob %d" % i * 100 for i in range(50)])
    finally:
        server.stop()
    found = cas_json(store)
    assert (found["blobs"], found["action_results"]) == (50, 0)
    assert found["bytes"] == sum(d.size for d in digests)
    human = run_reapi("cas", "stats", "--storage", str(store))
    assert "blobs            50" in human.stdout

    age_everything(store, OLD)
    dry = run_reapi("cas", "gc", "--storage", str(store), "--max-size", "2K", "--dry-run")
    assert dry.returncode == 0 and "would evict" in dry.stdout
    assert cas_json(store)["blobs"] == 50
    gc = run_reapi("cas", "gc", "--storage", str(store), "--max-size", "2K")
    assert gc.returncode == 0, gc.stderr
    assert int(cas_json(store)["bytes"]) <= 2048

    with sqlite3.connect(store / SMALL_DB) as db:
        db.execute("UPDATE blob_data SET data = CAST(X'00' || substr(data, 2) AS BLOB)")
    broken = run_reapi("cas", "verify", "--storage", str(store))
    assert broken.returncode == 1 and "corrupt blob: sha256" in broken.stdout
    repaired = run_reapi("cas", "verify", "--storage", str(store), "--repair")
    assert repaired.returncode == 0 and "removed" in repaired.stdout
    assert run_reapi("cas", "verify", "--storage", str(store)).returncode == 0
    assert cas_json(store)["blobs"] == 0


def test_lookups_reads_and_cache_hits_protect_blobs_from_gc(tmp_path: Path) -> None:
    """Blobs a client has just been told about (FindMissingBlobs), read
    (BatchReadBlobs, ByteStream), or got through an action-cache hit, survive a
    gc that evicts everything else; a gc run while the server serves."""
    store = tmp_path / "store"
    server = ServerProcess(store)
    try:
        looked_up, batch_read, streamed, output, untouched = upload(
            server.address,
            [b"looked up", b"batch read", b"s" * (SMALL_BLOB + 1), b"an output", b"untouched"],
        )
        action = DigestFunction.SHA256.digest_of(b"some action")
        with grpc.insecure_channel(server.address) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            cache = re_grpc.ActionCacheStub(channel)
            result = re_pb2.ActionResult(
                output_files=[re_pb2.OutputFile(path="out", digest=output.to_proto())]
            )
            cache.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    action_digest=action.to_proto(), action_result=result
                )
            )
            age_everything(store, OLD)
            missing = cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=[looked_up.to_proto()])
            )
            assert not missing.missing_blob_digests
            cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[batch_read.to_proto()]))
            name = f"blobs/{streamed.hash}/{streamed.size}"
            assert b"".join(
                r.data for r in bs_grpc.ByteStreamStub(channel).Read(
                    bs_pb2.ReadRequest(resource_name=name))
            ) == b"s" * (SMALL_BLOB + 1)  # fmt: skip
            cache.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))

            gc = run_reapi("cas", "gc", "--storage", str(store), "--max-size", "0")
            assert gc.returncode == 0, gc.stderr
            asked = [looked_up, batch_read, streamed, output, untouched]
            missing = cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto() for d in asked])
            )
            assert [Digest.from_proto(DigestFunction.SHA256, d) for d in
                    missing.missing_blob_digests] == [untouched]  # fmt: skip
            hit = cache.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=action.to_proto())
            )
            assert hit.output_files[0].digest == output.to_proto()
    finally:
        server.stop()


def test_the_server_keeps_itself_under_max_size(tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = ServerProcess(store, "--max-size", "100K", "--gc-interval", "0.3")
    try:
        upload(server.address, [os.urandom(10_000) for _ in range(30)])  # 300 KB
        assert int(cas_json(store)["bytes"]) == 300_000
        age_everything(store, OLD)
        deadline = time.monotonic() + 30
        while int(cas_json(store)["bytes"]) > 100 * 1024:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        # Down to the low watermark (90% of 100K), not just under the high one.
        assert int(cas_json(store)["bytes"]) <= 0.9 * 100 * 1024
        assert "background gc" in server.log()
        # Fresh blobs over the limit stay: the grace period.
        upload(server.address, [os.urandom(10_000) for _ in range(20)])
        time.sleep(1.0)
        assert int(cas_json(store)["bytes"]) >= 200_000
    finally:
        server.stop()


@pytest.mark.slow
def test_a_make_build_through_the_shim_while_gc_runs(tmp_path: Path) -> None:
    """zlib built through reapi-cc while `reapi cas gc --max-size 0` runs in a
    loop. The store holds a build from "yesterday" (aged past the grace period)
    and old junk: gc evicts the junk, and the build sees no missing blob, no
    failed action, and gives the same objects as plain gcc."""
    source = debian_source("zlib")
    plain = shutil.copytree(source, tmp_path / "plain")
    run(["./configure"], plain)
    run(["make", "-j2", "libz.a"], plain)
    expected = objects(plain)

    store = tmp_path / "store"
    server = ServerProcess(store, workers=2)

    def shim_env(home: str) -> dict[str, str]:
        return shim_env_for(server.address, tmp_path / home)

    yesterday = shutil.copytree(source, tmp_path / "yesterday")
    try:
        run(["./configure"], yesterday, shim_env("home1"))
        run(["make", "-j2", "libz.a"], yesterday, shim_env("home1"))
        subprocess.run(["reapi-cc", "--stats"], env=shim_env("home1"), check=True,
                       capture_output=True)  # fmt: skip
        upload(server.address, [os.urandom(5000) for _ in range(200)])  # junk
        age_everything(store, OLD)
        junk_and_yesterday = cas_json(store)["blobs"]

        stop = threading.Event()
        runs: list[subprocess.CompletedProcess[str]] = []

        def collect_again_and_again() -> None:
            while not stop.is_set():
                runs.append(run_reapi("cas", "gc", "--storage", str(store), "--max-size", "0"))

        collector = threading.Thread(target=collect_again_and_again)
        collector.start()
        try:
            today = shutil.copytree(source, tmp_path / "today")
            env = shim_env("home2")  # a fresh agent, as on the next day
            run(["./configure"], today, env)
            run(["make", "-j2", "libz.a"], today, env)
            run(["make", "clean"], today, env)
            (today / "adler32.c").write_text((today / "adler32.c").read_text() + "\n/* x */\n")
            run(["make", "-j2", "libz.a"], today, env)
        finally:
            stop.set()
            collector.join()
        assert len(runs) >= 3 and all(r.returncode == 0 for r in runs), runs[-1:]
        assert cas_json(store)["blobs"] < junk_and_yesterday  # gc really evicted
        assert objects(today) == expected
        found = stats(env)
        reasons = found["local_reasons"]
        assert not {"remote-error", "remote-output-missing"} & set(reasons), found
        assert found["remote_executions"] >= 1 and found["cache_hits"] >= len(expected) - 1, found
    finally:
        server.stop()
        stop_agents(tmp_path / "home1", tmp_path / "home2")
