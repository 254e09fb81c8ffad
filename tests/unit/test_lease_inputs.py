"""What a lease carries of its action's inputs (reapi/frontend/services/workers.py add_inputs)."""

from __future__ import annotations

from collections.abc import Sequence

from cas.memory import MemoryStore
from cas.store import put_blob
from executor.scheduler import Job, WorkerHandle
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import Internal
from reapi.frontend.services.workers import LEASE_FILE_BYTES, LEASE_INPUT_BYTES, add_inputs
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import worker_pb2

SHA256 = DigestFunction.SHA256


def job(directories: list[bytes], files: list[Digest]) -> Job:
    return Job(
        name="operations/x",
        action_digest=SHA256.digest_of(b"action"),
        action=re_pb2.Action(),
        command=re_pb2.Command(arguments=["cc"]),
        instance_name="",
        requirements=frozenset(),
        priority=0,
        cacheable=True,
        input_directories=directories,
        input_files=files,
    )


async def stored(store: MemoryStore, data: bytes) -> Digest:
    digest = SHA256.digest_of(data)
    await put_blob(store, digest, data)
    return digest


async def lease(store: MemoryStore, of: Job, worker: WorkerHandle) -> worker_pb2.Assign:
    assign = worker_pb2.Assign()
    await add_inputs(store, assign, of, worker)
    return assign


async def test_small_files_go_once_to_each_worker() -> None:
    store = MemoryStore()
    source = await stored(store, b"int main(void) { return 0; }\n")
    header = await stored(store, b"#define H 1\n")
    large = await stored(store, b"x" * (LEASE_FILE_BYTES + 1))
    empty = await stored(store, b"")
    absent = SHA256.digest_of(b"gone from the CAS since the action was checked")
    first, second = WorkerHandle("a", frozenset(), 1), WorkerHandle("b", frozenset(), 1)

    assign = await lease(store, job([], [source, header, large, empty, absent]), first)
    assert sorted(assign.input_files) == sorted(
        [b"int main(void) { return 0; }\n", b"#define H 1\n"]
    )

    other = await stored(store, b"int other;\n")
    assign = await lease(store, job([], [other, header]), first)
    assert list(assign.input_files) == [b"int other;\n"]  # the header went with the first lease
    assign = await lease(store, job([], [other, header]), second)
    assert sorted(assign.input_files) == [b"#define H 1\n", b"int other;\n"]


async def test_a_lease_stays_small_whatever_the_tree() -> None:
    """Directories and files together stay within LEASE_INPUT_BYTES; a
    directory too large for what is left stays out, and smaller ones still go."""
    store = MemoryStore()
    small, huge = b"\n\x01a", b"d" * (LEASE_INPUT_BYTES + 1)
    files = [await stored(store, bytes([n]) * (LEASE_FILE_BYTES - 100)) for n in range(12)]
    assign = await lease(store, job([small, huge, small], files), WorkerHandle("w", frozenset(), 1))
    assert list(assign.input_directories) == [small, small]
    sent = sum(map(len, assign.input_directories)) + sum(map(len, assign.input_files))
    assert LEASE_INPUT_BYTES - LEASE_FILE_BYTES < sent <= LEASE_INPUT_BYTES
    assert 0 < len(assign.input_files) < len(files)


class UnreadableStore(MemoryStore):
    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        raise Internal("disk read error")


async def test_a_store_that_cannot_read_sends_the_lease_without_files() -> None:
    """The worker then asks the CAS itself and gets the error there."""
    store = UnreadableStore()
    source = SHA256.digest_of(b"int x;\n")
    assign = await lease(store, job([b"\n\x01a"], [source]), WorkerHandle("w", frozenset(), 1))
    assert list(assign.input_directories) == [b"\n\x01a"] and not assign.input_files
