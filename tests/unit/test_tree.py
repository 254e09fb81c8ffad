"""Reading input trees (cas/tree.py), with and without directories at hand;
a worker's output blobs, sent with its result or uploaded first; the server
storing the ones sent with the result."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from google.rpc import code_pb2

from cas.memory import MemoryStore
from cas.merkle import build_tree
from cas.store import put_blob
from cas.tree import read_tree
from executor.outputs import OutputCollector
from executor.scheduler import Scheduler
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import ReapiError, ResourceExhausted
from reapi.frontend.services.workers import WorkersService
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import worker_pb2

SHA256 = DigestFunction.SHA256


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[Digest] = []

    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        self.asked.extend(digests)
        return await super().get_many(digests)


def nested_tree() -> tuple[Digest, dict[Digest, bytes]]:
    source = SHA256.digest_of(b"int x;\n")
    files = {"main.c": (source, False), "include/a.h": (source, False), "x/y/z.h": (source, False)}
    return build_tree(files, SHA256)


async def test_directories_at_hand_are_not_read_from_the_cas() -> None:
    root, directories = nested_tree()
    store = CountingStore()
    tree = await read_tree(store, root, at_hand=directories)
    assert store.asked == [] and tree.missing == []
    assert set(tree.directories) == set(tree.blobs) == set(directories)
    assert tree.blobs == directories


async def test_only_what_is_not_at_hand_is_read() -> None:
    root, directories = nested_tree()
    store = CountingStore()
    for digest, data in directories.items():
        await put_blob(store, digest, data)
    at_hand = {root: directories[root]}
    tree = await read_tree(store, root, at_hand=at_hand)
    assert root not in store.asked and len(store.asked) == len(directories) - 1
    assert tree.missing == [] and tree.blobs == directories


async def test_missing_everywhere_is_reported() -> None:
    root, directories = nested_tree()
    without_root = {d: b for d, b in directories.items() if d != root}
    tree = await read_tree(CountingStore(), root, at_hand=without_root)
    assert tree.missing == [root] and tree.directories == {}


async def test_outputs_beyond_the_room_in_finished_are_uploaded(tmp_path: Path) -> None:
    small, large = b"s" * 10, b"L" * 20
    for room, kept_expected, uploaded in ((0, [], [small, large]), (15, [small], [large])):
        store = MemoryStore()
        collector = OutputCollector(tmp_path, "", SHA256)
        (tmp_path / "large").write_bytes(large)
        (tmp_path / "small").write_bytes(small)
        digests = [collector.add_file(tmp_path / "large"), collector.add_file(tmp_path / "small")]
        assert await collector.upload(store, room) == kept_expected
        assert sorted((await store.get_many(digests)).values()) == sorted(uploaded)


class FullStore(MemoryStore):
    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        return [ResourceExhausted("disk full") for _ in blobs]


async def test_outputs_the_server_cannot_store_fail_the_action() -> None:
    """A result naming blobs the CAS does not hold must never be recorded."""
    scheduler = Scheduler()
    action = re_pb2.Action()
    digest = SHA256.digest_of(action.SerializeToString())
    worker = await scheduler.connect("w", frozenset(), 1)
    job = await scheduler.submit(digest, action, re_pb2.Command(), "", frozenset())
    assert await scheduler.next_job(worker) is job
    output = b"an object file"
    finished = worker_pb2.Finished(lease_id=job.lease_id, output_blobs=[output])
    output_digest = SHA256.digest_of(output)
    finished.response.result.output_files.add(path="a.o", digest=output_digest.to_proto())

    store = MemoryStore()
    stored = await WorkersService(scheduler, store)._store_outputs(worker, finished)
    assert stored.status.code == code_pb2.OK and stored.result.output_files[0].path == "a.o"
    assert list((await store.get_many([output_digest])).values()) == [output]

    failed = await WorkersService(scheduler, FullStore())._store_outputs(worker, finished)
    assert failed.status.code == code_pb2.INTERNAL and "disk full" in failed.status.message
    assert not failed.HasField("result")


def test_empty_directories_are_made() -> None:
    """An include directory with nothing read in it is there all the same
    (gcc warns about a missing one when asked: -Wmissing-include-dirs)."""
    file = SHA256.digest_of(b"x")
    root, blobs = build_tree({"a/x.h": (file, False)}, SHA256, ["a", "b/c", "b/d"])
    top = re_pb2.Directory.FromString(blobs[root])
    assert [d.name for d in top.directories] == ["a", "b"]
    b = re_pb2.Directory.FromString(blobs[Digest.from_proto(SHA256, top.directories[1].digest)])
    assert [d.name for d in b.directories] == ["c", "d"] and not b.files
    assert (
        build_tree({"a/x.h": (file, False)}, SHA256, ["a"])[0]
        == build_tree({"a/x.h": (file, False)}, SHA256)[0]
    )
    with pytest.raises(ValueError, match="not a clean relative path"):
        build_tree({}, SHA256, ["../up"])
