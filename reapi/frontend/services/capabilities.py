"""Capabilities: what this server really implements, nothing more."""

from __future__ import annotations

from typing import Any

import grpc

from reapi.core.digests import DigestFunction
from reapi.frontend.services.status import grpc_errors
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from reapi.protos import semver_pb2

LOW_API = semver_pb2.SemVer(major=2, minor=0)
HIGH_API = semver_pb2.SemVer(major=2, minor=3)


def cache_capabilities(max_batch_total_size: int) -> re_pb2.CacheCapabilities:
    return re_pb2.CacheCapabilities(
        digest_functions=[function.value for function in DigestFunction],
        action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(update_enabled=True),
        max_batch_total_size_bytes=max_batch_total_size,
        # Workers refuse absolute symlinks in inputs and outputs (they could point
        # anywhere on the worker).
        symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED,
        supported_compressors=[re_pb2.Compressor.ZSTD],
        supported_batch_update_compressors=[re_pb2.Compressor.ZSTD],
    )


def execution_capabilities() -> re_pb2.ExecutionCapabilities:
    return re_pb2.ExecutionCapabilities(
        digest_function=DigestFunction.SHA256.value,
        digest_functions=[function.value for function in DigestFunction],
        exec_enabled=True,
        # ExecutionPolicy.priority: any int32; lower runs sooner.
        execution_priority_capabilities=re_pb2.PriorityCapabilities(
            priorities=[
                re_pb2.PriorityCapabilities.PriorityRange(
                    min_priority=-(2**31), max_priority=2**31 - 1
                )
            ]
        ),
    )


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    def __init__(self, max_batch_total_size: int) -> None:
        self._capabilities = re_pb2.ServerCapabilities(
            cache_capabilities=cache_capabilities(max_batch_total_size),
            execution_capabilities=execution_capabilities(),
            low_api_version=LOW_API,
            high_api_version=HIGH_API,
        )

    @grpc_errors
    async def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> re_pb2.ServerCapabilities:
        return self._capabilities
