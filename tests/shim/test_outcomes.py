"""The agent's memory of outcomes (shim/remote.py OutcomeMemory): bounded by
REAPI_CC_MEMORY, and a rebuild after `make clean` served from it without the
server, against the real server and make."""

from __future__ import annotations

import os
import time
from pathlib import Path

from reapi.core.digests import DigestFunction
from shim.remote import Outcome, OutcomeMemory
from tests.helpers import ServerProcess
from tests.shim.compiles import stats
from tests.shim.test_reapi_cc_remote import make, objects, write_project

SHA256 = DigestFunction.SHA256


def outcome(size: int) -> Outcome:
    return Outcome(0, [("a.o", b"x" * size, False)], b"", b"")


def test_memory_is_bounded_by_its_limit_least_recently_used_first() -> None:
    memory = OutcomeMemory(limit=1000)
    actions = [SHA256.digest_of(b"%d" % n) for n in range(5)]
    for action in actions[:4]:
        memory.put(action, outcome(240))
    assert memory.get(actions[0]) is not None  # used: kept
    memory.put(actions[4], outcome(240))  # 1200 > 1000: the oldest unused goes
    assert memory.get(actions[1]) is None
    assert all(memory.get(a) is not None for a in (actions[0], actions[2], actions[3], actions[4]))
    memory.put(actions[1], outcome(300))  # more than a quarter of the whole: not kept
    assert memory.get(actions[1]) is None
    assert OutcomeMemory(limit=0).get(actions[0]) is None


def test_a_rebuild_comes_from_memory_without_the_server(tmp_path: Path, reapi_home: Path) -> None:
    server = ServerProcess(tmp_path / "storage", workers=1)
    env = dict(os.environ, REAPI_SERVER=f"grpc://{server.address}", REAPI_HOME=str(reapi_home))
    env["CC"] = "reapi-cc gcc"
    project = write_project(tmp_path / "project")
    reference = write_project(tmp_path / "reference")
    time.sleep(2.1)  # (direct mode trusts no file changed in the last 2 s)
    plain = {k: v for k, v in env.items() if k != "CC"} | {"CC": "gcc"}
    make(reference, plain)
    make(project, env)
    assert objects(project) == objects(reference)
    make(project, env, "clean")
    server.stop()  # gone: only the agent's memory can serve the rebuild
    before = stats(env)
    make(project, env)
    after = stats(env)
    assert objects(project) == objects(reference)
    assert after["direct_hits"] - before["direct_hits"] == 3, after
    assert after["local_fallbacks"] - before["local_fallbacks"] == 1, after  # the link


def test_memory_setting() -> None:
    from shim.agent import _memory
    from shim.remote import OUTCOME_MEMORY

    assert _memory({}) == OUTCOME_MEMORY
    assert _memory({"REAPI_CC_MEMORY": "0"}) == 0
    assert _memory({"REAPI_CC_MEMORY": "64M"}) == 64 << 20
    assert _memory({"REAPI_CC_MEMORY": "lots"}) == OUTCOME_MEMORY  # (a warning in the log)


class FakeWorkers:
    """The server's Workers service, as a hostile or an older server answers."""

    def __init__(self, answer: list[str] | None) -> None:
        self.answer = answer
        self.asked = 0

    async def GetProvided(self, request: object, timeout: float, metadata: object) -> object:
        import grpc

        from reapi.protos import worker_pb2

        self.asked += 1
        if self.answer is None:

            class Unimplemented(grpc.aio.AioRpcError):
                def __init__(self) -> None:
                    pass

                def code(self) -> grpc.StatusCode:
                    return grpc.StatusCode.UNIMPLEMENTED

            raise Unimplemented()
        return worker_pb2.Provided(directories=self.answer)


async def test_what_the_server_says_workers_provide_is_checked_and_kept() -> None:
    """A directory no worker could provide (relative, /, the sandbox's own)
    is dropped, not trusted: the agent would leave project files out. An
    older server, which does not know the call, means the system's."""
    from reapi.core.conventions import PROVIDED_DIRS
    from shim.remote import PROVIDED_SECONDS, Server

    now = [0.0]
    server = Server("grpc://127.0.0.1:1", clock=lambda: now[0])
    workers = FakeWorkers(["relative", "/", "/build/x", "/tmp", "/opt/tc", "/usr"])
    server._workers = workers
    assert await server.provided() == ("/opt/tc", "/usr")
    assert await server.provided() == ("/opt/tc", "/usr") and workers.asked == 1
    now[0] += PROVIDED_SECONDS
    workers.answer = None
    assert await server.provided() == PROVIDED_DIRS
    assert workers.asked == 2
    await server.channel.close()
