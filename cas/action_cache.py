"""The action cache: (instance name, action digest) -> ActionResult, and its
completeness check.

Each instance name has an action cache of its own (two teams on one server do
not see each other's results); the CAS they point into is shared, being
content-addressed. Stores keep the serialized ActionResult as bytes;
`ActionCache` on top parses, checks that every blob the result points to is
still in the CAS (an entry whose outputs are gone is a miss, never a lie), and
inlines small outputs on request.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from google.protobuf.message import DecodeError

from cas.disk import is_full
from cas.store import BlobStore, get_blob
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import InvalidArgument, NotFound, ResourceExhausted
from reapi.protos import remote_execution_pb2 as re_pb2

log = logging.getLogger(__name__)

# Inlined stdout, stderr and output files together stay under this many bytes,
# so a result always fits in one gRPC message.
MAX_INLINE_BYTES = 1024 * 1024


class ActionResultStore(Protocol):
    async def get(self, action: Digest, instance_name: str = "") -> bytes | None:
        """The stored serialized ActionResult of `action` in that instance, or None."""
        ...

    async def put(self, action: Digest, result: bytes, instance_name: str = "") -> None:
        """Store (or replace) the entry for `action` in that instance."""
        ...


class MemoryActionResultStore:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, Digest], bytes] = {}

    async def get(self, action: Digest, instance_name: str = "") -> bytes | None:
        return self._entries.get((instance_name, action))

    async def put(self, action: Digest, result: bytes, instance_name: str = "") -> None:
        self._entries[instance_name, action] = result


# A directory name holds 255 bytes; percent-encoding may triple a name's length.
MAX_INSTANCE_DIR = 200


def instance_root(ac: Path, instance_name: str) -> Path:
    """Where one instance's entries live under DIR/ac: the default (empty) name
    at DIR/ac itself, as before instance names were kept apart; any other at
    DIR/ac/@{the name, percent-encoded}."""
    if not instance_name:
        return ac
    encoded = "@" + urllib.parse.quote(instance_name, safe="")
    if len(encoded) > MAX_INSTANCE_DIR:
        raise InvalidArgument(
            f"instance name {instance_name[:40]!r}... is too long for this server's "
            f"action cache ({len(encoded)} bytes encoded; at most {MAX_INSTANCE_DIR})"
        )
    return ac / encoded


def instance_roots(ac: Path) -> Iterator[tuple[str, Path]]:
    """(instance name, its root) of every instance with a directory under DIR/ac."""
    yield "", ac
    try:
        names = sorted(os.listdir(ac))
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith("@"):
            yield urllib.parse.unquote(name[1:]), ac / name


class DiskActionResultStore:
    """Entries as files DIR/ac/[@INSTANCE/]{function}/{hash[:2]}/{hash}-{size},
    replaced atomically."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root) / "ac"
        self._tmp = Path(root) / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._counter = 0

    def _path(self, action: Digest, instance_name: str) -> Path:
        hash_ = action.hash
        base = instance_root(self._root, instance_name)
        return base / action.function.path_name / hash_[:2] / f"{hash_}-{action.size}"

    async def get(self, action: Digest, instance_name: str = "") -> bytes | None:
        path = self._path(action, instance_name)
        try:
            data = path.read_bytes()
            os.utime(path)  # its last use: `reapi cas gc` keeps recently used entries
        except FileNotFoundError:
            return None  # none, or removed by a gc just now
        return data

    async def put(self, action: Digest, result: bytes, instance_name: str = "") -> None:
        path = self._path(action, instance_name)
        self._counter += 1
        tmp = self._tmp / f"{os.getpid()}-ac{self._counter}-{time.monotonic_ns()}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(result)
            os.replace(tmp, path)
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            if is_full(error):
                log.warning("storage %s is full: an action result was not stored", self._root)
                raise ResourceExhausted(
                    f"storage is full: the result of {action} not stored (the server needs room)"
                ) from None
            raise


