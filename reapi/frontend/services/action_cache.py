"""ActionCache: GetActionResult (checked for completeness) and UpdateActionResult."""

from __future__ import annotations

from typing import Any

import grpc

from cas.action_cache import ActionCache
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import InvalidArgument
from reapi.frontend.services.status import grpc_errors
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class ActionCacheService(re_grpc.ActionCacheServicer):
    def __init__(self, cache: ActionCache) -> None:
        self._cache = cache

    @grpc_errors
    async def GetActionResult(
        self, request: re_pb2.GetActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        function = DigestFunction.from_wire(request.digest_function)
        action = Digest.from_proto(function, request.action_digest)
        return await self._cache.get(
            action,
            inline_stdout=request.inline_stdout,
            inline_stderr=request.inline_stderr,
            inline_files=request.inline_output_files,
            instance_name=request.instance_name,
        )

    @grpc_errors
    async def UpdateActionResult(
        self, request: re_pb2.UpdateActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        function = DigestFunction.from_wire(request.digest_function)
        action = Digest.from_proto(function, request.action_digest)
        if not request.HasField("action_result"):
            raise InvalidArgument("action_result is required")
        _validate_result(function, request.action_result)
        return await self._cache.put(action, request.action_result, request.instance_name)


def _validate_result(function: DigestFunction, result: re_pb2.ActionResult) -> None:
    """Every digest in the result must be well-formed, and output paths relative."""
    for output in result.output_files:
        Digest.from_proto(function, output.digest)
        _check_path(output.path)
    for directory in result.output_directories:
        Digest.from_proto(function, directory.tree_digest)
        if directory.path:
            _check_path(directory.path)
    for field in ("stdout_digest", "stderr_digest"):
        if result.HasField(field):
            Digest.from_proto(function, getattr(result, field))
    for symlink in [
        *result.output_symlinks,
        *result.output_file_symlinks,
        *result.output_directory_symlinks,
    ]:
        _check_path(symlink.path)


def _check_path(path: str) -> None:
    if not path or path.startswith("/"):
        raise InvalidArgument(f"output path {path!r} must be a non-empty relative path")
