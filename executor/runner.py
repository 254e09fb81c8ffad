"""Running one leased action on a worker: inputs, sandbox, outputs, metadata."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2

from cas.disk import is_full
from cas.gc import human
from cas.store import BlobStore
from cas.tree import read_tree
from executor import layout
from executor.limits import Limits
from executor.local_cache import CachedFile, LocalCache
from executor.outputs import OutputCollector
from executor.sandbox import Slot
from reapi.core.conventions import MANIFEST_VARIABLE, PROVIDED_DIRS, SystemFiles
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import FailedPrecondition, InvalidArgument, NotFound, ReapiError
from reapi.core.watch import Watcher
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import worker_pb2

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 900.0
# What an action finds in its environment when its Command does not say
# (`reapi worker --env` changes it): a PATH with the system's programs.
DEFAULT_ENV: Mapping[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
# An ActionResult travels to the server in one message, with at most
# Assign.output_blob_bytes of outputs: far within the server's message limit.
MAX_RESULT_BYTES = 4 * 1024 * 1024
# Outputs of up to this many bytes are hashed on the event loop, more in a thread.
HASH_HERE_BYTES = 4 * 1024 * 1024


# What an action that went past a limit is told (Outcome.exceeded), on stderr
# and in ExecuteResponse.message.
_EXCEEDED: dict[str, Callable[[Limits], str]] = {
    "tree": lambda limits: (
        f"the action wrote more than {human(limits.tree)} to its tree, "
        "stdout and stderr (the limit of reapi worker --max-tree) and was killed"
    ),
    "file": lambda limits: (
        f"a file of the action reached {human(limits.tree)}, the most "
        "one file may hold (reapi worker --max-tree)"
    ),
    "tmp": lambda limits: (
        f"the action filled its /tmp or /dev/shm ({human(limits.tmp)}, "
        "the limit of reapi worker --max-tmp)"
    ),
}


def _drop_outputs(result: re_pb2.ActionResult) -> None:
    for field in (
        "output_files",
        "output_directories",
        "output_symlinks",
        "output_file_symlinks",
        "output_directory_symlinks",
    ):
        result.ClearField(field)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _plan(
    tree: dict[Digest, re_pb2.Directory],
    digest: Digest,
    cache: LocalCache,
    inodes: dict[CachedFile, int],
) -> layout.Dir:
    """The input tree as the slot lays it out: files as hard links into the cache."""
    entries: dict[str, layout.Node] = {}

    def add(name: str, node: layout.Node) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise InvalidArgument(f"input tree entry name {name!r} is not a single path component")
        if name in entries:
            raise InvalidArgument(f"input tree entry name {name!r} appears twice in {digest}")
        entries[name] = node

    directory = tree[digest]
    for node in directory.files:
        file = (Digest.from_proto(digest.function, node.digest), node.is_executable)
        add(node.name, layout.File(cache.path(*file), inodes[file]))
    for link in directory.symlinks:
        if os.path.isabs(link.target):
            raise InvalidArgument(f"input symlink {link.name} -> {link.target} is absolute")
        add(link.name, layout.Link(link.target))
    for child in directory.directories:
        child_digest = Digest.from_proto(digest.function, child.digest)
        add(child.name, _plan(tree, child_digest, cache, inodes))
    return layout.Dir(entries)


def _add_directories(tree: layout.Dir, workdir: str, outputs: list[str]) -> None:
    """Add the directories that must exist before the command starts: the
    working directory, and each output's parent. None is made through a file
    or symlink of the input tree: that is refused."""
    paths = [(f"working directory {workdir!r}", workdir)]
    for output in outputs:
        paths.append((f"output {output!r}", os.path.dirname(os.path.join(workdir, output))))
    for what, path in paths:
        normal = os.path.normpath(path)
        if os.path.isabs(path) or normal == ".." or normal.startswith("../"):
            raise InvalidArgument(f"{what} leaves the input root")
        if tree.subdirectory(normal) is None:
            raise InvalidArgument(
                f"{what}: a file or symlink of the input tree is where a directory must be"
            )


class ActionRunner:
    def __init__(
        self,
        store: BlobStore,
        cache: LocalCache,
        worker_name: str,
        provided: tuple[str, ...] = PROVIDED_DIRS,
        env: Mapping[str, str] = DEFAULT_ENV,
    ) -> None:
        """`env`: variables an action gets where its Command sets none of that name."""
        self._store = store
        self._cache = cache
        self._env = dict(env)
        self._name = worker_name
        self._system_files = SystemFiles(Watcher(), provided)

    async def run(self, assign: worker_pb2.Assign, slot: Slot) -> worker_pb2.Finished:
        """Run the leased action in `slot`; its outcome, for the server. The
        caller puts the tree back afterwards (Slot.clear)."""
        finished = worker_pb2.Finished(lease_id=assign.lease_id)
        metadata = finished.response.result.execution_metadata
        metadata.worker = self._name
        metadata.worker_start_timestamp.CopyFrom(_now())
        status = status_pb2.Status(code=code_pb2.OK)
        try:
            status = await self._run(assign, slot, finished)
        except ReapiError as error:
            status = status_pb2.Status(code=error.code, message=error.message)
        except Exception as error:
            if is_full(error):  # its inputs or outputs did not fit: not the action's fault
                log.warning("action %s: this worker's disk is full", assign.action_digest.hash)
                status = status_pb2.Status(
                    code=code_pb2.RESOURCE_EXHAUSTED,
                    message=f"worker {self._name}: its disk is full ({error})",
                )
            else:
                log.exception("action %s failed on this worker", assign.action_digest.hash)
                status = status_pb2.Status(
                    code=code_pb2.INTERNAL, message=f"worker: {type(error).__name__}: {error}"
                )
        metadata.worker_completed_timestamp.CopyFrom(_now())
        finished.response.status.CopyFrom(status)
        return finished

    async def _run(
        self, assign: worker_pb2.Assign, slot: Slot, finished: worker_pb2.Finished
    ) -> status_pb2.Status:
        """Fill in `finished` (its result, and the output blobs it carries)."""
        function = DigestFunction.from_wire(assign.digest_function)
        action, command = assign.action, assign.command
        result = finished.response.result
        metadata = result.execution_metadata
        root = slot.root

        metadata.input_fetch_start_timestamp.CopyFrom(_now())
        root_digest = Digest.from_proto(function, action.input_root_digest)
        sent = {function.digest_of(blob): blob for blob in assign.input_directories}
        tree = await read_tree(self._store, root_digest, at_hand=sent)
        if tree.missing:
            raise FailedPrecondition(f"input directory {tree.missing[0]} is missing from the CAS")
        files = {function.digest_of(blob): blob for blob in assign.input_files}
        try:
            inodes = await self._cache.ensure(tree.files(), at_hand=files)
        except NotFound as missing:
            raise FailedPrecondition(missing.message) from None
        planned = _plan(tree.directories, root_digest, self._cache, inodes)
        workdir = command.working_directory
        outputs = [*command.output_paths] or [*command.output_files, *command.output_directories]
        _add_directories(planned, workdir, outputs)
        slot.lay_out(planned)
        metadata.input_fetch_completed_timestamp.CopyFrom(_now())

        timeout = DEFAULT_TIMEOUT
        if action.HasField("timeout"):
            timeout = action.timeout.ToTimedelta().total_seconds()
        environment = {**self._env, **{v.name: v.value for v in command.environment_variables}}
        if MANIFEST_VARIABLE in environment:
            self._system_files.verify(root, environment[MANIFEST_VARIABLE])
        metadata.execution_start_timestamp.CopyFrom(_now())
        outcome = await slot.run(workdir, list(command.arguments), environment, timeout)
        metadata.execution_completed_timestamp.CopyFrom(_now())
        if outcome.exceeded is not None:
            said = f"reapi worker {self._name}: {_EXCEEDED[outcome.exceeded](slot.limits)}"
            finished.response.message = said
            with open(slot.stderr, "ab") as err:  # where every client shows it
                err.write(f"{said}\n".encode())

        metadata.output_upload_start_timestamp.CopyFrom(_now())
        collector = OutputCollector(root, workdir, function)
        result.exit_code = outcome.exit_code

        def collect() -> None:
            result.stdout_digest.CopyFrom(collector.add_file(slot.stdout).to_proto())
            result.stderr_digest.CopyFrom(collector.add_file(slot.stderr).to_proto())
            if not outcome.timed_out:
                collector.collect(command, result)

        # Hashing gigabytes takes seconds: in a thread, so that heartbeats go
        # on; a compile's few small files cost less than the thread.
        size = collector.to_read(command, [slot.stdout, slot.stderr])
        if size is not None and size <= HASH_HERE_BYTES:
            collect()
        else:
            await asyncio.to_thread(collect)
        listed = result.ByteSize()
        if listed > MAX_RESULT_BYTES:  # one message to the server could not hold it
            _drop_outputs(result)
        finished.output_blobs.extend(await collector.upload(self._store, assign.output_blob_bytes))
        metadata.output_upload_completed_timestamp.CopyFrom(_now())
        if outcome.timed_out:
            return status_pb2.Status(
                code=code_pb2.DEADLINE_EXCEEDED,
                message=f"the action ran longer than its timeout of {timeout:g}s and was killed",
            )
        if listed > MAX_RESULT_BYTES:
            return status_pb2.Status(
                code=code_pb2.RESOURCE_EXHAUSTED,
                message=f"the action's result lists its outputs in {listed} bytes; this "
                f"worker returns results of up to {MAX_RESULT_BYTES} bytes",
            )
        return status_pb2.Status(code=code_pb2.OK)
