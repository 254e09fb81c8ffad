"""reapi-cc against frontends that share Redis: a make build of a real project
(zlib, from Debian) through frontend a, then `make clean` and a rebuild with a
fresh agent through frontend b: every compile a cache hit, every object the
bytes plain gcc gives."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ServerProcess
from tests.redis_servers import RedisDeployment
from tests.shim.test_real_projects import debian_source, objects, run, stats


@pytest.mark.slow
def test_a_make_build_on_one_frontend_is_cached_for_the_other(
    tmp_path: Path, redis_cluster: RedisDeployment
) -> None:
    redis_cluster.wait_healthy()
    redis_cluster.flush()
    source = debian_source("zlib")
    plain = shutil.copytree(source, tmp_path / "plain")
    run(["./configure"], plain)
    run(["make", "-j2", "libz.a"], plain)
    expected = objects(plain)
    a = ServerProcess(tmp_path / "a", workers=2, redis=redis_cluster.urls)
    b = ServerProcess(tmp_path / "b", workers=0, redis=redis_cluster.urls)
    shim = f"{shutil.which('reapi-cc')} gcc"

    def shim_env(server: ServerProcess, home: str) -> dict[str, str]:
        return dict(os.environ, REAPI_SERVER=f"grpc://{server.address}",
                    REAPI_HOME=str(tmp_path / home), CC=shim)  # fmt: skip

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
        for home in ("home-a", "home-b"):
            pid_file = tmp_path / home / "shim" / "agent.pid"
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], check=False)
