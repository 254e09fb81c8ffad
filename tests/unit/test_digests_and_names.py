from __future__ import annotations

import pytest

from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import InvalidArgument
from reapi.core.resources import parse_read_name, parse_write_name
from reapi.protos import remote_execution_pb2 as re_pb2

H = "0123456789abcdef" * 4


def test_known_hashes() -> None:
    assert DigestFunction.SHA256.digest_of(b"abc").hash == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert DigestFunction.BLAKE3.digest_of(b"").hash == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )


def test_unset_function_means_sha256() -> None:
    assert DigestFunction.from_wire(re_pb2.DigestFunction.UNKNOWN) is DigestFunction.SHA256
    assert DigestFunction.from_wire(re_pb2.DigestFunction.BLAKE3) is DigestFunction.BLAKE3


@pytest.mark.parametrize("bad", ["", "ab", H.upper(), H + "0", H[:-1] + "g", " " + H[1:]])
def test_bad_hashes(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        Digest.parse(DigestFunction.SHA256, bad, 1)


@pytest.mark.parametrize(
    ("name", "instance", "function", "compressor"),
    [
        (f"blobs/{H}/5", "", DigestFunction.SHA256, None),
        (f"blobs/sha256/{H}/5", "", DigestFunction.SHA256, None),
        (f"a/b/c/blobs/blake3/{H}/5", "a/b/c", DigestFunction.BLAKE3, None),
        (f"compressed-blobs/zstd/{H}/5", "", DigestFunction.SHA256, "zstd"),
        (f"x/compressed-blobs/zstd/blake3/{H}/5", "x", DigestFunction.BLAKE3, "zstd"),
    ],
)
def test_read_names(
    name: str, instance: str, function: DigestFunction, compressor: str | None
) -> None:
    resource = parse_read_name(name)
    assert resource.instance_name == instance
    assert resource.digest == Digest(function, H, 5)
    assert resource.compressor == compressor


def test_write_names_keep_metadata_out() -> None:
    resource = parse_write_name(f"ci/uploads/7e1d/blobs/blake3/{H}/5/some/metadata")
    assert (resource.instance_name, resource.upload_id) == ("ci", "7e1d")
    assert resource.digest == Digest(DigestFunction.BLAKE3, H, 5)


def test_resource_path_names_blake3_only() -> None:
    assert Digest(DigestFunction.SHA256, H, 5).resource_path() == f"{H}/5"
    assert Digest(DigestFunction.BLAKE3, H, 5).resource_path() == f"blake3/{H}/5"
