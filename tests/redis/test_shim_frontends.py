"""reapi-cc against frontends that share Redis: a make build of a real project
(zlib, from Debian) through frontend a, then `make clean` and a rebuild with a
fresh agent through frontend b: every compile a cache hit, every object the
bytes plain gcc gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import ServerProcess
from tests.redis_servers import RedisDeployment
from tests.shim.test_real_projects import (
    debian_source,
    objects,
    run,
    shim_env_for,
    stats,
    stop_agents,
)


@pytest.mark.slow
def test_a_make_build_on_one_frontend_is_cached_for_the_other(
    tmp_path: Path, redis_cluster: RedisDeployment
) -> None:
    redis_cluster.emptied()
    source = debian_source("zlib")
    plain = shutil.copytree(source, tmp_path / "plain")
    run(["./configure"], plain)
    run(["make", "-j2", "libz.a"], plain)
    expected = objects(plain)
    a = ServerProcess(tmp_path / "a", workers=2, redis=redis_cluster.urls)
    b = ServerProcess(tmp_path / "b", workers=0, redis=redis_cluster.urls)

    def shim_env(server: ServerProcess, home: str) -> dict[str, str]:
        return shim_env_for(server.address, tmp_path / home)

    tree = shutil.copytree(source, tmp_path / "tree")
    try:
        run(["./configure"], tree, shim_env(a, "home-a"))
        run(["make", "-j2", "libz.a"], tree, shim_env(a, "home-a"))
        assert objects(tree) == expected
        first = stats(shim_env(a, "home-a"))
        assert first["remote_executions"] >= len(expected) - 1, first
        run(["make", "clean"], tree)
        env_b = shim_env(b, "home-b")  # a fresh agent: nothing remembered locally
        run(["make", "-j2", "libz.a"], tree, env_b)
        assert objects(tree) == expected
        second = stats(env_b)
        assert second["cache_hits"] >= len(expected), second
        assert second["remote_executions"] == 0 and not second["local_reasons"], second
    finally:
        for server in (a, b):
            assert server.stop() == 0, server.log()
        stop_agents(tmp_path / "home-a", tmp_path / "home-b")
