"""reapi-cc against a team's server with TLS and tokens: CI's token (write,
execute) fills the cache; a developer's `read` token gets the hits and
compiles the rest locally; a wrong token compiles everything locally. The
build succeeds every time and its objects are gcc's, byte for byte."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ServerProcess
from tests.pki import make_pki, tls_args
from tests.shim.test_reapi_cc_remote import make, objects, stats, write_project

TOKENS = "ci-secret write,execute\ndev-secret read\n"


@pytest.fixture
def team(tmp_path: Path) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """The server, and what a compile's environment needs to reach it, but the token."""
    pki = make_pki(tmp_path, TOKENS)
    server = ServerProcess(
        tmp_path / "storage",
        *tls_args(pki),
        "--auth-tokens",
        str(pki.files["tokens"]),
        workers=1,
    )
    env = dict(
        os.environ,
        REAPI_SERVER=f"grpcs://localhost:{server.port}",
        REAPI_TLS_CA=str(pki.files["ca.pem"]),
        CC=f"{shutil.which('reapi-cc')} gcc",
    )
    for name in ("ci", "dev", "wrong"):
        (tmp_path / f"{name}.token").write_text(f"# {name}\n{name}-secret\n")
    yield server, env
    server.stop()
    for pid_file in tmp_path.glob("reapi-home/*/shim/agent.pid"):  # each user's agent
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def with_token(env: dict[str, str], home: Path, name: str) -> dict[str, str]:
    """`env` for a user with token `name` and an agent of their own."""
    token = home.parent / f"{name}.token"
    return env | {"REAPI_TOKEN_FILE": str(token), "REAPI_HOME": str(home / name)}


def test_ci_fills_the_cache_developers_read_it(
    tmp_path: Path, team: tuple[ServerProcess, dict[str, str]], reapi_home: Path
) -> None:
    _server, env = team
    reference = write_project(tmp_path / "reference")
    make(reference, {k: v for k, v in env.items() if k != "CC"} | {"CC": "gcc"})
    expected = objects(reference)

    ci = with_token(env, reapi_home, "ci")
    make(write_project(tmp_path / "ci"), ci)
    assert objects(tmp_path / "ci") == expected
    assert stats(ci)["remote_executions"] == 3, stats(ci)

    developer = with_token(env, reapi_home, "dev")
    checkout = write_project(tmp_path / "dev")
    make(checkout, developer)
    assert objects(checkout) == expected
    read = stats(developer)
    assert (read["cache_hits"], read["remote_executions"]) == (3, 0), read
    assert read["local_reasons"] == {"link": 1}, read

    # A change CI has not built: the developer compiles it here, and the build works.
    (checkout / "util.c").write_text('#include "util.h"\nint twice(int x) { return x + x; }\n')
    make(checkout, developer)
    assert stats(developer)["local_reasons"] == {"link": 2, "read-only-miss": 1}
    assert stats(developer)["remote_executions"] == 0

    # A token file or CA that cannot be read, or holds nothing: local, never broken.
    (tmp_path / "empty.token").write_text("# nothing\n")
    for broken in (
        {"REAPI_TOKEN_FILE": str(tmp_path / "absent.token")},
        {"REAPI_TOKEN_FILE": str(tmp_path / "empty.token")},
        {"REAPI_TLS_CA": str(tmp_path / "absent.pem")},
    ):
        mishap = (
            with_token(env, reapi_home, "ci") | broken | {"REAPI_HOME": str(reapi_home / "mishap")}
        )
        elsewhere = write_project(tmp_path / "mishap")
        make(elsewhere, mishap)
        assert objects(elsewhere) == expected
        assert stats(mishap)["remote_executions"] == 0
        shutil.rmtree(elsewhere)

    stranger = with_token(env, reapi_home, "wrong")
    elsewhere = write_project(tmp_path / "stranger")
    make(elsewhere, stranger)
    assert objects(elsewhere) == expected
    refused = stats(stranger)
    assert refused["cache_hits"] == refused["remote_executions"] == 0, refused
    assert refused["local_reasons"] == {"remote-error": 3, "link": 1}, refused
