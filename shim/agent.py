"""The shim's per-user agent: turns compiles into REAPI actions.

Started on demand by `reapi-cc` (`python -m shim.agent`); listens on
$REAPI_HOME/shim/agent.sock, keeps the gRPC channel, the digest cache and
what the server is known to hold, and exits after IDLE_SECONDS without work.
One agent per user: a lock file keeps a second one from starting.

For each compile: classify; in `deps` and `scan` modes, ask direct mode
(shim/memo.py) for the action of an unchanged compile and look it up in the
action cache.
Otherwise find the inputs (by REAPI_CC_MODE), build the Action, upload only
the blobs the server lacks and Execute it (the server answers from its
action cache when it can). Outputs come back inline and are written at once.
Anything that goes wrong on the remote side answers "local", and `reapi-cc`
runs the real compiler.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cas.merkle import build_tree
from cas.remote import RemoteStore, channel_for
from cas.store import get_blob, put_missing
from reapi.conventions import ABSENT, MANIFEST_VARIABLE, SANDBOX_ROOT, file_identity
from reapi.digests import Digest, DigestFunction
from reapi.errors import ReapiError
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from shim.classify import (
    Local,
    RemoteCompile,
    classify,
    compile_only_arguments,
    expand_response_files,
)
from shim.inputs import (
    SYSTEM_DIRS,
    DigestCache,
    InputsUnknown,
    input_root,
    is_system,
    preprocess,
    preprocessor_dependencies,
)
from shim.memo import Depends, DirectMemo
from shim.options import Kind, lookup
from shim.protocol import (
    HEADER_SIZE,
    STAT_KEYS,
    decode_length,
    encode_reply,
    parse_request,
    socket_path,
    state_dir,
)
from shim.scan import (
    Scanner,
    ScanResult,
    ScanUncertain,
    SearchPath,
    StatKey,
    search_arguments,
    stat_key,
)

log = logging.getLogger("reapi.agent")

IDLE_SECONDS = 600.0
DEFAULT_SERVER = "grpc://127.0.0.1:8980"
NATIVE_SOURCE = Path(__file__).parent / "native" / "reapi-cc.c"
# How long the server's word that it holds a blob is trusted before asking again.
PRESENT_SECONDS = 600.0
SHA256 = DigestFunction.SHA256
MANIFEST = ".reapi/system-files"
# Manifests kept, each for one set of system headers (with their statuses) and
# absent paths: a few dozen for most projects, about 100 KB each.
MANIFESTS = 256
# Environment variables that change what gcc does: their presence keeps a compile local.
COMPILER_ENVIRONMENT = (
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
    "OBJC_INCLUDE_PATH",
    "DEPENDENCIES_OUTPUT",
    "SUNPRO_DEPENDENCIES",
    "GCC_EXEC_PREFIX",
    "COMPILER_PATH",
)
# Passed to the remote compile so it behaves as the local one would.
PASSED_ENVIRONMENT = ("LANG", "LC_ALL", "LC_MESSAGES", "LC_CTYPE", "SOURCE_DATE_EPOCH")
REMOTE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Prepared:
    """A compile's remote side, as one input mode lays it out."""

    files: dict[str, tuple[Digest, bool]]  # input path -> file digest (read from disk)
    contents: dict[str, bytes]  # input path -> bytes made here (manifest, .i file)
    workdir: str  # relative to the input root
    arguments: list[str]  # for the remote compiler
    outputs: list[str]  # relative to workdir
    uncacheable: bool
    depends: Depends | None = None  # what the action came from, when direct mode may reuse it


@dataclass
class Built:
    """A compile's Action: its digest and the blobs it names (files aside)."""

    action: Digest
    blobs: dict[Digest, bytes]  # the Action, Command, Directories and generated files
    prepared: Prepared


def _outputs(decision: RemoteCompile) -> list[str]:
    extra = [decision.dependency_file] if decision.dependency_file else []
    return sorted({decision.output, *decision.extra_outputs, *extra})


