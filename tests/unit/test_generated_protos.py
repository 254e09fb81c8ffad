"""The committed *_pb2 modules are exactly what tools/genprotos.py makes from the .proto files."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import REPO
from tools.genprotos import generate


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert fresh, "protoc produced nothing"
    for relative, data in fresh.items():
        committed = REPO / relative
        assert committed.exists(), f"{relative} is not committed; run tools/genprotos.py"
        assert committed.read_bytes() == data, f"{relative} is stale; run tools/genprotos.py"


def test_wire_names_match_the_spec() -> None:
    """Spot checks of full names and field numbers that clients depend on."""
    from reapi.protos import bytestream_pb2, remote_execution_pb2

    digest = remote_execution_pb2.Digest.DESCRIPTOR
    assert digest.full_name == "build.bazel.remote.execution.v2.Digest"
    assert [(f.name, f.number) for f in digest.fields] == [("hash", 1), ("size_bytes", 2)]
    result = remote_execution_pb2.ActionResult.DESCRIPTOR
    assert result.fields_by_name["output_symlinks"].number == 12
    assert result.fields_by_name["execution_metadata"].number == 9
    command = remote_execution_pb2.Command.DESCRIPTOR
    assert command.fields_by_name["output_paths"].number == 7
    assert remote_execution_pb2.DigestFunction.BLAKE3 == 9
    assert bytestream_pb2.ReadResponse.DESCRIPTOR.fields_by_name["data"].number == 10
    service = remote_execution_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"]
    assert service.full_name == "build.bazel.remote.execution.v2.ContentAddressableStorage"
