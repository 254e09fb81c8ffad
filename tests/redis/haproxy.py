"""HAProxy (Debian's) as the gRPC load balancer in front of frontends: HTTP/2
in clear text on both sides, each call (an HTTP/2 stream) sent to the next
frontend in turn."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.redis_servers import free_ports, log_tail

CONFIG = """\
global
    maxconn 1000
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
frontend grpc
    bind 127.0.0.1:{port} proto h2
    default_backend frontends
backend frontends
    balance roundrobin
{servers}
"""


@contextlib.contextmanager
def haproxy(workdir: Path, addresses: Sequence[str]) -> Iterator[str]:
    """Run HAProxy in front of `addresses` (HOST:PORT) for the block; yields its address."""
    (port,) = free_ports(1)
    servers = "\n".join(
        f"    server f{n} {address} proto h2 check inter 1s fall 1 rise 1"
        for n, address in enumerate(addresses)
    )
    config = workdir / "haproxy.cfg"
    config.write_text(CONFIG.format(port=port, servers=servers))
    log_path = workdir / "haproxy.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start:\n{log_tail(log_path)}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
