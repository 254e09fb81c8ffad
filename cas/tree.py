"""Directory trees stored in the CAS as Directory messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError

from cas.store import BlobStore
from reapi.digests import Digest
from reapi.errors import InvalidArgument, NotFound
from reapi.protos import remote_execution_pb2 as re_pb2


async def walk_tree(cas: BlobStore, root: Digest) -> AsyncIterator[re_pb2.Directory]:
    """Every Directory of the tree under `root`, breadth first, each distinct
    directory once, children in the order their parents list them (so the
    order is stable for paging). One CAS batch read per level. Subtrees
    missing from the CAS are left out; a missing root raises NotFound, an
    undecodable one InvalidArgument."""
    seen = {root}
    level = [root]
    while level:
        found = await cas.get_many(level)
        if root in level and root not in found:
            raise NotFound(f"tree root {root} not found")
        next_level = []
        for digest in level:
            if digest not in found:
                continue
            try:
                directory = re_pb2.Directory.FromString(found[digest])
            except DecodeError:
                if digest == root:
                    raise InvalidArgument(f"tree root {root} is not a Directory message") from None
                continue
            yield directory
            for child in directory.directories:
                child_digest = Digest.from_proto(root.function, child.digest)
                if child_digest not in seen:
                    seen.add(child_digest)
                    next_level.append(child_digest)
        level = next_level
