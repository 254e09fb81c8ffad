"""`reapi-cc`: the gcc-compatible front end that make builds call.

    reapi-cc COMPILER ARGS...      e.g. make CC="reapi-cc gcc"
    COMPILER ARGS...               through a symlink named like the compiler

    reapi-cc --stats [--json] | --zero-stats

Standard library only, and only modules that cost nothing to import: this
runs once per compile (the installed script, shim/reapi-cc, also skips
`site`). It hands the compile to the per-user agent (shim/agent.py) over a
Unix socket, starting the agent if needed; the agent answers with the
compile's result (a cache hit or a remote run, outputs already written) or
with "local". Whenever the answer is local, or the agent cannot be reached,
the real compiler runs here with the same arguments, streams and exit
status: a build never breaks because of us. REAPI_CC_DISABLE=1 always
compiles locally; REAPI_SERVER names the server (default grpc://127.0.0.1:8980).

For compiles, the installed script prefers the native twin of this module
(shim/native/reapi-cc.c, built by the agent), which behaves the same; this one
serves until it is built, and whenever the native client finds no agent.
"""

from __future__ import annotations

import os
import sys
import time

from shim import protocol

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (7 ms)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

USAGE = 'usage: reapi-cc COMPILER [ARGS...]  (e.g. make CC="reapi-cc gcc")'


def find_compiler(name: str, exclude: str | None) -> str | None:
    """The compiler called `name`: a path as given, else the first one on PATH
    that is not this program (a masquerade symlink must not find itself)."""
    if os.sep in name:
        return name
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        if exclude is not None and os.path.realpath(candidate) == exclude:
            continue
        return candidate
    return None


def compiler_command(argv: Sequence[str]) -> list[str] | str:
    """The command to run for `argv` (as sys.argv), or a one-line error."""
    me = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else None
    invoked = os.path.basename(argv[0]) if argv else "reapi-cc"
    if invoked.startswith("reapi-cc"):
        args = list(argv[1:])
        if not args or args[0].startswith("-"):
            return USAGE
        name, rest = args[0], args[1:]
    else:  # masquerading as the compiler itself
        name, rest = invoked, list(argv[1:])
    compiler = find_compiler(name, exclude=me)
    if compiler is None:
        return f"reapi-cc: compiler {name!r} not found on PATH"
    return [compiler, *rest]


# How long a compile may take on the agent's side (it falls back itself before).
COMPILE_TIMEOUT = 3600.0
AGENT_START_WAIT = 5.0


def start_agent() -> None:
    import subprocess  # only here: it is slow to import, and agents start rarely

    directory = protocol.state_dir()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "agent.log"), "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "shim.agent"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def ask_agent(request: bytes, timeout: float) -> dict[str, Any] | None:
    """The agent's reply, starting the agent if it is not running; None when
    it cannot be reached (the caller then compiles locally)."""
    try:
        return protocol.call(request, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        start_agent()
    except (OSError, ValueError):
        return None
    deadline = time.monotonic() + AGENT_START_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            return protocol.call(request, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            continue
        except (OSError, ValueError):
            return None
    return None


def show_stats(arguments: Sequence[str]) -> int:
    op = "zero-stats" if arguments[0] == "--zero-stats" else "stats"
    reply = ask_agent(protocol.frame(op.encode() + b"\0"), timeout=10)
    if reply is None:
        print("reapi-cc: the agent is not reachable", file=sys.stderr)
        return 1
    stats = reply["stats"]
    if "--json" in arguments:
        import json

        print(json.dumps(stats, indent=1, sort_keys=True))
    elif op == "stats":
        for key in protocol.STAT_KEYS:
            print(f"{key.replace('_', ' '):<20} {stats.get(key, 0)}")
        tables = (
            ("local", "local_reasons"),
            ("scan", "scan_fallback_reasons"),
            ("preprocessed", "preprocessed_reasons"),
        )
        for kind, reasons in tables:
            for reason, count in sorted(stats.get(reasons, {}).items()):
                print(f"  {kind}: {reason:<24} {count}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] in (["--stats"], ["--zero-stats"]):
        return show_stats(argv[1:])
    command = compiler_command(argv)
    if isinstance(command, str):
        print(command, file=sys.stderr)
        return 2
    if os.environ.get("REAPI_CC_DISABLE") != "1":
        request = protocol.compile_request(os.getcwd(), command, os.environb)
        reply = ask_agent(request, COMPILE_TIMEOUT)
        if reply is not None and reply.get("do") == "exit":
            sys.stdout.buffer.write(reply["stdout"])
            sys.stderr.buffer.write(reply["stderr"])
            sys.stdout.flush()
            sys.stderr.flush()
            return int(reply["code"])
    # exec: the compiler inherits our pid, streams, signals and exit status.
    os.execv(command[0], command)
    return 127  # not reached
