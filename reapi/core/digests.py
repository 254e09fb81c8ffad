"""Digests: the one value type that names a blob, built and validated at the edge.

A `Digest` carries its digest function, so a store can keep the blobs of each
function apart and nothing downstream has to guess. Build one from a wire
message with `Digest.from_proto` (which validates) and turn it back with
`to_proto`; code in between never handles raw `Digest` protos.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from typing import NamedTuple, Protocol

import blake3

from reapi.core.errors import InvalidArgument
from reapi.protos import remote_execution_pb2 as re_pb2

# Files are hashed in chunks of this size.
FILE_CHUNK = 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")


class Hasher(Protocol):
    def update(self, data: bytes, /) -> object: ...
    def hexdigest(self) -> str: ...


class DigestFunction(enum.Enum):
    """The digest functions this server supports; values are the wire enum's."""

    SHA256 = re_pb2.DigestFunction.SHA256
    BLAKE3 = re_pb2.DigestFunction.BLAKE3

    # Members are singletons compared by identity, so identity hashing is exact;
    # Enum's own __hash__ runs Python code, and digests are hashed on hot paths.
    __hash__ = object.__hash__

    @property
    def path_name(self) -> str:
        """Lowercase name used in resource names and on disk."""
        return self.name.lower()

    def hasher(self) -> Hasher:
        if self is DigestFunction.SHA256:
            return hashlib.sha256()
        return blake3.blake3()

    def hex_of(self, data: bytes) -> str:
        hasher = self.hasher()
        hasher.update(data)
        return hasher.hexdigest()

    def digest_of(self, data: bytes) -> Digest:
        return Digest(self, self.hex_of(data), len(data))

    def digest_of_file(self, path: str | os.PathLike[str]) -> Digest:
        """The digest of a file's contents, read a chunk at a time (its size
        does not matter). Blocks: call it in a thread for large files."""
        hasher = self.hasher()
        size = 0
        with open(path, "rb") as file:
            while chunk := file.read(FILE_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
        return Digest(self, hasher.hexdigest(), size)

    def empty(self) -> Digest:
        return _EMPTY[self]

    @classmethod
    def from_wire(cls, value: int) -> DigestFunction:
        """The function a request names; UNKNOWN (unset) means SHA256.

        The spec lets clients leave the field unset for the legacy functions and
        have the server infer the function from the hash length; of those we
        support SHA256 only, whose hashes are 64 hex digits, and `Digest`
        validation rejects any other length. BLAKE3 must always be named.
        """
        if value == re_pb2.DigestFunction.UNKNOWN:
            return cls.SHA256
        try:
            return cls(value)
        except ValueError:
            name = re_pb2.DigestFunction.Value.Name(value) if _known(value) else str(value)
            raise InvalidArgument(
                f"digest function {name} is not supported; use SHA256 or BLAKE3"
            ) from None

    @classmethod
    def from_path_name(cls, name: str) -> DigestFunction | None:
        """The function named by a resource-name segment, or None if `name` is not one."""
        return _BY_PATH_NAME.get(name)


def _known(value: int) -> bool:
    return value in re_pb2.DigestFunction.Value.values()


# Lowercase names of all functions in the wire enum: a resource-name segment
# equal to one of them is a digest function, supported or not.
WIRE_FUNCTION_NAMES = frozenset(
    name.lower() for name, _ in re_pb2.DigestFunction.Value.items() if name != "UNKNOWN"
)


class Digest(NamedTuple):
    """A validated blob name: digest function, lowercase hex hash, size in bytes.

    A NamedTuple rather than a frozen dataclass: just as immutable and hashable,
    and several times cheaper to build, which FindMissingBlobs does per digest."""

    function: DigestFunction
    hash: str
    size: int

    @classmethod
    def parse(cls, function: DigestFunction, hash_: str, size: int) -> Digest:
        """Validate and build; raises InvalidArgument with a message a person can act on."""
        if not _HEX64.fullmatch(hash_):
            raise InvalidArgument(
                f"invalid {function.path_name} hash {hash_[:80]!r}: "
                "expected 64 lowercase hexadecimal characters"
            )
        if size < 0:
            raise InvalidArgument(f"invalid digest {hash_}/{size}: size must not be negative")
        return cls(function, hash_, size)

    @classmethod
    def from_proto(cls, function: DigestFunction, message: re_pb2.Digest) -> Digest:
        return cls.parse(function, message.hash, message.size_bytes)

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size)

    @property
    def is_empty(self) -> bool:
        return self.size == 0 and self == _EMPTY[self.function]

    def resource_path(self) -> str:
        """`{digest_function/}{hash}/{size}`: the function is named unless it is SHA256."""
        if self.function is DigestFunction.SHA256:
            return f"{self.hash}/{self.size}"
        return f"{self.function.path_name}/{self.hash}/{self.size}"

    def __str__(self) -> str:
        return self.resource_path()


_BY_PATH_NAME = {function.path_name: function for function in DigestFunction}
_EMPTY = {
    function: Digest(function, function.hasher().hexdigest(), 0) for function in DigestFunction
}
