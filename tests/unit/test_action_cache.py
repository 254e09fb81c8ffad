"""ActionCache logic on in-memory fakes (and the disk store): completeness, what
gets stored, and instances kept apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from cas.action_cache import (
    ActionCache,
    DiskActionResultStore,
    MemoryActionResultStore,
    instance_roots,
)
from cas.memory import MemoryStore
from cas.store import put_blob
from reapi.core.digests import DigestFunction
from reapi.core.errors import InvalidArgument, NotFound
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


@pytest.mark.parametrize("store", ["memory", "disk"])
async def test_instances_have_action_caches_of_their_own(store: str, tmp_path: Path) -> None:
    cas = MemoryStore()
    results = MemoryActionResultStore() if store == "memory" else DiskActionResultStore(tmp_path)
    cache = ActionCache(results, cas)
    action = DigestFunction.SHA256.digest_of(b"an action")
    for instance, code in (("", 0), ("team-a", 1), ("team/b", 2), ("@c", 3)):
        await cache.put(action, re_pb2.ActionResult(exit_code=code), instance)
    for instance, code in (("", 0), ("team-a", 1), ("team/b", 2), ("@c", 3)):
        assert (await cache.get(action, instance_name=instance)).exit_code == code
    with pytest.raises(NotFound):
        await cache.get(action, instance_name="team-c")
    if store == "disk":
        assert sorted(name for name, _root in instance_roots(tmp_path / "ac")) == [
            "", "@c", "team-a", "team/b",
        ]  # fmt: skip


async def test_an_instance_name_too_long_for_a_directory_is_invalid(tmp_path: Path) -> None:
    cache = ActionCache(DiskActionResultStore(tmp_path), MemoryStore())
    action = DigestFunction.SHA256.digest_of(b"an action")
    for name in ("é" * 40, "x" * 300):
        with pytest.raises(InvalidArgument, match="is too long"):
            await cache.put(action, re_pb2.ActionResult(), name)
    await cache.put(action, re_pb2.ActionResult(exit_code=7), "é" * 30)  # 181 bytes encoded
    assert (await cache.get(action, instance_name="é" * 30)).exit_code == 7
