"""Running one leased action on a worker: inputs, sandbox, outputs, metadata."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2

from cas.store import BlobStore
from cas.tree import read_tree
from executor.local_cache import LocalCache
from executor.outputs import OutputCollector
from executor.sandbox import Slot
from reapi.conventions import MANIFEST_VARIABLE, verify_system_files
from reapi.digests import Digest, DigestFunction
from reapi.errors import FailedPrecondition, InvalidArgument, NotFound, ReapiError
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import worker_pb2

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 900.0


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _check_name(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"input tree entry name {name!r} is not a single path component")
    return name


def _materialize(
    tree: dict[Digest, re_pb2.Directory], digest: Digest, path: Path, cache: LocalCache
) -> None:
    """Lay out the input tree under `path`: files as hard links into the cache."""
    path.mkdir(exist_ok=True)
    directory = tree[digest]
    for node in directory.files:
        file_digest = Digest.from_proto(digest.function, node.digest)
        os.link(cache.path(file_digest, node.is_executable), path / _check_name(node.name))
    for link in directory.symlinks:
        if os.path.isabs(link.target):
            raise InvalidArgument(f"input symlink {link.name} -> {link.target} is absolute")
        os.symlink(link.target, path / _check_name(link.name))
    for child in directory.directories:
        child_digest = Digest.from_proto(digest.function, child.digest)
        _materialize(tree, child_digest, path / _check_name(child.name), cache)


class ActionRunner:
    def __init__(self, store: BlobStore, cache: LocalCache, worker_name: str) -> None:
        self._store = store
        self._cache = cache
        self._name = worker_name

    async def run(self, assign: worker_pb2.Assign, slot: Slot) -> worker_pb2.Finished:
        """Run the leased action in `slot` (its tree empty); its outcome, for
        the server. The caller empties the tree afterwards."""
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
        try:
            await self._cache.ensure(tree.files())
        except NotFound as missing:
            raise FailedPrecondition(missing.message) from None
        _materialize(tree.directories, root_digest, root, self._cache)
        workdir = command.working_directory
        (root / workdir).mkdir(parents=True, exist_ok=True)
        outputs = [*command.output_paths] or [*command.output_files, *command.output_directories]
        for output in outputs:
            (root / workdir / output).parent.mkdir(parents=True, exist_ok=True)
        metadata.input_fetch_completed_timestamp.CopyFrom(_now())

        timeout = DEFAULT_TIMEOUT
        if action.HasField("timeout"):
            timeout = action.timeout.ToTimedelta().total_seconds()
        environment = {v.name: v.value for v in command.environment_variables}
        if MANIFEST_VARIABLE in environment:
            verify_system_files(root, environment[MANIFEST_VARIABLE])
        metadata.execution_start_timestamp.CopyFrom(_now())
        outcome = await slot.run(workdir, list(command.arguments), environment, timeout)
        metadata.execution_completed_timestamp.CopyFrom(_now())

        metadata.output_upload_start_timestamp.CopyFrom(_now())
        collector = OutputCollector(root, workdir, function)
        result.exit_code = outcome.exit_code
        result.stdout_digest.CopyFrom(collector.add_blob(slot.stdout.read_bytes()).to_proto())
        result.stderr_digest.CopyFrom(collector.add_blob(slot.stderr.read_bytes()).to_proto())
        if not outcome.timed_out:
            collector.collect(command, result)
        finished.output_blobs.extend(await collector.upload(self._store, assign.output_blob_bytes))
        metadata.output_upload_completed_timestamp.CopyFrom(_now())
        if outcome.timed_out:
            return status_pb2.Status(
                code=code_pb2.DEADLINE_EXCEEDED,
                message=f"the action ran longer than its timeout of {timeout:g}s and was killed",
            )
        return status_pb2.Status(code=code_pb2.OK)
