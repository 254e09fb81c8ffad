"""The client-agent protocol: length-prefixed JSON over a Unix socket.

Standard library only: `reapi-cc` imports this on every compile.

    request  {"op": "compile", "cwd": ..., "argv": [compiler, args...], "env": {...}}
             {"op": "stats"} | {"op": "zero-stats"}
    reply    {"do": "local", "reason": ...}
             {"do": "exit", "code": N, "stdout": base64, "stderr": base64}
             {"stats": {...}}
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

HEADER = struct.Struct("!I")
# The counters of `reapi-cc --stats`, besides `local_reasons` (reason -> count).
STAT_KEYS = (
    "invocations",
    "cache_hits",
    "remote_executions",
    "local_fallbacks",
    "bytes_uploaded",
    "bytes_downloaded",
    "scan_fallbacks",  # `scan` mode compiles that used `deps` (scan_fallback_reasons)
)
MAX_MESSAGE = 64 * 1024 * 1024


def state_dir() -> Path:
    """$REAPI_HOME/shim: the agent's socket, lock, log and statistics."""
    home = os.environ.get("REAPI_HOME") or os.path.join(Path.home(), ".cache", "reapi")
    return Path(home) / "shim"


def socket_path() -> Path:
    return state_dir() / "agent.sock"


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return HEADER.pack(len(body)) + body


def decode_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise ValueError(f"message of {length} bytes is too large")
    return int(length)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
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
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path()))
        sock.sendall(encode(message))
        length = decode_length(_receive_exactly(sock, HEADER.size))
        reply: dict[str, Any] = json.loads(_receive_exactly(sock, length))
        return reply