def _relative_dir(cwd: str, root: str) -> str:
    relative = os.path.relpath(cwd, root)
    return "" if relative == "." else relative


class Stats:
    """Counters shown by `reapi-cc --stats`, kept in $REAPI_HOME/shim/stats.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, Any] = {key: 0 for key in STAT_KEYS}
        self.values["local_reasons"] = {}
        with contextlib.suppress(OSError, ValueError):
            self.values.update(json.loads(path.read_text()))
        self.dirty = False

    def add(self, key: str, amount: int = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount
        self.dirty = True

    def add_reason(self, key: str, reasons_key: str, reason: str) -> None:
        """Count `key`, and `reason` in the `reasons_key` table."""
        self.add(key)
        reasons = self.values.setdefault(reasons_key, {})
        reasons[reason] = reasons.get(reason, 0) + 1

    def local(self, reason: str) -> dict[str, Any]:
        self.add_reason("local_fallbacks", "local_reasons", reason)
        return {"do": "local", "reason": reason}

    def zero(self) -> None:
        self.values = {key: 0 for key in STAT_KEYS}
        self.values |= {"local_reasons": {}, "scan_fallback_reasons": {}}
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
            self.dirty = False


class Remote:
    """One server: its channel and stubs, and the blobs it is known to hold."""

    def __init__(self, target: str) -> None:
        self.channel = channel_for(target)
        self.store = RemoteStore(self.channel)
        self.cache: Any = re_grpc.ActionCacheStub(self.channel)  # type: ignore[no-untyped-call]
        self.execution: Any = re_grpc.ExecutionStub(self.channel)  # type: ignore[no-untyped-call]
        # Blobs the server said it holds, and when (time.monotonic()).
        self.present: dict[Digest, float] = {}

    def known(self, digest: Digest, now: float) -> bool:
        """Whether the server said it holds `digest` recently enough to trust:
        its gc keeps blobs a client was told about for GRACE - TOUCH_AFTER
        (cas/gc.py), far longer than PRESENT_SECONDS."""
        return now - self.present.get(digest, -PRESENT_SECONDS) < PRESENT_SECONDS


class Agent:
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.digests = DigestCache()
        self.scanner = Scanner()
        self.memo = DirectMemo()
        self._remotes: dict[str, Remote] = {}
        self._identities: dict[tuple[str, int, int], list[str]] = {}
        self._manifests: dict[object, bytes] = {}
        self.last_used = time.monotonic()

    def remote(self, target: str) -> Remote:
        if target not in self._remotes:
            self._remotes[target] = Remote(target)
        return self._remotes[target]

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

        arguments = expand_response_files(arguments, read)
        decision = classify(arguments)
        if isinstance(decision, Local):
            return self.stats.local(decision.reason)
        if any(name in env for name in COMPILER_ENVIRONMENT):
            return self.stats.local("compiler-environment")
        if _absolute_project_path(arguments):
            return self.stats.local("absolute-project-path")
        return await self._remote_compile(cwd, compiler, decision, env)

    async def _remote_compile(
        self, cwd: str, compiler: str, decision: RemoteCompile, env: dict[str, str]
    ) -> dict[str, Any]:
        started_ns = time.time_ns()
        mode = env.get("REAPI_CC_MODE", "deps")
        remote = self.remote(env.get("REAPI_SERVER") or DEFAULT_SERVER)
        memo_key = None
        if mode in ("deps", "scan"):
            # What the action depends on besides files: PASSED_ENVIRONMENT reaches it.
            passed = map(env.get, PASSED_ENVIRONMENT)
            memo_key = (mode, cwd, compiler, *decision.arguments, *passed)
        remembered = self.memo.get(memo_key, self.scanner.unchanged) if memo_key else None
        result = None
        if remembered is not None:
            result = await self._cached_result(remote, remembered, _outputs(decision))
        built = None
        if result is not None:
            self.stats.add("cache_hits")
            self.stats.add("direct_hits")
        else:
            # Execute answers from the action cache itself when it can: asking the
            # cache first would cost every new compile one more round trip.
            built = await self._build(cwd, compiler, decision, env, mode)
            await self._upload(remote, built.blobs, [d for d, _ in built.prepared.files.values()])
            executed = await self._execute(remote, built.action, built.prepared.outputs)
            result = executed.result
            self.stats.add("cache_hits" if executed.cached_result else "remote_executions")
        if result.exit_code == 0 and decision.output not in {f.path for f in result.output_files}:
            return self.stats.local("remote-output-missing")
        if result.exit_code != 0 and mode == "scan":
            # Most likely a real error, but a header the scanner missed looks the
            # same: the local compiler has the last word.
            return self.stats.local("scan-remote-failed")
        await self._write_outputs(remote, cwd, result)
        if memo_key and built and built.prepared.depends and result.exit_code == 0:
            self.memo.put(memo_key, built.action, built.prepared.depends, started_ns)
        stdout = result.stdout_raw or await self._blob(remote, result, "stdout_digest")
        stderr = result.stderr_raw or await self._blob(remote, result, "stderr_digest")
        return {
            "do": "exit",
            "code": result.exit_code,
            "stdout": stdout,
            "stderr": stderr,
        }

    async def _build(
        self, cwd: str, compiler: str, decision: RemoteCompile, env: dict[str, str], mode: str
    ) -> Built:
        """The compile's Action, laid out by its input mode, and every blob it names."""
        # A debug build from preprocessed text differs from the local compile (its line
        # tables name the .i file), even on this machine: debug builds take `deps` inputs.
        debug = any(a.startswith("-g") and a != "-g0" for a in decision.arguments)
        if mode == "cpp" and not debug:
            prepared = await self._prepare_cpp(cwd, compiler, decision, env)
        elif mode == "scan":
            prepared = await self._prepare_scan(cwd, compiler, decision, env)
        else:
            prepared = await self._prepare_deps(cwd, compiler, decision, env)
        function = SHA256
        files = dict(prepared.files)
        blobs: dict[Digest, bytes] = {}
        for path, data in prepared.contents.items():
            digest = function.digest_of(data)
            files[path] = (digest, False)
            blobs[digest] = data
        root_digest, directories = build_tree(files, function)
        environment = {"PATH": REMOTE_PATH, MANIFEST_VARIABLE: MANIFEST}
        environment.update({k: env[k] for k in PASSED_ENVIRONMENT if k in env})
        command = re_pb2.Command(
            arguments=[compiler, *prepared.arguments],
            environment_variables=[
                re_pb2.Command.EnvironmentVariable(name=k, value=v)
                for k, v in sorted(environment.items())
            ],
            output_paths=sorted(prepared.outputs),
            working_directory=prepared.workdir,
        )
        command_data = command.SerializeToString(deterministic=True)
        command_digest = function.digest_of(command_data)
        action = re_pb2.Action(
            command_digest=command_digest.to_proto(),
            input_root_digest=root_digest.to_proto(),
            do_not_cache=prepared.uncacheable,
        )
        action_data = action.SerializeToString(deterministic=True)
        action_digest = function.digest_of(action_data)
        blobs.update(directories)
        blobs[command_digest] = command_data
        blobs[action_digest] = action_data
        return Built(action_digest, blobs, prepared)

    async def _cached_result(
        self, remote: Remote, action: Digest, outputs: list[str]
    ) -> re_pb2.ActionResult | None:
        """The action cache's result for `action` (outputs inlined), or None."""
        request = re_pb2.GetActionResultRequest(
            action_digest=action.to_proto(),
            inline_stdout=True,
            inline_stderr=True,
            inline_output_files=outputs,
        )
        try:
            result: re_pb2.ActionResult = await remote.cache.GetActionResult(request)
        except grpc.aio.AioRpcError:
            return None
        return result

    async def _scan(
        self, cwd: str, compiler: str, decision: RemoteCompile, env: dict[str, str]
    ) -> tuple[ScanResult, SearchPath]:
        """Our own memoized include scan; raises ScanUncertain."""
        arguments = search_arguments(decision.arguments)
        path = await self.scanner.search_path(
            compiler, decision.language, arguments.search, cwd, env
        )
        return self.scanner.scan(cwd, decision.source, arguments, path), path

    async def _prepare_scan(
        self, cwd: str, compiler: str, decision: RemoteCompile, env: dict[str, str]
    ) -> Prepared:
        """`scan` (distcc's pump mode): the scan's files are the inputs; `deps`
        for a compile the scanner cannot be sure of."""
        try:
            found, path = await self._scan(cwd, compiler, decision, env)
        except ScanUncertain as uncertain:
            self.stats.add_reason("scan_fallbacks", "scan_fallback_reasons", str(uncertain))
            read = await preprocessor_dependencies(compiler, decision.arguments, cwd, env)
            return self._prepare_files(cwd, compiler, decision, env, read, [])
        return self._prepare_scanned(cwd, compiler, decision, env, found.files, found, path)

    async def _prepare_deps(
        self, cwd: str, compiler: str, decision: RemoteCompile, env: dict[str, str]
    ) -> Prepared:
        """`deps`: the preprocessor's list is the inputs. The scanner runs too,
        first (so that the statuses it takes are from before anything was
        read), for direct mode and the manifest's ABSENT lines: it vouches
        for a compile when it found every file the preprocessor listed. It
        follows every directive of every file it reaches (or gives up), so
        the lookups gcc made are among those it recorded."""
        try:
            found, path = await self._scan(cwd, compiler, decision, env)
        except ScanUncertain:
            found = None
        except Exception:  # the scan only helps here: whatever it hit, compile without it
            log.exception("include scan of %s failed; compiling without direct mode", cwd)
            found = None
        read = await preprocessor_dependencies(compiler, decision.arguments, cwd, env)
        if found is None or not found.statuses.keys() >= set(read):
            return self._prepare_files(cwd, compiler, decision, env, read, [])
        return self._prepare_scanned(cwd, compiler, decision, env, read, found, path)

    def _prepare_scanned(
        self,
        cwd: str,
        compiler: str,
        decision: RemoteCompile,
        env: dict[str, str],
        read: list[str],
        found: ScanResult,
        path: SearchPath,
    ) -> Prepared:
        """`read` as the inputs, with what the scan `found` for the manifest
        (absent system paths, statuses) and for direct mode."""
        prepared = self._prepare_files(
            cwd, compiler, decision, env, read, _system(found.absent), found.statuses
        )
        prepared.depends = self._depends(compiler, prepared, found, path)
        return prepared

    def _depends(
        self, compiler: str, prepared: Prepared, found: ScanResult, path: SearchPath
    ) -> Depends | None:
        """What direct mode must see unchanged to take the action again: the
        scanned files, the compiler's programs and the lookups' facts."""
        if prepared.uncacheable:  # nothing to find in the action cache next time
            return None
        programs = []
        newest = found.newest
        for program in (compiler, *self._programs(compiler)):
            status = stat_key(program)
            if status is None:  # being replaced: nothing to remember
                return None
            programs.append((program, status))
            newest = max(newest, status[1], status[2])
        return Depends(
            files=(*found.read, *programs),
            missing=list(path.skipped),
            seen=found.seen,
            newest=newest,
        )

    def _prepare_files(
        self,
        cwd: str,
        compiler: str,
        decision: RemoteCompile,
        env: dict[str, str],
        read: list[str],
        absent: list[str],
        statuses: Mapping[str, StatKey] | None = None,
    ) -> Prepared:
        """`deps` and `scan`: ship the source and the project files in `read`
        (absolute paths); system files in it, and the system paths in `absent`,
        go to the manifest the worker checks. `statuses` are the files' as the
        scanner took them just before (saving a stat each)."""
        statuses = statuses or {}
        project: list[str] = []
        system: list[str] = []
        for path in read:
            (system if is_system(path) else project).append(path)
        outputs = _outputs(decision)
        root = input_root(cwd, [*project, *(os.path.join(cwd, o) for o in outputs)])
        inside = root.rstrip("/") + "/"
        files: dict[str, tuple[Digest, bool]] = {}
        dated = False
        for path in project:
            info = self.digests.info(path, _status(statuses.get(path)))
            # Under the root by its choice: relpath's work is not needed.
            files[path[len(inside) :]] = (info.digest, False)
            dated = dated or info.uses_date_time
        arguments = list(decision.arguments)
        if any(a.startswith("-g") and a != "-g0" for a in arguments):
            # Debug info names the compile's directory: make it this machine's.
            arguments.append(f"-fdebug-prefix-map={SANDBOX_ROOT}={root}")
        manifest = self._manifest(compiler, system, absent, statuses)
        return Prepared(
            files=files,
            contents={MANIFEST: manifest},
            workdir=_relative_dir(cwd, root),
            arguments=arguments,
            outputs=outputs,
            # __DATE__ and __TIME__ change every build unless SOURCE_DATE_EPOCH pins them.
            uncacheable=dated and "SOURCE_DATE_EPOCH" not in env,
        )

    async def _prepare_cpp(
        self, cwd: str, compiler: str, decision: RemoteCompile, env: dict[str, str]
    ) -> Prepared:
        """`cpp` (distcc's plain mode): preprocess here, ship the result; the
        dependency file is written here by the preprocessor."""
        text = await preprocess(
            compiler, decision.arguments, decision.output, decision.dependency_file, cwd, env
        )
        suffix = ".ii" if decision.language.startswith("c++") else ".i"
        preprocessed = os.path.splitext(os.path.normpath(decision.source))[0] + suffix
        outputs = [o for o in _outputs(decision) if o != decision.dependency_file]
        root = input_root(cwd, [os.path.join(cwd, p) for p in [preprocessed, *outputs]])
        workdir = _relative_dir(cwd, root)
        language = "c++-cpp-output" if suffix == ".ii" else "cpp-output"
        arguments = [*compile_only_arguments(decision.arguments), "-x", language, preprocessed]
        return Prepared(
            files={},
            contents={
                os.path.normpath(os.path.join(workdir, preprocessed)): text,
                MANIFEST: self._manifest(compiler, [], [], {}),
            },
            workdir=workdir,
            arguments=arguments,
            outputs=outputs,
            uncacheable=False,  # __DATE__ and __TIME__ are already expanded in the text
        )

    def _programs(self, compiler: str) -> list[str]:
        """The files that make up the compiler: its binary, cc1, cc1plus, as."""
        stat = os.stat(compiler)
        key = (compiler, stat.st_mtime_ns, stat.st_ino)
        if key not in self._identities:
            programs = [os.path.realpath(compiler)]
            for program in ("cc1", "cc1plus", "as"):
                found = _print_prog_name(compiler, program)
                if found:
                    programs.append(os.path.realpath(found))
            self._identities[key] = programs
        return self._identities[key]

    def _manifest(
        self,
        compiler: str,
        system_files: list[str],
        absent: list[str],
        statuses: Mapping[str, StatKey],
    ) -> bytes:
        """`HASH SIZE PATH` lines for the compiler's programs and the system files
        read, `ABSENT 0 PATH` for system paths the compile found missing."""
        programs = tuple(self._lines([(path, None) for path in self._programs(compiler)], []))
        files = [(path, statuses.get(path)) for path in system_files]
        if not files or not all(status is not None for _, status in files):
            return _manifest_text(programs, self._lines(files, absent))
        # Most compiles of a project read the same system headers: their manifest
        # is made once for each set of (path, status).
        key = (frozenset(files), frozenset(absent), programs)
        manifest = self._manifests.get(key)
        if manifest is None:
            if len(self._manifests) >= MANIFESTS:
                self._manifests.clear()
            manifest = self._manifests[key] = _manifest_text(programs, self._lines(files, absent))
        return manifest

    def _lines(
        self, files: list[tuple[str, StatKey | None]], absent: list[str]
    ) -> list[tuple[str, str]]:
        """(path, manifest line) of each file that exists, and of each absent path."""
        lines = []
        for path, status in files:
            identity = file_identity(path, _status(status))
            if identity is not None:
                lines.append((path, f"{identity[0]} {identity[1]} {path}"))
        lines.extend((path, f"{ABSENT} 0 {path}") for path in set(absent))
        return lines

    async def _upload(
        self, remote: Remote, blobs: dict[Digest, bytes], files: list[Digest]
    ) -> None:
        now = time.monotonic()
        wanted = [d for d in {*blobs, *files} if not remote.known(d, now)]

        def data_of(digest: Digest) -> bytes:
            data = blobs.get(digest)
            return Path(self.digests.data[digest]).read_bytes() if data is None else data

        self.stats.add("bytes_uploaded", await put_missing(remote.store, wanted, data_of))
        remote.present.update(dict.fromkeys(wanted, now))

    async def _execute(
        self, remote: Remote, action: Digest, outputs: list[str]
    ) -> re_pb2.ExecuteResponse:
        request = re_pb2.ExecuteRequest(
            action_digest=action.to_proto(),
            inline_stdout=True,
            inline_stderr=True,
            inline_output_files=outputs,
        )
        last = None
        async for operation in remote.execution.Execute(request, timeout=3600):
            last = operation
        response = re_pb2.ExecuteResponse()
        if last is None or not last.done or not last.response.Unpack(response):
            raise ValueError("the Execute stream ended without a result")
        if response.status.code != 0:
            raise ValueError(f"remote execution failed: {response.status.message}")
        return response

    async def _blob(self, remote: Remote, result: re_pb2.ActionResult, field: str) -> bytes:
        if not result.HasField(field):
            return b""
        data = await get_blob(remote.store, Digest.from_proto(SHA256, getattr(result, field)))
        self.stats.add("bytes_downloaded", len(data))
        return data

    async def _write_outputs(self, remote: Remote, cwd: str, result: re_pb2.ActionResult) -> None:
        digests = [Digest.from_proto(SHA256, f.digest) for f in result.output_files]
        found = {
            digest: output.contents
            for output, digest in zip(result.output_files, digests, strict=True)
            if digest.size == 0 or SHA256.digest_of(output.contents) == digest
        }
        missing = [digest for digest in digests if digest not in found]
        if missing:
            found.update(await remote.store.get_many(missing))
        for output, digest in zip(result.output_files, digests, strict=True):
            data = found[digest]
            self.stats.add("bytes_downloaded", len(data))
            target = Path(cwd, output.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.reapi-{os.getpid()}")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o755 if output.is_executable else 0o644)
            os.replace(tmp, target)


def _system(paths: Iterable[str]) -> list[str]:
    """Those of `paths` in the system directories (is_system, inlined: a scan
    reports a thousand absent paths or more)."""
    return [path for path in paths if path.startswith(SYSTEM_DIRS)]


def _manifest_text(*parts: Iterable[tuple[str, str]]) -> bytes:
    """The manifest of (path, line) pairs: one line per path, sorted by path."""
    lines = [line for _, line in sorted({pair for part in parts for pair in part})]
    return ("\n".join(lines) + "\n").encode()


def _status(key: StatKey | None) -> tuple[int, int, int] | None:
    """A scanner's StatKey as the digest caches' (size, mtime_ns, inode)."""
    return None if key is None else (key[0], key[1], key[3])


def _print_prog_name(compiler: str, program: str) -> str | None:
    try:
        found = subprocess.run(
            [compiler, f"-print-prog-name={program}"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


def _absolute_project_path(arguments: list[str]) -> bool:
    """An absolute path outside the system directories: the remote tree is
    relative, so such a compile stays local."""
    for argument in arguments:
        value = argument
        if argument.startswith("-"):
            option, joined = lookup(argument)
            if option is None or not option.kind & Kind.PATH or joined is None:
                continue
            value = joined
        if os.path.isabs(value) and not is_system(value):
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
