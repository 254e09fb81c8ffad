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
         -> outputs written (shim/outputs.py), dependency files and diagnostics
            naming local paths (shim/paths.py)

A compile that cannot go remote answers "local", and `reapi-cc` runs the
real compiler; one whose remote side fails or exits non-zero is compiled
here by the agent itself, which counts how that went (a remote failure
where gcc succeeds is a problem to see in --stats).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cas.gc import parse_size
from reapi.core.conventions import provided_by
from reapi.core.credentials import read_token
from reapi.core.digests import Digest
from reapi.core.errors import PermissionDenied, ReapiError
from reapi.protos import remote_execution_pb2 as re_pb2
from shim.action import build_action
from shim.classify import Local, classify, expand_response_files
from shim.inputs import DigestCache, InputsUnknown, PreprocessHere
from shim.layout import PASSED_ENVIRONMENT, Layout, lay_out
from shim.manifest import Manifests
from shim.memo import DirectMemo, scan_depends
from shim.modes import DEFAULT_MODE, Compile, Inputs, input_modes
from shim.outputs import reflow_dependencies, write_outputs
from shim.paths import PathMap, RootFinder, Roots, Unmappable, to_local_text
from shim.protocol import (
    HEADER_SIZE,
    decode_length,
    encode_reply,
    parse_request,
    socket_path,
    state_dir,
)
from shim.remote import OUTCOME_MEMORY, Outcome, RemoteFailed, Server
from shim.scan import Scanner
from shim.stats import Stats

log = logging.getLogger("reapi.agent")

IDLE_SECONDS = 600.0
DEFAULT_SERVER = "grpc://127.0.0.1:8980"
NATIVE_SOURCE = Path(__file__).parent / "native" / "reapi-cc.c"


@dataclass(frozen=True)
class Placed:
    """An action, with what taking its result needs: where its outputs go."""

    action: Digest
    paths: PathMap
    workdir: str  # the sandbox's working directory
    outputs: list[str]  # as the action names them

    def local(self, path: str) -> str:
        """Where an output the action names goes here."""
        return self.paths.local(os.path.normpath(os.path.join(self.workdir, path)))


