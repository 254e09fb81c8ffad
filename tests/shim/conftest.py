from __future__ import annotations

import contextlib
import os
import shutil
import signal
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
    pid_file = reapi_home / "shim" / "agent.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
    server.stop()
