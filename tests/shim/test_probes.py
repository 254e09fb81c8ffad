"""Files a compile probes (`__has_include`) without reading them: gcc's own
list leaves them out, yet they decide the object. Through reapi-cc against the
real server and workers, in every mode, each object is compared with gcc's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reapi.core.conventions import ABSENT, PROVIDED_DIRS
from shim.agent import Agent
from shim.classify import RemoteCompile, classify
from shim.layout import lay_out
from shim.manifest import MANIFEST
from shim.modes import Compile
from shim.stats import Stats
from tests.helpers import ServerProcess, WorkerProcess
from tests.shim.compiles import MODES, compile_both, write

PROBER = {
    "src/a.c": '#if __has_include("sub/extra.h")\nint has_extra = 1;\n#else\n'
    "int has_extra = 0;\n#endif\n"
    "#if __has_include(<lib.h>)\nint has_lib = 1;\n#endif\n",
    "src/sub/extra.h": "#error never included\n",
    "inc/lib.h": "#error never included\n",
}


@pytest.mark.parametrize("mode", MODES)
def test_a_probed_project_file_is_sent(tmp_path: Path, shim_env: dict[str, str], mode: str) -> None:
    project = write(tmp_path / "p", PROBER)
    arguments = ["-Iinc", "-O2", "-c", "src/a.c", "-o", "a.o"]
    compared = compile_both(project, arguments, shim_env, mode)
    assert compared.actual == compared.expected
    assert compared.remote, compared.moved
    # Without the probed file the object differs: the test can fail.
    (project / "src/sub/extra.h").unlink()
    other = subprocess.run(["gcc", *arguments], cwd=project, capture_output=True)
    assert other.returncode == 0
    assert (project / "a.o").read_bytes() != compared.expected


USE = "#if HAS_EXTRA\nint x = 1;\n#endif\n"
PROBES_FROM_THE_TEXT_ALONE = {
    "macro-built name": ({"a.c": '#define N "sub/extra.h"\n' + PROBER["src/a.c"]}, []),
    "in a macro body": (
        {"a.c": '#define HAS_EXTRA __has_include("sub/extra.h")\n' + USE},
        [],
    ),
    "in an option": ({"a.c": USE}, ['-DHAS_EXTRA=__has_include("sub/extra.h")']),
    "_next": ({"a.c": "#define HAS_EXTRA __has_include_next(<stdio.h>)\n" + USE}, []),
}


@pytest.mark.parametrize("case", sorted(PROBES_FROM_THE_TEXT_ALONE))
def test_a_probe_the_text_cannot_answer_is_preprocessed_here(
    tmp_path: Path, shim_env: dict[str, str], case: str
) -> None:
    files, options = PROBES_FROM_THE_TEXT_ALONE[case]
    project = write(tmp_path / "p", {**files, "sub/extra.h": "\n"})
    if case == "macro-built name":
        files["a.c"] = files["a.c"].replace('__has_include("sub/extra.h")', "__has_include(N)")
        write(project, files)
    arguments = [*options, "-O2", "-c", "a.c", "-o", "a.o"]
    for mode in ("deps", "scan"):
        compared = compile_both(project, arguments, shim_env, mode)
        assert compared.actual == compared.expected, mode
        assert compared.moved.get("preprocessed_here") == 1, compared.moved
        assert compared.remote, compared.moved
    # A debug build cannot be preprocessed here (its line tables would name
    # the .i file): it stays local, with the reason.
    compared = compile_both(project, [*arguments, "-g"], shim_env, "deps")
    assert compared.actual == compared.expected
    assert list(compared.moved.get("local_reasons", {}).values()) == [1], compared.moved


def test_probes_in_system_headers_are_in_the_manifest(tmp_path: Path) -> None:
    """libstdc++ probes <tbb/tbb.h> (for its parallel algorithms) in every
    C++ compile: a worker that has TBB would answer otherwise, so its places
    are listed ABSENT, though gcc -M never names them."""
    assert not os.path.exists("/usr/include/tbb/tbb.h")  # (as on a machine without TBB)
    (tmp_path / "a.cc").write_text("#include <vector>\nint f() { return 1; }\n")
    decision = classify(["-std=c++17", "-c", "a.cc", "-o", "a.o"])
    assert isinstance(decision, RemoteCompile)
    agent = Agent(Stats(tmp_path / "stats.json"))
    for mode in ("deps", "scan"):
        compile = Compile(str(tmp_path), "/usr/bin/g++", decision, {}, mode, PROVIDED_DIRS)
        inputs = asyncio.run(agent.modes[mode].find(compile))
        spec = lay_out(compile, inputs, agent.digests, agent.manifests, None).spec
        manifest = spec.contents[MANIFEST].decode().splitlines()
        assert f"{ABSENT} 0 /usr/include/tbb/tbb.h" in manifest, mode


@pytest.fixture
def shared_include() -> Iterator[Path]:
    """/usr/local/include, which gcc searches before /usr/include; the
    tests give it contents in mount namespaces of their own only."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root: they make mount namespaces")
    path = Path("/usr/local/include")
    assert path.is_dir()
    yield path


