"""ByteStream resource names, parsed once into a value.

Downloads:  {instance}/blobs/{function/}{hash}/{size}
            {instance}/compressed-blobs/{compressor}/{function/}{hash}/{size}
Uploads:    {instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata}
            {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{function/}{hash}/{size}...

The instance name may have several segments (or none), but none may be one of
the reserved words. The function segment is omitted for SHA256.
"""

from __future__ import annotations

from dataclasses import dataclass

from reapi.core.digests import WIRE_FUNCTION_NAMES, Digest, DigestFunction
from reapi.core.errors import InvalidArgument

RESERVED_SEGMENTS = frozenset(
    {
        "blobs",
        "uploads",
        "actions",
        "actionResults",
        "operations",
        "capabilities",
        "compressed-blobs",
    }
)
SUPPORTED_COMPRESSORS = frozenset({"zstd"})


@dataclass(frozen=True, slots=True)
class BlobResource:
    """A parsed resource name. `compressor` is None for plain `blobs/` names;
    `upload_id` is set for upload names only."""

    instance_name: str
    digest: Digest
    compressor: str | None = None
    upload_id: str | None = None


def parse_read_name(name: str) -> BlobResource:
    segments = name.split("/")
    start = _first_of(segments, ("blobs", "compressed-blobs"), name)
    resource, rest = _parse_blob_part(name, segments[:start], segments[start:], None)
    if rest:
        raise InvalidArgument(f"resource name {name!r}: unexpected text after the size")
    return resource


def parse_write_name(name: str) -> BlobResource:
    segments = name.split("/")
    start = _first_of(segments, ("uploads",), name)
    if len(segments) < start + 2 or segments[start + 1] in ("", "blobs", "compressed-blobs"):
        raise InvalidArgument(f"resource name {name!r}: missing upload id after 'uploads/'")
    upload_id = segments[start + 1]
    resource, _metadata = _parse_blob_part(name, segments[:start], segments[start + 2 :], upload_id)
    return resource


def _first_of(segments: list[str], keywords: tuple[str, ...], name: str) -> int:
    for index, segment in enumerate(segments):
        if segment in keywords:
            return index
    expected = " or ".join(f"'{k}/'" for k in keywords)
    raise InvalidArgument(f"resource name {name!r}: expected {expected} after the instance name")


def _parse_blob_part(
    name: str, instance: list[str], segments: list[str], upload_id: str | None
) -> tuple[BlobResource, list[str]]:
    for segment in instance:
        if segment in RESERVED_SEGMENTS:
            raise InvalidArgument(
                f"resource name {name!r}: instance name segment {segment!r} is a reserved word"
            )
    compressor = None
    if not segments or segments[0] not in ("blobs", "compressed-blobs"):
        raise InvalidArgument(f"resource name {name!r}: expected 'blobs/' or 'compressed-blobs/'")
    position = 1
    if segments[0] == "compressed-blobs":
        compressor = segments[1] if len(segments) > 1 else ""
        if compressor not in SUPPORTED_COMPRESSORS:
            raise InvalidArgument(
                f"resource name {name!r}: compressor {compressor!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_COMPRESSORS))}"
            )
        position = 2
    function = DigestFunction.SHA256
    if position < len(segments) and segments[position] in WIRE_FUNCTION_NAMES:
        named = DigestFunction.from_path_name(segments[position])
        if named is None:
            raise InvalidArgument(
                f"resource name {name!r}: digest function {segments[position]!r} is not "
                "supported; use sha256 (unnamed) or blake3"
            )
        function = named
        position += 1
    if len(segments) < position + 2:
        raise InvalidArgument(f"resource name {name!r}: expected '{{hash}}/{{size}}'")
    hash_, size_text = segments[position], segments[position + 1]
    if not size_text.isdigit():
        raise InvalidArgument(
            f"resource name {name!r}: size {size_text!r} is not a non-negative integer"
        )
    digest = Digest.parse(function, hash_, int(size_text))
    resource = BlobResource("/".join(instance), digest, compressor, upload_id)
    return resource, segments[position + 2 :]