class ActionCache:
    """Action results backed by `results`, checked against the blobs in `cas`."""

    def __init__(self, results: ActionResultStore, cas: BlobStore) -> None:
        self._results = results
        self._cas = cas

    async def get(
        self,
        action: Digest,
        inline_stdout: bool = False,
        inline_stderr: bool = False,
        inline_files: Iterable[str] = (),
        instance_name: str = "",
    ) -> re_pb2.ActionResult:
        """The complete result for `action` in that instance. Raises NotFound when
        there is no entry, or when any blob it references is gone from the CAS."""
        data = await self._results.get(action, instance_name)
        if data is None:
            raise NotFound(f"no action result for {action}")
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError:
            raise NotFound(f"action result for {action} is unreadable") from None
        referenced = await self._referenced_blobs(action.function, result)
        missing = await self._cas.find_missing(referenced)
        if missing:
            raise NotFound(
                f"action result for {action} references {len(missing)} blob(s) no longer "
                f"in the CAS, e.g. {missing[0]}"
            )
        await self.inline(action.function, result, inline_stdout, inline_stderr, inline_files)
        return result

    async def put(
        self, action: Digest, result: re_pb2.ActionResult, instance_name: str = ""
    ) -> re_pb2.ActionResult:
        """Store `result` for that instance without inlined bytes (they live in the CAS)."""
        stored = re_pb2.ActionResult()
        stored.CopyFrom(result)
        stored.ClearField("stdout_raw")
        stored.ClearField("stderr_raw")
        for output in stored.output_files:
            output.ClearField("contents")
        await self._results.put(action, stored.SerializeToString(deterministic=True), instance_name)
        return stored

    async def _referenced_blobs(
        self, function: DigestFunction, result: re_pb2.ActionResult
    ) -> list[Digest]:
        protos = named_blobs(result)
        for directory in result.output_directories:
            tree_digest = Digest.from_proto(function, directory.tree_digest)
            try:
                protos += tree_files(await get_blob(self._cas, tree_digest))
            except NotFound:
                continue  # reported missing by the caller's check
        return [Digest.from_proto(function, proto) for proto in protos]

    async def inline(
        self,
        function: DigestFunction,
        result: re_pb2.ActionResult,
        inline_stdout: bool,
        inline_stderr: bool,
        inline_files: Iterable[str],
    ) -> None:
        """Fill stdout_raw, stderr_raw and output file contents from the CAS, as
        asked, while they fit in MAX_INLINE_BYTES together."""
        budget = MAX_INLINE_BYTES
        wanted: list[tuple[re_pb2.Digest, str, re_pb2.OutputFile | None]] = []
        if inline_stdout and result.HasField("stdout_digest"):
            wanted.append((result.stdout_digest, "stdout_raw", None))
        if inline_stderr and result.HasField("stderr_digest"):
            wanted.append((result.stderr_digest, "stderr_raw", None))
        paths = set(inline_files)
        wanted.extend((f.digest, "contents", f) for f in result.output_files if f.path in paths)
        for proto, field, output in wanted:
            if proto.size_bytes > budget:
                continue  # the spec lets a server skip inlining what does not fit
            budget -= proto.size_bytes
            data = await get_blob(self._cas, Digest.from_proto(function, proto))
            setattr(output if output is not None else result, field, data)


def named_blobs(result: re_pb2.ActionResult) -> list[re_pb2.Digest]:
    """The digests `result` names itself: output files, stdout, stderr, and
    output directories' trees (whose files `tree_files` lists)."""
    digests = [f.digest for f in result.output_files]
    digests += [
        getattr(result, f) for f in ("stdout_digest", "stderr_digest") if result.HasField(f)
    ]
    digests += [directory.tree_digest for directory in result.output_directories]
    return digests


def tree_files(data: bytes) -> list[re_pb2.Digest]:
    """The file digests in a serialized Tree; none if it does not parse (the
    tree's own digest is then the one the caller finds wrong)."""
    tree = re_pb2.Tree()
    try:
        tree.ParseFromString(data)
    except DecodeError:
        return []
    return [f.digest for node in [tree.root, *tree.children] for f in node.files]
