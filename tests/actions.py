"""Building and running REAPI actions from tests, against a real server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from cas.merkle import build_tree
from cas.remote import RemoteStore
from reapi.core.digests import Digest, DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc

SHA256 = DigestFunction.SHA256
# path -> content, or (content, executable)
Files = Mapping[str, bytes | tuple[bytes, bool]]


def _tree(files: Files, blobs: dict[Digest, bytes]) -> Digest:
    """The input tree of `files`, its files and Directory messages added to `blobs`."""
    entries = {}
    for path, value in files.items():
        data, executable = value if isinstance(value, tuple) else (value, False)
        digest = SHA256.digest_of(data)
        blobs[digest] = data
        entries[path] = (digest, executable)
    root, directories = build_tree(entries, SHA256)
    blobs.update(directories)
    return root


async def upload_action(
    channel: grpc.aio.Channel,
    arguments: list[str],
    files: Files = {},  # noqa: B006 - read only
    outputs: list[str] = [],  # noqa: B006
    env: Mapping[str, str] = {"PATH": "/usr/bin:/bin"},
    timeout: float | None = None,
    do_not_cache: bool = False,
    platform: Mapping[str, str] = {},
    salt: bytes = b"",
    legacy_outputs: tuple[list[str], list[str]] | None = None,
    workdir: str = "",
) -> Digest:
    """Upload the inputs, Command and Action; returns the Action's digest."""
    blobs: dict[Digest, bytes] = {}
    root = _tree(files, blobs)
    command = re_pb2.Command(
        arguments=arguments,
        environment_variables=[
            re_pb2.Command.EnvironmentVariable(name=k, value=v) for k, v in sorted(env.items())
        ],
        working_directory=workdir,
    )
    if legacy_outputs is not None:
        command.output_files.extend(sorted(legacy_outputs[0]))
        command.output_directories.extend(sorted(legacy_outputs[1]))
    else:
        command.output_paths.extend(sorted(outputs))
    command_data = command.SerializeToString(deterministic=True)
    command_digest = SHA256.digest_of(command_data)
    blobs[command_digest] = command_data
    action = re_pb2.Action(
        command_digest=command_digest.to_proto(),
        input_root_digest=root.to_proto(),
        do_not_cache=do_not_cache,
        salt=salt,
    )
    if timeout is not None:
        action.timeout.CopyFrom(
            duration_pb2.Duration(seconds=int(timeout), nanos=int(timeout % 1 * 1e9))
        )
    for name, value in sorted(platform.items()):
        action.platform.properties.add(name=name, value=value)
    action_data = action.SerializeToString(deterministic=True)
    action_digest = SHA256.digest_of(action_data)
    blobs[action_digest] = action_data
    store = RemoteStore(channel)
    await store.put_many(list(blobs.items()))
    return action_digest


def execution(channel: grpc.aio.Channel) -> Any:
    return re_grpc.ExecutionStub(channel)


async def execute(
    channel: grpc.aio.Channel, action: Digest, **request: Any
) -> tuple[list[operations_pb2.Operation], re_pb2.ExecuteResponse]:
    """Every Operation the stream sends, and the final ExecuteResponse."""
    call = execution(channel).Execute(
        re_pb2.ExecuteRequest(action_digest=action.to_proto(), **request)
    )
    operations = [operation async for operation in call]
    response = re_pb2.ExecuteResponse()
    assert operations[-1].done
    operations[-1].response.Unpack(response)
    return operations, response


def stage(operation: operations_pb2.Operation) -> int:
    metadata = re_pb2.ExecuteOperationMetadata()
    operation.metadata.Unpack(metadata)
    return int(metadata.stage)


async def read_blob(channel: grpc.aio.Channel, digest: re_pb2.Digest) -> bytes:
    found = await RemoteStore(channel).get_many([Digest.from_proto(SHA256, digest)])
    return found[Digest.from_proto(SHA256, digest)]


def precondition_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """(type, subject) of each violation in the error's PreconditionFailure detail."""
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    failure = error_details_pb2.PreconditionFailure()
    status.details[0].Unpack(failure)
    return [(v.type, v.subject) for v in failure.violations]
