"""The one place where errors become gRPC statuses.

Servicer methods raise `ReapiError`s (and let anything unexpected propagate);
`@grpc_errors` turns them into a status with the same code, the message, and
any detail messages packed into `grpc-status-details-bin` as google.rpc.Status.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2

from reapi.core.errors import Internal, ReapiError

log = logging.getLogger(__name__)

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
DETAILS_KEY = "grpc-status-details-bin"

F = TypeVar("F", bound=Callable[..., Any])


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ReapiError) -> NoReturn:
    status = status_pb2.Status(code=error.code, message=error.message)
    for detail in error.details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    metadata = ((DETAILS_KEY, status.SerializeToString()),) if error.details else ()
    await context.abort(_STATUS_CODES[error.code], error.message, metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _internal(error: Exception) -> ReapiError:
    log.exception("internal error")
    return Internal(f"internal error: {type(error).__name__}: {error}")


def grpc_errors(method: F) -> F:
    """Decorate a servicer method (unary or streaming response)."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self: Any, request: Any, context: Any) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except ReapiError as error:
                await abort(context, error)
            except Exception as error:
                await abort(context, _internal(error))

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except ReapiError as error:
            await abort(context, error)
        except Exception as error:
            await abort(context, _internal(error))

    return unary  # type: ignore[return-value]


def status_of(error: ReapiError | None) -> status_pb2.Status:
    """A google.rpc.Status for a per-item result (batch responses)."""
    if error is None:
        return status_pb2.Status(code=code_pb2.OK)
    return status_pb2.Status(code=error.code, message=error.message)
