from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ServerProcess


@pytest.fixture
def shim_env(tmp_path: Path, reapi_home: Path) -> Iterator[dict[str, str]]:
    server = ServerProcess(tmp_path / "storage", workers=1)
    env = dict(os.environ, REAPI_SERVER=f"grpc://{server.address}", REAPI_HOME=str(reapi_home))
    env["CC"] = f"{shutil.which('reapi-cc')} gcc"
    yield env
    server.stop()  # (the agent is stopped by the reapi_home fixture)
