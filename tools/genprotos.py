"""Regenerate the Python modules for reapi/protos/*.proto.

Run from anywhere: ``python tools/genprotos.py [OUTDIR]``. Without OUTDIR the
modules are written beside the .proto files (and committed); the staleness test
writes them to a temporary directory and compares.

grpcio-tools must be the version pinned in pyproject.toml, since its output
embeds the protobuf and grpc versions it was made with.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.rpc import status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = [
    "reapi/protos/semver.proto",
    "reapi/protos/bytestream.proto",
    "reapi/protos/remote_execution.proto",
    "reapi/protos/worker.proto",
]


def _googleapis_include(tmp: Path) -> Path:
    """Lay out google/longrunning/operations.proto for protoc.

    googleapis-common-protos ships that file as ``operations_proto.proto`` but
    registers it at run time as ``google/longrunning/operations.proto``, the
    name our import must use.
    """
    google = Path(status_pb2.__file__).parent.parent
    for package in ("api", "rpc", "longrunning"):
        shutil.copytree(
            google / package,
            tmp / "google" / package,
            ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"),
        )
    lro = tmp / "google" / "longrunning"
    shutil.copy(lro / "operations_proto.proto", lro / "operations.proto")
    return tmp


def generate(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        include = _googleapis_include(Path(tmp))
        well_known = Path(str(resources.files("grpc_tools"))) / "_proto"
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={outdir}",
            f"--pyi_out={outdir}",
            f"--grpc_python_out={outdir}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    generate(target)
