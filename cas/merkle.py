"""Building input trees: from a flat map of files to canonical Directory messages."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from reapi.core.digests import Digest, DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2

# path (relative, "/"-separated) -> (digest, is_executable)
FileMap = Mapping[str, tuple[Digest, bool]]


def build_tree(
    files: FileMap, function: DigestFunction, empty: Collection[str] = ()
) -> tuple[Digest, dict[Digest, bytes]]:
    """The root Directory's digest, and every Directory message by digest;
    the directories `empty` names are made too, even with nothing in them. Entries are
    sorted by name and names are single components, as REAPI requires for
    canonical form."""
    here: dict[str, tuple[Digest, bool]] = {}
    below: dict[str, dict[str, tuple[Digest, bool]]] = {}
    deeper: dict[str, list[str]] = {}
    for path, entry in files.items():
        head, rest = _split(path)
        if rest:
            below.setdefault(head, {})[rest] = entry
        else:
            here[head] = entry
    for path in empty:
        head, rest = _split(path)
        below.setdefault(head, {})
        if rest:
            deeper.setdefault(head, []).append(rest)
    directories: dict[Digest, bytes] = {}
    directory = re_pb2.Directory()
    for name in sorted(here):
        digest, executable = here[name]
        directory.files.add(name=name, digest=digest.to_proto(), is_executable=executable)
    for name in sorted(below):
        child, children = build_tree(below[name], function, deeper.get(name, ()))
        directories.update(children)
        directory.directories.add(name=name, digest=child.to_proto())
    data = directory.SerializeToString(deterministic=True)
    digest = function.digest_of(data)
    directories[digest] = data
    return digest, directories


def _split(path: str) -> tuple[str, str]:
    head, _, rest = path.partition("/")
    if not head or head in (".", ".."):
        raise ValueError(f"input path {path!r} is not a clean relative path")
    return head, rest
