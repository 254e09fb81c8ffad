"""Building a compile's Action from its layout: pure, no I/O.

`build_action(spec)` turns an `ActionSpec` (the input tree's files by digest,
the command, the outputs) into the Action's digest and every blob it names
besides the files read from disk: the Action, the Command, the Directory
messages and the files made here (the manifest, a preprocessed source).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cas.merkle import build_tree
from reapi.core.digests import Digest, DigestFunction
from reapi.protos import remote_execution_pb2 as re_pb2

SHA256 = DigestFunction.SHA256


@dataclass(frozen=True)
class ActionSpec:
    """One compile as the worker will run it, in the input root's terms."""

    arguments: list[str]  # the whole command: the compiler, then its arguments
    files: dict[str, tuple[Digest, bool]]  # input path -> (digest, executable), read from disk
    contents: dict[str, bytes]  # input path -> bytes made here (manifest, .i file)
    workdir: str  # relative to the input root
    outputs: list[str]  # relative to workdir
    environment: dict[str, str]
    do_not_cache: bool
    directories: list[str] = field(default_factory=list)  # input paths made even if empty


@dataclass(frozen=True)
class Built:
    action: Digest
    blobs: dict[Digest, bytes]  # the Action, Command, Directories and the files made here
    files: list[Digest]  # the files read from disk (their bytes stay there)


def build_action(spec: ActionSpec, function: DigestFunction = SHA256) -> Built:
    files = dict(spec.files)
    blobs: dict[Digest, bytes] = {}
    for path, data in spec.contents.items():
        digest = function.digest_of(data)
        files[path] = (digest, False)
        blobs[digest] = data
    root_digest, directories = build_tree(files, function, spec.directories)
    command = re_pb2.Command(
        arguments=spec.arguments,
        environment_variables=[
            re_pb2.Command.EnvironmentVariable(name=k, value=v)
            for k, v in sorted(spec.environment.items())
        ],
        output_paths=sorted(spec.outputs),
        working_directory=spec.workdir,
    )
    command_data = command.SerializeToString(deterministic=True)
    command_digest = function.digest_of(command_data)
    action = re_pb2.Action(
        command_digest=command_digest.to_proto(),
        input_root_digest=root_digest.to_proto(),
        do_not_cache=spec.do_not_cache,
    )
    action_data = action.SerializeToString(deterministic=True)
    action_digest = function.digest_of(action_data)
    blobs.update(directories)
    blobs[command_digest] = command_data
    blobs[action_digest] = action_data
    return Built(action_digest, blobs, [digest for digest, _ in spec.files.values()])
