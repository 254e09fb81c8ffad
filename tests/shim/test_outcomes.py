"""The agent's memory of outcomes (shim/remote.py OutcomeMemory): bounded by
REAPI_CC_MEMORY, and a rebuild after `make clean` served from it without the
server, against the real server and make."""

from __future__ import annotations

import os
import time
from pathlib import Path

from reapi.digests import DigestFunction
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
