"""The shim's per-user agent: turns compiles into REAPI actions.

Started on demand by `reapi-cc` (`python -m shim.agent`); listens on
$REAPI_HOME/shim/agent.sock, keeps the gRPC channel, the digest cache, the
include scanner and what the server is known to hold, and exits after
IDLE_SECONDS without work. One agent per user: a lock file keeps a second one
from starting.

Each compile goes down one pipeline, a stage per module:

    argv -> classify (shim/classify.py: every local decision, pure)
         -> direct mode (shim/memo.py): an unchanged compile's action, if remembered
         -> an input mode finds the inputs (shim/modes.py: deps, cpp, scan)
         -> laid out as an input tree (shim/layout.py)
         -> the Action built (shim/action.py, pure)
         -> uploaded, executed, results fetched (shim/remote.py)
         -> outputs written (shim/outputs.py)

Anything that goes wrong on the remote side answers "local", and `reapi-cc`
runs the real compiler.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from reapi.digests import Digest
from reapi.errors import ReapiError
from reapi.protos import remote_execution_pb2 as re_pb2
from shim.action import build_action
from shim.classify import Local, classify, expand_response_files
from shim.inputs import DigestCache, InputsUnknown, is_system
from shim.layout import PASSED_ENVIRONMENT, lay_out
from shim.manifest import Manifests
from shim.memo import DirectMemo, scan_depends
from shim.modes import Compile, input_modes
from shim.options import Kind, lookup
from shim.outputs import write_outputs
from shim.protocol import (
    HEADER_SIZE,
    decode_length,
    encode_reply,
    parse_request,
    socket_path,
    state_dir,
)
from shim.remote import Server
from shim.scan import Scanner
from shim.stats import Stats

log = logging.getLogger("reapi.agent")

IDLE_SECONDS = 600.0
DEFAULT_SERVER = "grpc://127.0.0.1:8980"
NATIVE_SOURCE = Path(__file__).parent / "native" / "reapi-cc.c"


class Agent:
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.digests = DigestCache()
        self.scanner = Scanner()
        self.memo = DirectMemo()
        self.manifests = Manifests()
        self.modes = input_modes(self.scanner)
        self._servers: dict[str, Server] = {}
        self.last_used = time.monotonic()

    def server(self, target: str) -> Server:
        if target not in self._servers:
            self._servers[target] = Server(target)
        return self._servers[target]

    async def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self.last_used = time.monotonic()
        if request.get("op") == "stats":
            return {"stats": self.stats.values}
        if request.get("op") == "zero-stats":
            self.stats.zero()
            return {"stats": self.stats.values}
        self.stats.add("invocations")
        try:
            return await self._compile(request)
        except InputsUnknown as unknown:
            return self.stats.local(str(unknown))
        except (grpc.aio.AioRpcError, ReapiError, OSError, ValueError) as error:
            log.warning("remote compile failed, compiling locally: %s", error)
            return self.stats.local("remote-error")

    async def _compile(self, request: Mapping[str, Any]) -> dict[str, Any]:
        cwd: str = request["cwd"]
        compiler, *arguments = request["argv"]
        env: dict[str, str] = dict(request["env"])

        def read(path: str) -> str | None:
            try:
                return Path(cwd, path).read_text()
            except OSError:
                return None

        decision = classify(expand_response_files(arguments, read), env)
        if isinstance(decision, Local):
            return self.stats.local(decision.reason)
        if _absolute_project_path(decision.arguments):
            return self.stats.local("absolute-project-path")
        mode = env.get("REAPI_CC_MODE", "deps")
        return await self._remote_compile(Compile(cwd, compiler, decision, env, mode))

    async def _remote_compile(self, compile: Compile) -> dict[str, Any]:
        started_ns = time.time_ns()
        server = self.server(compile.env.get("REAPI_SERVER") or DEFAULT_SERVER)
        memo_key = None
        if compile.mode in ("deps", "scan"):
            # What the action depends on besides files: PASSED_ENVIRONMENT reaches it.
            passed = map(compile.env.get, PASSED_ENVIRONMENT)
            memo_key = (
                compile.mode,
                compile.cwd,
                compile.compiler,
                *compile.decision.arguments,
                *passed,
            )
        remembered = self.memo.get(memo_key, self.scanner.unchanged) if memo_key else None
        outputs = compile.outputs
        result = None
        if remembered is not None:
            result = await server.cached_result(remembered, outputs)
        depends = None
        if result is not None:
            self.stats.add("cache_hits")
            self.stats.add("direct_hits")
        else:
            # Execute answers from the action cache itself when it can: asking the
            # cache first would cost every new compile one more round trip.
            mode = "deps" if compile.mode == "cpp" and compile.debug else compile.mode
            # A debug build from preprocessed text differs from the local compile (its
            # line tables name the .i file), even on this machine: it takes `deps` inputs.
            inputs = await self.modes.get(mode, self.modes["deps"]).find(compile)
            if inputs.scan_fallback:
                self.stats.add_reason(
                    "scan_fallbacks", "scan_fallback_reasons", inputs.scan_fallback
                )
            spec = lay_out(compile, inputs, self.digests, self.manifests)
            built = build_action(spec)
            if inputs.scanned and not spec.do_not_cache:  # else nothing to find next time
                programs = [compile.compiler, *self.manifests.programs(compile.compiler)]
                depends = scan_depends(inputs.scanned.result, inputs.scanned.search, programs)
            sent = await server.upload([*built.blobs, *built.files], self._data_of(built.blobs))
            self.stats.add("bytes_uploaded", sent)
            executed = await server.execute(built.action, spec.outputs)
            result = executed.result
            self.stats.add("cache_hits" if executed.cached_result else "remote_executions")
        if result.exit_code == 0 and compile.decision.output not in {
            f.path for f in result.output_files
        }:
            return self.stats.local("remote-output-missing")
        if result.exit_code != 0 and compile.mode == "scan":
            # Most likely a real error, but a header the scanner missed looks the
            # same: the local compiler has the last word.
            return self.stats.local("scan-remote-failed")
        files = await server.output_files(result)
        self.stats.add("bytes_downloaded", sum(len(data) for _, data, _ in files))
        write_outputs(compile.cwd, files)
        if memo_key and depends and result.exit_code == 0:
            self.memo.put(memo_key, built.action, depends, started_ns)
        stdout = await self._stream(server, result, "stdout")
        stderr = await self._stream(server, result, "stderr")
        return {"do": "exit", "code": result.exit_code, "stdout": stdout, "stderr": stderr}

    async def _stream(self, server: Server, result: re_pb2.ActionResult, name: str) -> bytes:
        data = await server.stream(result, name)
        if not getattr(result, f"{name}_raw"):
            self.stats.add("bytes_downloaded", len(data))
        return data

    def _data_of(self, blobs: dict[Digest, bytes]) -> Callable[[Digest], bytes]:
        """The bytes of a blob: made here, or a file the digest cache read."""

        def data_of(digest: Digest) -> bytes:
            data = blobs.get(digest)
            return Path(self.digests.data[digest]).read_bytes() if data is None else data

        return data_of


def _absolute_project_path(arguments: Sequence[str]) -> bool:
    """An absolute path outside the system directories: the remote tree is
    relative, so such a compile stays local."""
    for argument in arguments:
        value: str | None = argument
        if argument.startswith("-"):
            option, value = lookup(argument)
            if option is None or not option.kind & Kind.PATH or value is None:
                continue
        if os.path.isabs(value or "") and not is_system(value or ""):
            return True
    return False


async def _serve_connection(
    agent: Agent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        length = decode_length(await reader.readexactly(HEADER_SIZE))
        request = parse_request(await reader.readexactly(length))
        reply = await agent.handle(request)
        writer.write(encode_reply(reply))
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError) as error:
        log.warning("bad request: %s", error)
    finally:
        writer.close()


async def build_native_client(directory: Path) -> None:
    """Compile the native client (shim/native/reapi-cc.c) into `directory`,
    where the reapi-cc script looks for it, unless the one there was built
    from the same source. A failure only leaves the Python client in use."""
    source = NATIVE_SOURCE.read_bytes()
    stamp = hashlib.sha256(source).hexdigest()
    target, stamp_path = directory / "reapi-cc-native", directory / "reapi-cc-native.sha256"
    with contextlib.suppress(OSError):
        if target.exists() and stamp_path.read_text() == stamp:
            return
    building = directory / f"reapi-cc-native.{os.getpid()}"
    # cc may be reapi-cc itself (a masquerade symlink early on PATH): keep it local.
    env = dict(os.environ, REAPI_CC_DISABLE="1")
    try:
        process = await asyncio.create_subprocess_exec(
            "cc", "-O2", "-o", str(building), str(NATIVE_SOURCE), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await process.communicate()
        if process.returncode != 0:
            log.warning("native client not built, using Python's: %s", output.decode()[-2000:])
            return
        # It must run from here (not a noexec mount): without arguments it exits 2.
        probe = await asyncio.create_subprocess_exec(str(building), stdin=subprocess.DEVNULL)
        if await probe.wait() != 2:
            log.warning("native client does not run from %s, using Python's", directory)
            return
        os.replace(building, target)
        stamp_path.write_text(stamp)
        log.info("native client built: %s", target)
    except OSError as error:
        log.warning("native client not built, using Python's: %s", error)
    finally:
        with contextlib.suppress(FileNotFoundError):
            building.unlink()


async def run_agent(idle_seconds: float = IDLE_SECONDS) -> None:
    directory = Path(state_dir())
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "agent.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another agent serves this user
        path = Path(socket_path())
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        (directory / "agent.pid").write_text(str(os.getpid()))
        agent = Agent(Stats(directory / "stats.json"))
        server = await asyncio.start_unix_server(
            lambda r, w: _serve_connection(agent, r, w), path=str(path)
        )
        log.info("agent listening on %s", path)
        native = asyncio.create_task(build_native_client(directory))
        async with server:
            while time.monotonic() - agent.last_used < idle_seconds:
                await asyncio.sleep(1.0)
                agent.stats.flush()
        agent.stats.flush()
        native.cancel()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reapi-agent %(message)s")
    asyncio.run(run_agent(float(os.environ.get("REAPI_AGENT_IDLE", IDLE_SECONDS))))


if __name__ == "__main__":
    main()
