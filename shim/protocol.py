"""The client-agent protocol: length-prefixed `marshal` data over a Unix socket.

Imported by `reapi-cc` on every compile, so only modules built into the
interpreter: `marshal` and `_socket` cost nothing to import, where `json`
and `socket` cost several milliseconds each. Both ends are the same user's
processes, so the socket (in a per-user directory) is the trust boundary;
marshal's format is stable across Python 3 versions for these plain types.

    request  {"op": "compile", "cwd": ..., "argv": [compiler, args...], "env": {...}}
             {"op": "stats"} | {"op": "zero-stats"}
    reply    {"do": "local", "reason": ...}
             {"do": "exit", "code": N, "stdout": bytes, "stderr": bytes}
             {"stats": {...}}
"""

from __future__ import annotations

import _socket
import marshal
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (7 ms)

if TYPE_CHECKING:
    from typing import Any

HEADER_SIZE = 4  # big-endian length of the body
# The counters of `reapi-cc --stats`, besides `local_reasons` (reason -> count).
STAT_KEYS = (
    "invocations",
    "cache_hits",
    "direct_hits",  # cache hits whose action direct mode remembered (shim/memo.py)
    "remote_executions",
    "local_fallbacks",
    "bytes_uploaded",
    "bytes_downloaded",
    "scan_fallbacks",  # `scan` mode compiles that used `deps` (scan_fallback_reasons)
)
MAX_MESSAGE = 64 * 1024 * 1024


def state_dir() -> str:
    """$REAPI_HOME/shim: the agent's socket, lock, log and statistics."""
    home = os.environ.get("REAPI_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "reapi")
    return os.path.join(home, "shim")


def socket_path() -> str:
    return os.path.join(state_dir(), "agent.sock")


def encode(message: dict[str, Any]) -> bytes:
    body = marshal.dumps(message)
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def decode_length(header: bytes) -> int:
    length = int.from_bytes(header, "big")
    if length > MAX_MESSAGE:
        raise ValueError(f"message of {length} bytes is too large")
    return length


def decode(body: bytes) -> dict[str, Any]:
    """A message's body; raises ValueError if it is not one."""
    try:
        message = marshal.loads(body)
    except (EOFError, TypeError) as error:
        raise ValueError(f"unreadable message: {error}") from None
    if not isinstance(message, dict):
        raise ValueError("a message must be a dict")
    return message


def _receive_exactly(sock: _socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def call(message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to the agent; raises OSError if it cannot be reached."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path())
        sock.sendall(encode(message))
        length = decode_length(_receive_exactly(sock, HEADER_SIZE))
        return decode(_receive_exactly(sock, length))
    finally:
        sock.close()
