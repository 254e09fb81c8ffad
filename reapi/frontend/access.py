"""Who may do what: permissions per token (or client certificate), per call.

The token file (`reapi serve --auth-tokens FILE`) holds one grant per line:

    TOKEN [PERMISSION[,PERMISSION...]] [@INSTANCE ...]
    CN=NAME [PERMISSION[,PERMISSION...]] [@INSTANCE ...]

- `read`: Capabilities, FindMissingBlobs, blob reads, GetTree, GetActionResult.
- `write`: read, plus uploads and UpdateActionResult (what CI needs).
- `execute`: read, plus uploads (an action's inputs), Execute, WaitExecution and
  the Operations calls on the caller's own operations.
- `worker`: the worker protocol and the CAS calls a worker's leases need (reading
  inputs, uploading outputs); nothing a client does. Workers are trusted
  explicitly: no other permission leases actions.
- `admin`: read, write and execute, over every caller's operations.

A bare TOKEN means `read,write,execute`. `@INSTANCE` limits a grant to those
instance names (`@` alone is the default, empty, instance name). `CN=NAME` grants
to a client whose TLS certificate, verified against `--tls-client-ca`, has that
common name (quoted when it holds spaces: `"CN=build farm"`); a call that carries
a bearer token is judged by the token alone.

Without a token file every caller is ANYONE (every permission, one owner for all
operations): the loopback default, and `--insecure` with TLS only.

`reapi serve --instance NAME` (repeatable) serves only those instance names; a
call naming another is INVALID_ARGUMENT. Without it every name is served, each
with its own action cache and operations.

`AccessInterceptor` checks each call before its service sees it: the method's
permission and the request's instance name. Services ask `current_caller()` for
what only they can judge (whose operation this is).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.longrunning import operations_pb2

from reapi.core.errors import InvalidArgument, PermissionDenied
from reapi.core.resources import parse_read_name, parse_write_name
from reapi.frontend.security import ConfigError

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]

READ, WRITE, EXECUTE, WORKER, ADMIN = "read", "write", "execute", "worker", "admin"
PERMISSIONS = (READ, WRITE, EXECUTE, WORKER, ADMIN)
BARE_TOKEN = frozenset({READ, WRITE, EXECUTE})
# What a permission brings with it.
_IMPLIES = {
    READ: {READ},
    WRITE: {WRITE, READ},
    EXECUTE: {EXECUTE, READ},
    WORKER: {WORKER},
    ADMIN: {ADMIN, EXECUTE, WRITE, READ},
}

_RE = "/build.bazel.remote.execution.v2."
_OPS = "/google.longrunning.Operations/"
_BS = "/google.bytestream.ByteStream/"
_CAS_READ = frozenset({READ, WORKER})
_UPLOAD = frozenset({WRITE, EXECUTE, WORKER})
# Each method, and the permissions any one of which lets a caller make it. A
# method missing here is refused to everyone (tests/unit/test_access.py checks
# that every method the server registers is listed).
METHOD_PERMISSIONS: dict[str, frozenset[str]] = {
    _RE + "Capabilities/GetCapabilities": frozenset(PERMISSIONS),
    _RE + "ContentAddressableStorage/FindMissingBlobs": _CAS_READ,
    _RE + "ContentAddressableStorage/BatchReadBlobs": _CAS_READ,
    _RE + "ContentAddressableStorage/GetTree": _CAS_READ,
    _RE + "ContentAddressableStorage/BatchUpdateBlobs": _UPLOAD,
    _BS + "Read": _CAS_READ,
    _BS + "Write": _UPLOAD,
    _BS + "QueryWriteStatus": _UPLOAD,
    _RE + "ActionCache/GetActionResult": frozenset({READ}),
    _RE + "ActionCache/UpdateActionResult": frozenset({WRITE}),
    _RE + "Execution/Execute": frozenset({EXECUTE}),
    _RE + "Execution/WaitExecution": frozenset({EXECUTE}),
    _OPS + "GetOperation": frozenset({EXECUTE}),
    _OPS + "ListOperations": frozenset({EXECUTE}),
    _OPS + "CancelOperation": frozenset({EXECUTE}),
    _OPS + "DeleteOperation": frozenset({EXECUTE}),
    _OPS + "WaitOperation": frozenset({EXECUTE}),
    "/reapi.worker.v1.Workers/Work": frozenset({WORKER}),
    # The agent asks which directories workers provide, to know what to send.
    "/reapi.worker.v1.Workers/GetProvided": frozenset({READ, WORKER}),
}
# Load balancers probe health without a token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class Caller:
    """Who makes a call. `name` identifies the caller in logs and as the owner
    of operations; for a token it is a digest of the token, never the token."""

    name: str
    permissions: frozenset[str]
    # The instance names the caller may use; None: every one.
    instances: frozenset[str] | None = None

    def may(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.permissions

    def check_instance(self, instance_name: str) -> None:
        if self.instances is not None and instance_name not in self.instances:
            raise PermissionDenied(
                f"instance name {instance_name!r} is not one this caller's grant allows"
            )

    def sees(self, owners: Iterable[str], instance_name: str) -> bool:
        """Whether an operation of `owners` on `instance_name` is this caller's to see."""
        if self.instances is not None and instance_name not in self.instances:
            return False
        return self.is_admin or self.name in owners


