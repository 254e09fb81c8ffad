"""ActionCache logic on in-memory fakes: completeness and what gets stored."""

from __future__ import annotations

import pytest

from cas.action_cache import ActionCache, MemoryActionResultStore
from cas.memory import MemoryStore
from cas.store import put_blob
from reapi.digests import DigestFunction
from reapi.errors import NotFound
from reapi.protos import remote_execution_pb2 as re_pb2

BLAKE3 = DigestFunction.BLAKE3


async def test_blake3_results_are_checked_against_blake3_blobs() -> None:
    cas, results = MemoryStore(), MemoryActionResultStore()
    cache = ActionCache(results, cas)
    output = BLAKE3.digest_of(b"object code")
    action = BLAKE3.digest_of(b"an action")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="a.o", digest=output.to_proto(), contents=b"x")]
    )
    stored = await cache.put(action, result)
    assert stored.output_files[0].contents == b""
    with pytest.raises(NotFound, match="no longer in the CAS"):
        await cache.get(action)
    # The same bytes under SHA256 do not make the BLAKE3 result complete.
    await put_blob(cas, DigestFunction.SHA256.digest_of(b"object code"), b"object code")
    with pytest.raises(NotFound):
        await cache.get(action)
    await put_blob(cas, output, b"object code")
    found = await cache.get(action, inline_files=["a.o"])
    assert found.output_files[0].contents == b"object code"


async def test_unreadable_entry_is_a_miss() -> None:
    cas, results = MemoryStore(), MemoryActionResultStore()
    action = BLAKE3.digest_of(b"corrupt")
    await results.put(action, b"\xff\xff not a protobuf")
    with pytest.raises(NotFound, match="unreadable"):
        await ActionCache(results, cas).get(action)
