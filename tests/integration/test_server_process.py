"""The `reapi serve` process: startup errors, health, graceful stop, config file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cas.disk import FLUSH_BYTES
from reapi.core.digests import DigestFunction
from reapi.protos import bytestream_pb2 as bs_pb2
from reapi.protos import bytestream_pb2_grpc as bs_grpc
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.helpers import REPO, ServerProcess


def run_reapi(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reapi", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reapi: ")
    return lines[0]


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_reapi(
            "serve", "--listen", f"127.0.0.1:{port}", "--storage", str(tmp_path / "s")
        )
    assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(result)


def test_unwritable_storage(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result = run_reapi("serve", "--listen", "127.0.0.1:0", "--storage", str(blocker / "store"))
    assert "cannot use storage directory" in one_line_error(result)


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "example.com:8980"])
def test_non_loopback_needs_tls_and_tokens(tmp_path: Path, address: str) -> None:
    result = run_reapi("serve", "--listen", address, "--storage", str(tmp_path / "s"))
    assert "refusing to listen on" in one_line_error(result)


def test_bad_listen_and_config(tmp_path: Path) -> None:
    assert "expected HOST:PORT" in one_line_error(run_reapi("serve", "--listen", "nonsense"))
    config = tmp_path / "reapi.toml"
    config.write_text('colour = "blue"\n')
    assert "unknown setting 'colour'" in one_line_error(run_reapi("serve", "--config", str(config)))
    config.write_text('instance = "team-a"\n')
    assert "instance: expected a list" in one_line_error(
        run_reapi("serve", "--config", str(config))
    )
    for bad in ("0", "-5", "nan"):
        refused = run_reapi("serve", "--listen", "127.0.0.1:0", "--idle-timeout", bad)
        assert "expected seconds > 0" in one_line_error(refused)
    tokens = tmp_path / "tokens"
    tokens.write_text("# no tokens here\n")
    assert "holds no token" in one_line_error(
        run_reapi("serve", "--listen", "127.0.0.1:0", "--auth-tokens", str(tokens))
    )


def test_bad_worker_options(tmp_path: Path) -> None:
    """Each a line and exit 2 before anything starts: a server address of no
    known form (among good ones), a limit that is no size, an empty token file."""
    good = "grpc://127.0.0.1:1"
    bad_server = run_reapi("worker", "--server", good, "--server", "http://127.0.0.1:1")
    assert "--server: server address 'http://127.0.0.1:1'" in one_line_error(bad_server)
    for option, value in (("--max-tree", "lots"), ("--max-processes", "0")):
        assert option in one_line_error(run_reapi("worker", "--server", good, option, value))
    token = tmp_path / "token"
    token.write_text("# none\n")
    empty = run_reapi("worker", "--server", good, "--auth-token-file", str(token))
    assert "holds no token" in one_line_error(empty)


@pytest.fixture
def insecure_everywhere(tmp_path: Path) -> Iterator[ServerProcess]:
    config = tmp_path / "reapi.toml"
    config.write_text("insecure = true\n")
    server = ServerProcess(tmp_path / "storage", "--listen", "0.0.0.0:0", "--config", str(config))
    yield server
    server.stop()


def test_insecure_flag_allows_any_address(insecure_everywhere: ServerProcess) -> None:
    assert "serving on 0.0.0.0:" in insecure_everywhere.log()
    with grpc.insecure_channel(insecure_everywhere.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING


# More than the server buffers before it writes a temp file, so the test can see
# from tmp/ that both uploads have arrived.
FIRST = FLUSH_BYTES + 100_000


def test_health_and_graceful_stop(reapi_server: ServerProcess) -> None:
    """On SIGTERM, an upload that finishes within the grace period is kept; one
    left unfinished is discarded, leaving no partial file behind."""
    finished_data, unfinished_data = os.urandom(2 * FIRST), os.urandom(2 * FIRST)
    finished = DigestFunction.SHA256.digest_of(finished_data)
    unfinished = DigestFunction.SHA256.digest_of(unfinished_data)

    def slow_upload(data: bytes, finish: bool) -> Iterator[bs_pb2.WriteRequest]:
        digest = DigestFunction.SHA256.digest_of(data)
        name = f"uploads/{uuid.uuid4()}/blobs/{digest.resource_path()}"
        yield bs_pb2.WriteRequest(resource_name=name, data=data[:FIRST])
        time.sleep(2)  # the server receives SIGTERM meanwhile
        if finish:
            yield bs_pb2.WriteRequest(write_offset=FIRST, data=data[FIRST:], finish_write=True)

    with grpc.insecure_channel(reapi_server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        bytestream = bs_grpc.ByteStreamStub(channel)
        done = bytestream.Write.future(slow_upload(finished_data, finish=True))
        left = bytestream.Write.future(slow_upload(unfinished_data, finish=False))
        deadline = time.monotonic() + 10
        while len(list((reapi_server.storage / "tmp").iterdir())) < 2:
            assert time.monotonic() < deadline, "the uploads never reached the server"
            time.sleep(0.05)
        assert reapi_server.stop() == 0
        assert done.result(timeout=30).committed_size == finished.size
        assert left.result(timeout=30).committed_size == FIRST
    assert "stopping" in reapi_server.log()
    assert list((reapi_server.storage / "tmp").iterdir()) == [], "unfinished upload left behind"
    restarted = ServerProcess(reapi_server.storage)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            missing = cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(
                    blob_digests=[finished.to_proto(), unfinished.to_proto()]
                )
            )
        assert list(missing.missing_blob_digests) == [unfinished.to_proto()]
    finally:
        assert restarted.stop() == 0
