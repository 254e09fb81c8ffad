"""Errors that carry a gRPC status code.

Domain code (`cas/`, `executor/`) raises these without importing grpc; the one
decorator in `reapi/frontend/services/status.py` turns them into gRPC statuses. Codes are
`google.rpc.Code` values, the same numbers gRPC uses.
"""

from __future__ import annotations

from typing import ClassVar

from google.protobuf.message import Message
from google.rpc import code_pb2


class ReapiError(Exception):
    """Base class. `details` are protobuf messages packed into the status details."""

    code: ClassVar[int] = code_pb2.UNKNOWN

    def __init__(self, message: str, details: tuple[Message, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidArgument(ReapiError):
    code = code_pb2.INVALID_ARGUMENT


class NotFound(ReapiError):
    code = code_pb2.NOT_FOUND


class FailedPrecondition(ReapiError):
    code = code_pb2.FAILED_PRECONDITION


class OutOfRange(ReapiError):
    code = code_pb2.OUT_OF_RANGE


class ResourceExhausted(ReapiError):
    code = code_pb2.RESOURCE_EXHAUSTED


class Unavailable(ReapiError):
    code = code_pb2.UNAVAILABLE


class Internal(ReapiError):
    code = code_pb2.INTERNAL


class PermissionDenied(ReapiError):
    code = code_pb2.PERMISSION_DENIED


class DeadlineExceeded(ReapiError):
    code = code_pb2.DEADLINE_EXCEEDED
