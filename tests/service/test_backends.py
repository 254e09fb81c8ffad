"""The server is wired to whatever backends it is given (reapi/frontend/server.py's
composition root): here memory ones, so nothing reaches the disk."""

from __future__ import annotations

from pathlib import Path

import grpc

from cas.action_cache import MemoryActionResultStore
from cas.memory import MemoryStore
from cas.store import get_blob
from reapi.core.digests import DigestFunction
from reapi.frontend.server import Backends, Server, ServerConfig
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.service.test_cas_service import upload

SHA256 = DigestFunction.SHA256


async def test_the_services_use_the_backends_they_are_given(tmp_path: Path) -> None:
    store, results = MemoryStore(), MemoryActionResultStore()
    config = ServerConfig(listen="127.0.0.1:0", storage=tmp_path / "unused")
    server = Server(config, Backends(store, results))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            (output,) = await upload(channel, b"an object file")
            assert await get_blob(store, output) == b"an object file"
            action = SHA256.digest_of(b"an action").to_proto()
            result = re_pb2.ActionResult(
                output_files=[re_pb2.OutputFile(path="a.o", digest=output.to_proto())]
            )
            stub = re_grpc.ActionCacheStub(channel)
            request = re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
            await stub.UpdateActionResult(request)
            got = await stub.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
            assert got.output_files[0].digest == output.to_proto()
    finally:
        await server.stop(grace=1)
    assert not config.storage.exists()
