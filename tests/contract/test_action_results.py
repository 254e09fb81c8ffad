"""The contract every ActionResultStore keeps (cas/action_cache.py): entries
by (instance name, action digest), replaced by a later put, instances and
digest functions kept apart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cas.action_cache import ActionResultStore, DiskActionResultStore, MemoryActionResultStore
from cas.redis_store import RedisActionResultStore
from reapi.core.digests import Digest, DigestFunction
from tests.redis_servers import RedisDeployment, client_of

SHA256, BLAKE3 = DigestFunction.SHA256, DigestFunction.BLAKE3


@pytest.fixture(params=["memory", "disk", "redis-standalone", "redis-cluster"])
async def results(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ActionResultStore]:
    if request.param == "memory":
        yield MemoryActionResultStore()
    elif request.param == "disk":
        yield DiskActionResultStore(tmp_path)
    else:
        deployment: RedisDeployment = request.getfixturevalue(request.param.replace("-", "_"))
        deployment.emptied()
        client = await client_of(deployment)
        yield RedisActionResultStore(client)
        await client.aclose()


async def test_put_get_replace(results: ActionResultStore) -> None:
    action = SHA256.digest_of(b"action")
    assert await results.get(action) is None
    await results.put(action, b"first")
    assert await results.get(action) == b"first"
    await results.put(action, b"second")
    assert await results.get(action) == b"second"


async def test_instances_are_apart(results: ActionResultStore) -> None:
    action = SHA256.digest_of(b"action")
    names = ["", "team-a", "team/b", "@c", "a:sha256", "é"]
    for n, name in enumerate(names):
        await results.put(action, bytes([n]), name)
    for n, name in enumerate(names):
        assert await results.get(action, name) == bytes([n])
    assert await results.get(action, "team-c") is None


async def test_functions_and_sizes_are_apart(results: ActionResultStore) -> None:
    sha = SHA256.digest_of(b"action")
    await results.put(sha, b"sha")
    assert await results.get(Digest(BLAKE3, sha.hash, sha.size)) is None
    assert await results.get(Digest(SHA256, sha.hash, sha.size + 1)) is None