class Agent:
    def __init__(
        self, stats: Stats, scratch: str | None = None, memory: int = OUTCOME_MEMORY
    ) -> None:
        """`scratch`: a directory for the preprocessor's files (default: the
        system's temporary directory); `memory`: bytes of outcomes kept per
        server (REAPI_CC_MEMORY)."""
        self.stats = stats
        self.memory = memory
        self.digests = DigestCache()
        self.scanner = Scanner()
        self.memo: DirectMemo[Placed] = DirectMemo()
        self.manifests = Manifests()
        self.roots = RootFinder()
        self.modes = input_modes(self.scanner, scratch or tempfile.gettempdir())
        self._servers: dict[tuple[str, str | None, str | None], Server] = {}
        self.last_used = time.monotonic()

    def server(self, env: Mapping[str, str]) -> Server:
        """The server a compile's environment names (REAPI_SERVER), reached
        with its token (REAPI_TOKEN_FILE: a file whose first word is the token)
        and CA (REAPI_TLS_CA: PEM, for a grpcs:// server whose certificate the
        system does not trust). Raises OSError or ValueError when a file cannot
        be read or holds no token."""
        target = env.get("REAPI_SERVER") or DEFAULT_SERVER
        token_file, ca_file = env.get("REAPI_TOKEN_FILE"), env.get("REAPI_TLS_CA")
        key = (target, token_file, ca_file)
        if key not in self._servers:
            token = read_token(Path(token_file)) if token_file else None
            tls_ca = Path(ca_file).read_bytes() if ca_file else None
            self._servers[key] = Server(target, self.memory, token=token, tls_ca=tls_ca)
        return self._servers[key]

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
        except (InputsUnknown, Unmappable) as unknown:
            return self.stats.local(str(unknown))
        except RemoteFailed as failed:
            log.warning("the remote side did not run a compile, compiling locally: %s", failed)
            return self.stats.local(failed.reason)
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
        server = self.server(env)
        provided = await server.provided()
        # (the compiler's programs, its own binary first, as real paths)
        if not all(provided_by(p, provided) for p in self.manifests.programs(compiler)):
            return self.stats.local("compiler-not-provided")
        mode = env.get("REAPI_CC_MODE") or DEFAULT_MODE
        compile = Compile(cwd, compiler, decision, env, mode, provided)
        outcome, placed = await self._outcome(server, compile)
        if outcome.exit_code != 0:
            # Most likely a real error, but one of the remote side's own (a
            # header it lacks, a full disk) looks the same: the local compiler
            # has the last word, and its own output reaches make.
            return await self._compile_here(request)
        where = {placed.local(path): (data, executable) for path, data, executable in outcome.files}
        if _local(cwd, decision.output) not in where:
            return self.stats.local("remote-output-missing")
        if decision.dependency_file is not None:
            dependencies = _local(cwd, decision.dependency_file)
            if dependencies in where:
                data, executable = where[dependencies]
                local = reflow_dependencies(to_local_text(data, placed.paths, True))
                where[dependencies] = (local, executable)
        write_outputs(where)
        return {
            "do": "exit",
            "code": 0,
            "stdout": to_local_text(outcome.stdout, placed.paths),
            "stderr": to_local_text(outcome.stderr, placed.paths),
        }

    async def _outcome(self, server: Server, compile: Compile) -> tuple[Outcome, Placed]:
        """The compile's outcome: remembered, or from the action cache when
        direct mode knows its action, else executed (or found in the cache by
        Execute)."""
        started_ns = time.time_ns()
        roots = self.roots.roots(compile.cwd, compile.env)
        memo_key = None
        if compile.mode in ("deps", "scan"):
            # What the action depends on besides files.
            passed = map(compile.env.get, PASSED_ENVIRONMENT)
            memo_key = (
                compile.mode,
                compile.cwd,
                compile.compiler,
                *compile.decision.arguments,
                *passed,
                roots,
                compile.provided,
            )
        remembered = self.memo.get(memo_key, self.scanner.unchanged) if memo_key else None
        if remembered is not None:
            outcome = server.remembered(remembered.action)
            if outcome is None:
                result = await server.cached_result(remembered.action, remembered.outputs)
                outcome = None if result is None else await self._fetch(server, remembered, result)
            if outcome is not None:
                self.stats.add("cache_hits")
                self.stats.add("direct_hits")
                return outcome, remembered
        inputs, layout = await self._lay_out(compile, roots)
        built = build_action(layout.spec)
        placed = Placed(built.action, layout.paths, layout.workdir, layout.spec.outputs)
        outcome = server.remembered(built.action)
        if outcome is not None:
            self.stats.add("cache_hits")
        elif server.read_only:
            outcome = await self._cached(server, placed)
        else:
            try:
                # Execute answers from the action cache itself when it can: asking
                # the cache first would cost every new compile one more round trip.
                blobs = [*built.blobs, *built.files]
                sent = await server.upload(blobs, self._data_of(built.blobs))
                self.stats.add("bytes_uploaded", sent)
                executed = await server.execute(built.action, layout.spec.outputs)
            except PermissionDenied as refused:
                log.info("the token may only read: from now on the cache only (%s)", refused)
                server.read_only = True
                outcome = await self._cached(server, placed)
            else:
                self.stats.add("cache_hits" if executed.cached_result else "remote_executions")
                outcome = await self._fetch(server, placed, executed.result)
        if memo_key and inputs.scanned and not layout.spec.do_not_cache and outcome.exit_code == 0:
            programs = [compile.compiler, *self.manifests.programs(compile.compiler)]
            scanned = inputs.scanned
            depends = scan_depends(scanned.result, scanned.search, programs)
            if depends is not None:  # (else nothing to find next time)
                self.memo.put(memo_key, placed, depends, started_ns)
        return outcome, placed

    async def _cached(self, server: Server, placed: Placed) -> Outcome:
        """The action cache's outcome for a token that may only read; a miss
        leaves the compile to the local compiler."""
        result = await server.cached_result(placed.action, placed.outputs)
        if result is None:
            raise RemoteFailed("read-only-miss", "not in the cache, and the token may only read")
        self.stats.add("cache_hits")
        return await self._fetch(server, placed, result)

    async def _fetch(self, server: Server, placed: Placed, result: re_pb2.ActionResult) -> Outcome:
        outcome = await server.fetch(placed.action, result)
        self.stats.add("bytes_downloaded", outcome.size)
        return outcome

    async def _lay_out(self, compile: Compile, roots: Roots | None) -> tuple[Inputs, Layout]:
        """The inputs of the compile's mode, laid out; preprocessed here
        instead where that is the only exact way (not for a debug build:
        its line tables would name the preprocessed file)."""
        # A debug build from preprocessed text differs from the local compile, even
        # on this machine: `cpp` takes `deps` inputs for one.
        mode = "deps" if compile.mode == "cpp" and compile.debug else compile.mode
        try:
            inputs = await self.modes.get(mode, self.modes[DEFAULT_MODE]).find(compile)
            if inputs.scan_fallback:
                reason = inputs.scan_fallback
                self.stats.add_reason("scan_fallbacks", "scan_fallback_reasons", reason)
            return inputs, self._layout(compile, inputs, roots)
        except PreprocessHere as why:
            if compile.debug:
                raise
            self.stats.add_reason("preprocessed_here", "preprocessed_reasons", str(why))
        inputs = await self.modes["cpp"].find(compile)
        return inputs, self._layout(compile, inputs, roots)

    def _layout(self, compile: Compile, inputs: Inputs, roots: Roots | None) -> Layout:
        return lay_out(compile, inputs, self.digests, self.manifests, roots)

    async def _compile_here(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Run the compile with the local compiler, as reapi-cc would; counted
        by its outcome, so that a remote side failing where the local compiler
        succeeds shows in the statistics."""
        process = await asyncio.create_subprocess_exec(
            *request["argv"],
            cwd=request["cwd"],
            env=request["env"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        code = process.returncode or 0
        reason = "remote-failed-local-ok" if code == 0 else "compile-error"
        self.stats.add_reason("local_fallbacks", "local_reasons", reason)
        return {"do": "exit", "code": code, "stdout": stdout, "stderr": stderr}

    def _data_of(self, blobs: dict[Digest, bytes]) -> Callable[[Digest], bytes]:
        """The bytes of a blob: made here, or a file the digest cache read."""

        def data_of(digest: Digest) -> bytes:
            data = blobs.get(digest)
            return Path(self.digests.data[digest]).read_bytes() if data is None else data

        return data_of


def _local(cwd: str, path: str) -> str:
    return os.path.normpath(os.path.join(cwd, path))


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


def _memory(env: Mapping[str, str]) -> int:
    """REAPI_CC_MEMORY (a size: 256M, 0 for none), or the default."""
    text = env.get("REAPI_CC_MEMORY")
    if not text:
        return OUTCOME_MEMORY
    try:
        return parse_size(text)
    except ValueError as error:
        log.warning("REAPI_CC_MEMORY %s; keeping %d bytes", error, OUTCOME_MEMORY)
        return OUTCOME_MEMORY


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
        agent = Agent(Stats(directory / "stats.json"), str(directory), _memory(os.environ))
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
