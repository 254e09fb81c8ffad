"""Headers outside the project, and a remote side that fails: through reapi-cc
against the real server and workers, in every mode, no build fails that
passes with gcc, and every object is gcc's, byte for byte.

- Headers in /opt, /usr/local/include, a home-directory SDK (-isystem) and an
  include directory that is a symbolic link into one of those.
- A directory the workers say they provide (`reapi worker --provide`): the
  agent learns it from the server and sends nothing from there.
- A remote compile that fails for a reason of the worker's own (it may not
  write files that large): compiled here, gcc's own output, counted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from reapi.core.digests import Digest, DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.helpers import ServerProcess, WorkerProcess
from tests.shim.compiles import MODES, compile_both, write


@pytest.fixture
def system_places() -> Iterator[tuple[Path, Path]]:
    """A directory of its own in /opt, and a header name of its own in
    /usr/local/include (both removed afterwards)."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root: they write to /opt and /usr/local/include")
    tag = uuid.uuid4().hex[:8]
    opt = Path(f"/opt/reapi-test-{tag}")
    local = Path(f"/usr/local/include/reapi_test_{tag}.h")
    try:
        yield opt, local
    finally:
        shutil.rmtree(opt, ignore_errors=True)
        local.unlink(missing_ok=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("debug", [False, True], ids=["O2", "g"])
def test_headers_outside_the_project(
    tmp_path: Path,
    shim_env: dict[str, str],
    system_places: tuple[Path, Path],
    mode: str,
    debug: bool,
) -> None:
    opt, local = system_places
    write(
        opt, {"include/opt_sdk.h": "#define OPT 1\nstatic inline int opt(void) { return OPT; }\n"}
    )
    write(opt, {"linked/linked.h": "#define LINKED 4\n"})
    local.write_text("#define LOCAL 2\n")
    home = write(tmp_path / "home", {"sdk/include/home_sdk.h": "#define HOME 3\n"})
    project = write(
        tmp_path / "p",
        {
            "a.c": f"#include <opt_sdk.h>\n#include <{local.name}>\n#include <home_sdk.h>\n"
            '#include "linked.h"\nint v(void) { return opt() + LOCAL + HOME + LINKED; }\n',
        },
    )
    (project / "via-link").symlink_to(opt / "linked")
    arguments = [
        f"-I{opt}/include", "-isystem", str(home / "sdk/include"), "-Ivia-link",
        "-g" if debug else "-O2", "-c", "a.c", "-o", "a.o",
    ]  # fmt: skip
    compared = compile_both(project, arguments, shim_env, mode)
    assert compared.actual == compared.expected
    assert compared.remote, compared.moved
    assert "local_fallbacks" not in compared.moved, compared.moved


def test_a_directory_the_workers_provide_is_not_sent(
    tmp_path: Path, reapi_home: Path, system_places: tuple[Path, Path]
) -> None:
    opt, _ = system_places
    header = write(opt, {"include/toolchain.h": "#define TOOLCHAIN 7\n"}) / "include/toolchain.h"
    server = ServerProcess(tmp_path / "storage")
    worker = WorkerProcess(server, "provider", tmp_path / "worker", extra=["--provide", str(opt)])
    try:
        worker.wait_connected()
        env = dict(os.environ, REAPI_SERVER=f"grpc://{server.address}", REAPI_HOME=str(reapi_home))
        project = write(tmp_path / "p", {"a.c": "#include <toolchain.h>\nint t = TOOLCHAIN;\n"})
        for mode in ("deps", "scan"):
            arguments = [f"-I{opt}/include", "-c", "a.c", "-o", "a.o"]
            compared = compile_both(project, arguments, env, mode)
            assert compared.actual == compared.expected
            assert compared.remote, compared.moved
        digest = DigestFunction.SHA256.digest_of(header.read_bytes())
        assert find_missing(server, digest), "the provided header was sent"
    finally:
        worker.stop()
        server.stop()


def find_missing(server: ServerProcess, digest: Digest) -> bool:
    with grpc.insecure_channel(server.address) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        request = re_pb2.FindMissingBlobsRequest(blob_digests=[digest.to_proto()])
        return bool(cas.FindMissingBlobs(request).missing_blob_digests)


BIG = "#include <stdio.h>\nchar big[300000] = {1};\nint f(void) { int unused; return big[0]; }\n"


def test_a_remote_failure_is_compiled_here(tmp_path: Path, reapi_home: Path) -> None:
    """The worker may not write a file larger than 100 KiB (RLIMIT_FSIZE), so
    the object cannot be written there: the compile runs here instead, and
    make sees gcc's own warnings and result, whatever the mode."""
    server = ServerProcess(tmp_path / "storage")
    limit = ["prlimit", f"--fsize={100 * 1024}"]
    worker = WorkerProcess(server, "cramped", tmp_path / "worker", wrapper=limit)
    try:
        worker.wait_connected()
        env = dict(os.environ, REAPI_SERVER=f"grpc://{server.address}", REAPI_HOME=str(reapi_home))
        project = write(tmp_path / "p", {"a.c": BIG})
        for mode in MODES:
            compared = compile_both(project, ["-Wall", "-c", "a.c", "-o", "a.o"], env, mode)
            assert compared.actual == compared.expected, mode
            assert b"unused variable" in compared.gcc.stderr
            assert compared.shim.stderr == compared.gcc.stderr, mode
            reasons = compared.moved.get("local_reasons")
            assert reasons == {"remote-failed-local-ok": 1}, compared.moved
    finally:
        worker.stop()
        server.stop()