ANYONE = Caller("anyone", frozenset(PERMISSIONS))
_CALLER: ContextVar[Caller] = ContextVar("reapi_caller", default=ANYONE)


def current_caller() -> Caller:
    """The caller of the call being served (ANYONE without a token file)."""
    return _CALLER.get()


@dataclass(frozen=True)
class Grants:
    """The token file, parsed: bearer tokens and certificate names to callers."""

    tokens: dict[bytes, Caller]
    common_names: dict[str, Caller]

    def with_token(self, token: str, caller: Caller) -> Grants:
        return Grants({**self.tokens, token.encode(): caller}, self.common_names)

    def by_token(self, token: bytes) -> Caller | None:
        found = None
        for known, caller in self.tokens.items():  # compare every one: constant time
            if hmac.compare_digest(token, known):
                found = caller
        return found


def token_name(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


_WORD = re.compile(r'"([^"]*)"|(\S+)')


def _words(line: str, where: str) -> list[str]:
    """A line's words: runs of non-blanks, or "double-quoted" text (a name with
    spaces); a word starting with # begins a comment. A # inside a word is part
    of it (a token may hold one)."""
    words: list[str] = []
    for match in _WORD.finditer(line):
        quoted: str | None = match.group(1)
        plain: str | None = match.group(2)
        if plain is not None and plain.startswith("#"):
            break
        if plain is not None and '"' in plain:
            raise ConfigError(f"{where}: a quote that does not close, or one inside a word")
        words.append(quoted if quoted is not None else plain or "")
    return words


def parse_grant(line: str, where: str) -> tuple[str, Caller]:
    """One line of the token file: (token or `CN=NAME`, its caller). Messages
    never repeat the line: it holds a secret."""
    words = _words(line, where)
    if not words or not words[0]:
        raise ConfigError(f"{where}: an empty token")
    subject, rest = words[0], words[1:]
    instances = {word[1:] for word in rest if word.startswith("@")}
    named = [word for word in rest if not word.startswith("@")]
    if len(named) > 1:
        raise ConfigError(
            f"{where}: expected TOKEN [PERMISSION,...] [@INSTANCE...]: "
            f"{len(named)} words where one list of permissions goes"
        )
    permissions: set[str] = set()
    for permission in named[0].split(",") if named else sorted(BARE_TOKEN):
        if permission not in _IMPLIES:
            raise ConfigError(
                f"{where}: unknown permission {permission!r}; known: {', '.join(PERMISSIONS)}"
            )
        permissions |= _IMPLIES[permission]
    if subject.startswith("CN="):
        name = "cert:" + subject[3:]
        if not subject[3:]:
            raise ConfigError(f"{where}: 'CN=' needs a certificate's common name")
    else:
        name = token_name(subject)
    return subject, Caller(name, frozenset(permissions), frozenset(instances) or None)


def load_grants(path: Path) -> Grants:
    """The token file; blank lines and lines starting with # are ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read --auth-tokens {path}: {error.strerror}") from None
    tokens: dict[bytes, Caller] = {}
    common_names: dict[str, Caller] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"--auth-tokens {path}, line {number}"
        subject, caller = parse_grant(line, where)
        twice = (
            subject[3:] in common_names if subject.startswith("CN=") else subject.encode() in tokens
        )
        if twice:
            raise ConfigError(f"{where}: {caller.name} is granted twice")
        if subject.startswith("CN="):
            common_names[subject[3:]] = caller
        else:
            tokens[subject.encode()] = caller
    if not tokens and not common_names:
        raise ConfigError(f"--auth-tokens {path} holds no token")
    return Grants(tokens, common_names)


def instance_of(request: Any) -> str | None:
    """The instance name a request names, if it names one the interceptor can see
    (operations are judged by their services, which know the operation's)."""
    if hasattr(request, "instance_name"):
        return str(request.instance_name)
    if isinstance(request, operations_pb2.ListOperationsRequest):
        return str(request.name)  # the instance whose operations to list, as bgd sends it
    resource = getattr(request, "resource_name", "")
    if not resource:
        return None
    parse = parse_write_name if "/uploads/" in f"/{resource}" else parse_read_name
    return parse(resource).instance_name  # a malformed name: INVALID_ARGUMENT


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call (bearer token, else client certificate), checks the
    method's permission and the request's instance name, and makes the caller
    `current_caller()` for the service. Without `grants` everyone is ANYONE;
    with `served`, an instance name not in it is INVALID_ARGUMENT."""

    def __init__(self, grants: Grants | None, served: frozenset[str] | None = None) -> None:
        self._grants = grants
        self.served = served
        # Each method's guarded handler, made once: gRPC asks for every call.
        self._handlers: dict[str, Handler] = {}

    def caller(self, context: Context) -> Caller | None:
        if self._grants is None:
            return ANYONE
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                text = value if isinstance(value, str) else value.decode()
                scheme, _, token = text.partition(" ")
                if scheme.lower() != "bearer":
                    return None
                return self._grants.by_token(token.strip().encode())
        for name in context.auth_context().get("x509_common_name", ()):
            caller = self._grants.common_names.get(name.decode(errors="replace"))
            if caller is not None:
                return caller
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        guarded = self._handlers.get(method)
        if guarded is None:
            allowed = METHOD_PERMISSIONS.get(method, frozenset())
            guarded = self._handlers[method] = _guarded(handler, method, allowed, self)
        return guarded


def _guarded(
    handler: Handler, method: str, allowed: frozenset[str], interceptor: AccessInterceptor
) -> Handler:
    """`handler` with the access check in front of its behaviour (of any of the
    four shapes; a streaming response may be a generator or a coroutine that
    writes to its context)."""

    async def admit(request: Any, context: Context) -> Any:
        """The request to give the behaviour, once the caller may make it."""
        caller = interceptor.caller(context)
        if caller is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
            raise AssertionError("context.abort returned")  # pragma: no cover
        if not allowed & caller.permissions:
            needed = " or ".join(sorted(allowed)) or "a permission no grant gives"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rpartition('/')[2]} needs {needed}; this caller has "
                f"{', '.join(sorted(caller.permissions))}",
            )
        _CALLER.set(caller)
        if handler.request_streaming:
            return _first_checked(request, context, caller, interceptor.served)
        await _check_instance(context, caller, request, interceptor.served)
        return request

    behaviour: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if handler.response_streaming and not inspect.iscoroutinefunction(behaviour):

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in behaviour(await admit(request, context), context):
                yield response

        guarded: Callable[..., Any] = streaming
    else:

        async def single(request: Any, context: Context) -> Any:
            return await behaviour(await admit(request, context), context)

        guarded = single
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        guarded,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _first_checked(
    requests: AsyncIterator[Any], context: Context, caller: Caller, served: frozenset[str] | None
) -> AsyncIterator[Any]:
    """A request stream whose first message's instance name is checked."""
    first = True
    async for request in requests:
        if first:
            await _check_instance(context, caller, request, served)
            first = False
        yield request


async def _check_instance(
    context: Context, caller: Caller, request: Any, served: frozenset[str] | None
) -> None:
    if caller.instances is None and served is None:
        return
    try:
        instance = instance_of(request)
    except InvalidArgument:
        return  # a malformed name: its service answers INVALID_ARGUMENT
    if instance is None:
        return
    if served is not None and instance not in served:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"instance name {instance!r} is not served here; served: "
            f"{', '.join(repr(name) for name in sorted(served))}",
        )
    try:
        caller.check_instance(instance)
    except PermissionDenied as error:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, error.message)