# A mount namespace where /usr/local/include holds reapi_probe_only.h.
NAMESPACE = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
ONLY_THERE = (
    "mount -t tmpfs tmpfs /usr/local/include && "
    'echo "int probe_only;" > /usr/local/include/reapi_probe_only.h && '
)


ONLY = "#if __has_include(<reapi_probe_only.h>)\nint x = 1;\n#else\nint x = 0;\n#endif\n"


def test_a_system_header_only_the_worker_has(
    tmp_path: Path, shared_include: Path, reapi_home: Path
) -> None:
    """Its worker would take the other branch: it refuses (the probe's place
    is listed ABSENT) and the compile runs here, or goes preprocessed."""
    server = ServerProcess(tmp_path / "storage")
    # (the wrapper's last word is the script: the worker's command line follows as "$@")
    wrapper = [*NAMESPACE, ONLY_THERE + 'exec "$@"', "sh"]
    worker = WorkerProcess(server, "only-here", tmp_path / "worker", wrapper=wrapper)
    try:
        worker.wait_connected()
        env = dict(os.environ, REAPI_SERVER=f"grpc://{server.address}", REAPI_HOME=str(reapi_home))
        project = write(tmp_path / "p", {"a.c": ONLY})
        for mode in MODES:
            compared = compile_both(project, ["-c", "a.c", "-o", "a.o"], env, mode)
            assert compared.actual == compared.expected, mode
            if mode == "cpp":  # the probe was answered here
                assert compared.remote, compared.moved
            else:
                assert compared.moved.get("local_reasons") == {"worker-refused": 1}, mode
    finally:
        worker.stop()
        server.stop()


def test_a_system_header_only_the_client_has(
    tmp_path: Path, shared_include: Path, shim_env: dict[str, str]
) -> None:
    """The manifest names the header with its digest: the worker, which
    lacks it, refuses, and the compile runs here; cpp mode sends the answer."""
    project = write(tmp_path / "p", {"a.c": ONLY})
    home = tmp_path / "namespace-home"  # an agent started inside the namespace
    env = shim_env | {"REAPI_HOME": str(home)}
    results = {}
    try:
        for mode in MODES:
            script = (
                "gcc -c a.c -o expected.o && "
                f"REAPI_CC_MODE={mode} reapi-cc gcc -c a.c -o a.o && "
                "cmp expected.o a.o && reapi-cc --stats --json"
            )
            done = subprocess.run(
                [*NAMESPACE, ONLY_THERE + f"cd {project} && {script}"],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            results[mode] = done.stdout
    finally:
        stop_agent(home)
    assert '"worker-refused": 2' in results["cpp"], results  # deps and scan
    assert '"remote_executions": 1' in results["cpp"], results  # cpp
    gcc = subprocess.run(["gcc", "-c", "a.c", "-o", "here.o"], cwd=project)
    assert gcc.returncode == 0
    assert (project / "here.o").read_bytes() != (project / "a.o").read_bytes()  # x = 0 here


def stop_agent(home: Path) -> None:
    pid_file = home / "shim" / "agent.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
