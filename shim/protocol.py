"""The client-agent protocol: length-prefixed messages over a Unix socket.

Two clients speak it: `reapi-cc` in Python (shim/client.py) and its native
twin (shim/native/reapi-cc.c), so it is a format a C program writes and reads
without a library, and Python with nothing that is slow to import. Both ends
are the same user's processes: the socket (in a per-user directory) is the
trust boundary.

Each message is a 4-byte big-endian length, then the body:

    request  OP NUL [CWD NUL ARGC NUL ARG NUL ... NAME=VALUE NUL ...]
             OP is "compile" (with the rest: the working directory, the
             command as [compiler, args...], then the whole environment),
             "stats" or "zero-stats"
    reply    "L" REASON                              compile locally
             "X" CODE STDOUT-SIZE STDOUT STDERR      the compile's result
             "S" JSON                                the statistics

CODE (signed) and STDOUT-SIZE are 4 bytes, big-endian.
"""

from __future__ import annotations

import _socket
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (7 ms)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
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
    "preprocessed_here",  # compiles sent preprocessed, the only exact way (preprocessed_reasons)
)
MAX_MESSAGE = 64 * 1024 * 1024
OPS = ("compile", "stats", "zero-stats")


def state_dir() -> str:
    """$REAPI_HOME/shim: the agent's socket, lock, log and statistics."""
    home = os.environ.get("REAPI_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "reapi")
    return os.path.join(home, "shim")


def socket_path() -> str:
    return os.path.join(state_dir(), "agent.sock")


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def decode_length(header: bytes) -> int:
    length = int.from_bytes(header, "big")
    if length > MAX_MESSAGE:
        raise ValueError(f"message of {length} bytes is too large")
    return length


def compile_request(cwd: str, argv: Sequence[str], environ: Mapping[bytes, bytes]) -> bytes:
    fields = [b"compile", os.fsencode(cwd), b"%d" % len(argv), *map(os.fsencode, argv)]
    fields += [name + b"=" + value for name, value in environ.items()]
    return frame(b"\0".join(fields) + b"\0")


def parse_request(body: bytes) -> dict[str, Any]:
    """{"op": ...}, with "cwd", "argv" and "env" for a compile; raises
    ValueError if `body` is not a request."""
    if not body.endswith(b"\0"):
        raise ValueError("a request must end with NUL")
    op, *fields = [os.fsdecode(field) for field in body[:-1].split(b"\0")]
    if op not in OPS:
        raise ValueError(f"unknown request {op[:40]!r}")
    if op != "compile":
        return {"op": op}
    if len(fields) < 2 or not fields[1].isdigit() or len(fields) < 2 + int(fields[1]):
        raise ValueError("a compile request needs a directory and a command")
    count = int(fields[1])
    argv, entries = fields[2 : 2 + count], fields[2 + count :]
    if not argv or not all("=" in entry for entry in entries):
        raise ValueError("a compile request needs a command and NAME=VALUE entries")
    env = dict(entry.split("=", 1) for entry in entries)
    return {"op": op, "cwd": fields[0], "argv": argv, "env": env}


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    if "stats" in reply:
        import json

        return frame(b"S" + json.dumps(reply["stats"]).encode())
    if reply["do"] == "local":
        return frame(b"L" + reply["reason"].encode())
    stdout: bytes = reply["stdout"]
    code = reply["code"].to_bytes(4, "big", signed=True)
    return frame(b"X" + code + len(stdout).to_bytes(4, "big") + stdout + reply["stderr"])


def parse_reply(body: bytes) -> dict[str, Any]:
    """The reply as a dict ({"do": "local"|"exit", ...} or {"stats": ...});
    raises ValueError if it is not one."""
    kind, rest = body[:1], body[1:]
    if kind == b"L":
        return {"do": "local", "reason": rest.decode(errors="replace")}
    if kind == b"X" and len(rest) >= 8:
        size = int.from_bytes(rest[4:8], "big")
        if 8 + size <= len(rest):
            return {
                "do": "exit",
                "code": int.from_bytes(rest[:4], "big", signed=True),
                "stdout": rest[8 : 8 + size],
                "stderr": rest[8 + size :],
            }
    if kind == b"S":
        import json

        return {"stats": json.loads(rest)}
    raise ValueError("unreadable reply from the agent")


def _receive_exactly(sock: _socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def call(request: bytes, timeout: float) -> dict[str, Any]:
    """Send a framed request to the agent and parse its reply; raises OSError
    if the agent cannot be reached, ValueError if the reply is unreadable."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path())
        sock.sendall(request)
        length = decode_length(_receive_exactly(sock, HEADER_SIZE))
        return parse_reply(_receive_exactly(sock, length))
    finally:
        sock.close()
