"""Thousands of idle clients against the real server held to 1,024 open files: silent
sockets, idle gRPC connections and half-finished uploads are closed after their time
limits, and a normal client is still served."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import time
from collections.abc import AsyncIterator

import grpc

from reapi.protos import bytestream_pb2
from reapi.protos import bytestream_pb2_grpc as bs_grpc
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.actions import SHA256
from tests.helpers import ServerProcess

SILENT_SOCKETS = 1500
STALLED_UPLOADS = 200
IDLE_CHANNELS = 300
IDLE_TIMEOUT = 3.0


def _raise_own_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def _silent_sockets(port: int, count: int) -> list[socket.socket]:
    """TCP connections that never say a word (connected without waiting)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed it (what it sent before, its HTTP/2 settings, is read)."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False  # still open, nothing more to read
    except OSError:
        return True  # reset
    return True


async def _stalled_upload(address: str, number: int, stall: asyncio.Event) -> str:
    """Sends the first chunk of an upload, then nothing: what the server says."""
    data = b"%08d" % number * 100_000
    digest = SHA256.digest_of(data)
    name = f"uploads/00000000-0000-4000-8000-{number:012d}/blobs/{digest.hash}/{digest.size}"

    async def chunks() -> AsyncIterator[bytestream_pb2.WriteRequest]:
        yield bytestream_pb2.WriteRequest(resource_name=name, data=data[:65536])
        await stall.wait()

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await bs_grpc.ByteStreamStub(channel).Write(chunks(), timeout=60)
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
    return "OK"


async def test_idle_clients_do_not_lock_out_a_normal_one(tmp_path: object) -> None:
    _raise_own_file_limit(SILENT_SOCKETS + STALLED_UPLOADS + IDLE_CHANNELS + 1000)
    server = ServerProcess(
        tmp_path / "storage",  # type: ignore[operator]
        "--idle-timeout",
        str(IDLE_TIMEOUT),
    )
    stall = asyncio.Event()
    idle_channels: list[grpc.aio.Channel] = []
    sockets: list[socket.socket] = []
    try:
        subprocess.run(["prlimit", f"--pid={server.process.pid}", "--nofile=1024:1024"], check=True)
        # Idle gRPC clients: one call each, then nothing.
        for _ in range(IDLE_CHANNELS):
            channel = grpc.aio.insecure_channel(server.address)
            idle_channels.append(channel)
            await re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(), timeout=30
            )
        uploads = [
            asyncio.create_task(_stalled_upload(server.address, n, stall))
            for n in range(STALLED_UPLOADS)
        ]
        sockets = _silent_sockets(server.port, SILENT_SOCKETS)
        await asyncio.sleep(1)

        # A normal client is served, though more than 1,024 connections were opened.
        started = time.monotonic()
        async with grpc.aio.insecure_channel(server.address) as channel:
            data = b"a normal client's blob"
            digest = SHA256.digest_of(data)
            cas = re_grpc.ContentAddressableStorageStub(channel)
            reply = await cas.BatchUpdateBlobs(
                re_pb2.BatchUpdateBlobsRequest(
                    requests=[
                        re_pb2.BatchUpdateBlobsRequest.Request(digest=digest.to_proto(), data=data)
                    ]
                ),
                timeout=90,
                wait_for_ready=True,
            )
            assert reply.responses[0].status.code == 0
            read = await cas.BatchReadBlobs(
                re_pb2.BatchReadBlobsRequest(digests=[digest.to_proto()]), timeout=30
            )
            assert read.responses[0].data == data
        waited = time.monotonic() - started

        # The stalled uploads were ended by the server, not by their own deadline.
        said = set(await asyncio.gather(*uploads))
        assert said == {
            f"DEADLINE_EXCEEDED: the write stream sent nothing for {IDLE_TIMEOUT:g}s; "
            "the upload was dropped"
        }, said
        # The silent sockets the server accepted are closed by it once their
        # handshake time is up (reapi/frontend/server.py HANDSHAKE_TIMEOUT).
        closed = 0
        for _ in range(30):
            closed = sum(_closed_by_peer(sock) for sock in sockets)
            if closed == len(sockets):
                break
            await asyncio.sleep(1)
        assert closed == len(sockets), f"only {closed} silent sockets were closed"
        assert server.process.poll() is None, server.log()
    finally:
        stall.set()
        for sock in sockets:
            sock.close()
        for channel in idle_channels:
            with contextlib.suppress(Exception):
                await channel.close()
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log
    # The limit was really reached (gRPC says so, and retries its accept).
    assert "File descriptor limit reached" in log, log
    print(f"normal client served after {waited:.1f}s; {closed} silent sockets closed by the server")
