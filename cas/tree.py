"""Directory trees stored in the CAS as Directory messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from cas.store import BlobStore
from reapi.core.digests import Digest
from reapi.core.errors import InvalidArgument
from reapi.protos import remote_execution_pb2 as re_pb2


@dataclass
class TreeRead:
    """What `read_tree` found: the directories, breadth first (dict order), and
    the digests of directories the CAS lacks."""

    directories: dict[Digest, re_pb2.Directory] = field(default_factory=dict)
    missing: list[Digest] = field(default_factory=list)
    # The found directories' blobs, as stored.
    blobs: dict[Digest, bytes] = field(default_factory=dict)
    _files: frozenset[tuple[Digest, bool]] | None = field(default=None, repr=False)

    def files(self) -> frozenset[tuple[Digest, bool]]:
        """Every (file digest, is_executable) the found directories list, worked
        out once (Execute asks twice: to check the inputs, then for the lease)."""
        if self._files is None:
            self._files = frozenset(
                (Digest.from_proto(digest.function, node.digest), node.is_executable)
                for digest, directory in self.directories.items()
                for node in directory.files
            )
        return self._files


async def read_tree(
    cas: BlobStore, root: Digest, at_hand: Mapping[Digest, bytes] | None = None
) -> TreeRead:
    """Every Directory under `root`, one CAS batch read per level, each distinct
    directory once, children in the order their parents list them (so the
    order is stable, for paging). Subtrees below a missing directory are not
    visited. Raises InvalidArgument for a blob that is not a Directory.
    Blobs in `at_hand` (by their true digests) are not read from the CAS."""
    at_hand = at_hand or {}
    read = TreeRead()
    seen = {root}
    level = [root]
    while level:
        found = {digest: at_hand[digest] for digest in level if digest in at_hand}
        if len(found) < len(level):
            found.update(await cas.get_many([d for d in level if d not in found]))
        next_level = []
        for digest in level:
            if digest not in found:
                read.missing.append(digest)
                continue
            try:
                directory = re_pb2.Directory.FromString(found[digest])
            except DecodeError:
                raise InvalidArgument(f"blob {digest} is not a Directory message") from None
            read.directories[digest] = directory
            read.blobs[digest] = found[digest]
            for child in directory.directories:
                child_digest = Digest.from_proto(root.function, child.digest)
                if child_digest not in seen:
                    seen.add(child_digest)
                    next_level.append(child_digest)
        level = next_level
    return read
