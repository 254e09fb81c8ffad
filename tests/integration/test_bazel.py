"""Real Bazel 4 against a real reapi server: after `bazel clean`, the rebuild comes from the cache.

Needs Debian's Bazel 4 (see bazel_helpers.INSTALL_HINT); without it the test fails, it
never skips.
"""

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, WorkerProcess
from tests.integration.bazel_helpers import (
    Bazel,
    copy_workspace,
    offline_flags,
    process_summary,
    require_bazel,
    sha256_files,
)

TARGETS = "//examples/..."
TEST_TARGET = "//examples:textutil_test"

# Outputs under bazel-bin that must be byte-identical between the cold and the cached build.
OUTPUTS = [
    "examples/fnvsum",  # cc_binary
    "examples/libtextutil.a",  # cc_library archive
    "examples/usage.h",  # genrule output
    "examples/textutil_test",  # cc_test binary
]

CACHE_HIT = "remote cache hit"
# "internal" processes (symlink trees, template expansion, ...) never go to any cache.
NOT_EXECUTED = {CACHE_HIT, "internal"}


@pytest.mark.bazel
def test_rebuild_after_clean_is_served_from_remote_cache(
    reapi_server: ServerProcess, tmp_path: Path
) -> None:
    bazel = Bazel(
        executable=require_bazel(),
        workspace=copy_workspace(tmp_path / "workspace"),
        output_user_root=tmp_path / "bazel_root",
    )
    flags = [
        *offline_flags(repository_cache=tmp_path / "repository_cache"),
        f"--remote_cache=grpc://{reapi_server.address}",
    ]
    bazel_bin = bazel.workspace / "bazel-bin"
    try:
        # `bazel test` builds every target in the pattern, then runs the cc_test.
        cold = bazel.run("test", *flags, TARGETS)
        cold_outputs = sha256_files(bazel_bin, OUTPUTS)
        bazel.run("clean")
        warm = bazel.run("test", *flags, TARGETS)
        warm_outputs = sha256_files(bazel_bin, OUTPUTS)
    finally:
        bazel.shutdown()

    cold_counts = process_summary(cold)
    executed_cold = {kind: n for kind, n in cold_counts.items() if kind not in NOT_EXECUTED}
    assert CACHE_HIT not in cold_counts, f"the server was empty, yet: {cold_counts}"
    assert executed_cold, f"the cold build executed nothing: {cold_counts}"
    assert re.search(rf"^{TEST_TARGET} +PASSED", cold, re.MULTILINE), cold
    assert any(path.is_file() for path in reapi_server.storage.rglob("*")), (
        f"the cold build stored nothing under {reapi_server.storage}"
    )

    warm_counts = process_summary(warm)
    executed_warm = {kind: n for kind, n in warm_counts.items() if kind not in NOT_EXECUTED}
    assert executed_warm == {}, f"the cached build executed processes locally:\n{warm}"
    assert warm_counts.get(CACHE_HIT, 0) == sum(executed_cold.values()), (
        f"cold build {cold_counts}, cached build {warm_counts}"
    )
    # The test result itself came from the cache too.
    assert re.search(rf"^{TEST_TARGET} +\(cached\) PASSED", warm, re.MULTILINE), warm

    assert warm_outputs == cold_outputs
    # The binary came back from the cache and still runs (its executable bit survived).
    fnvsum = subprocess.run(
        [bazel_bin / "examples" / "fnvsum", "a"], capture_output=True, text=True, check=True
    )
    assert fnvsum.stdout == "af63dc4c8601ec8c  a\n"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "INFO: 19 processes: 10 internal, 9 linux-sandbox.\n",
            {"internal": 10, "linux-sandbox": 9},
        ),
        (
            "INFO: 20 processes: 11 remote cache hit, 9 internal.\n",
            {"remote cache hit": 11, "internal": 9},
        ),
        (
            "INFO: 19 processes: 5 remote cache hit, 10 internal, 4 processwrapper-sandbox.\n",
            {"remote cache hit": 5, "internal": 10, "processwrapper-sandbox": 4},
        ),
        ("INFO: 1 process: 1 internal.\n", {"internal": 1}),
        ("INFO: 0 processes.\n", {}),
        (
            # Only the last summary counts.
            "INFO: 2 processes: 2 local.\nINFO: Elapsed time: 1.0s\nINFO: 1 process: 1 internal.\n",
            {"internal": 1},
        ),
    ],
)
def test_process_summary_parses_bazel_4_output(output: str, expected: dict[str, int]) -> None:
    assert process_summary(output) == expected


@pytest.mark.parametrize(
    "output",
    [
        "INFO: Build completed successfully, 19 total actions\n",
        "INFO: 3 processes: 1 internal, 1 linux-sandbox.\n",
    ],
)
def test_process_summary_rejects_missing_or_inconsistent_summaries(output: str) -> None:
    with pytest.raises(ValueError):
        process_summary(output)


@pytest.mark.bazel
def test_remote_execution_matches_a_local_build(tmp_path: Path) -> None:
    """Every action runs on a worker that is a separate process, reaching the server
    over TCP as it would from another machine; the outputs are byte-identical to a
    local build, and after `bazel clean` everything comes from the cache."""
    server = ServerProcess(tmp_path / "storage")  # no local workers
    worker = WorkerProcess(server, "tcp-worker", tmp_path / "worker", slots=2)
    bazel = Bazel(
        executable=require_bazel(),
        workspace=copy_workspace(tmp_path / "workspace"),
        output_user_root=tmp_path / "bazel_root",
    )
    offline = offline_flags(repository_cache=tmp_path / "repository_cache")
    remote = [*offline, f"--remote_executor=grpc://{server.address}"]
    bazel_bin = bazel.workspace / "bazel-bin"
    try:
        local = bazel.run("test", *offline, TARGETS)
        local_outputs = sha256_files(bazel_bin, OUTPUTS)
        bazel.run("clean")
        executed = bazel.run("test", *remote, TARGETS)
        remote_outputs = sha256_files(bazel_bin, OUTPUTS)
        bazel.run("clean")
        cached = bazel.run("test", *remote, TARGETS)
        cached_outputs = sha256_files(bazel_bin, OUTPUTS)
    finally:
        bazel.shutdown()
        worker.stop()
        server.stop()

    local_counts = process_summary(local)
    ran_locally = sum(n for kind, n in local_counts.items() if kind not in NOT_EXECUTED)
    executed_counts = process_summary(executed)
    assert {k: n for k, n in executed_counts.items() if k not in ("remote", "internal")} == {}, (
        f"not every action ran remotely:\n{executed}"
    )
    assert executed_counts["remote"] == ran_locally, (local_counts, executed_counts)
    assert re.search(rf"^{TEST_TARGET} +PASSED", executed, re.MULTILINE), executed
    assert remote_outputs == local_outputs
    assert "running" in worker.log(), "the TCP worker ran nothing"

    cached_counts = process_summary(cached)
    assert {k: n for k, n in cached_counts.items() if k not in NOT_EXECUTED} == {}, cached
    assert cached_counts.get(CACHE_HIT) == ran_locally
    assert cached_outputs == local_outputs


@pytest.mark.bazel
def test_ci_writes_and_developers_read(tmp_path: Path) -> None:
    """The most asked-for setup: one token file, CI's token writes the cache,
    developers' tokens only read it. A developer's build takes CI's results and,
    where it misses, builds locally and still succeeds, storing nothing."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# CI fills the cache\nci-token write\n# developers\ndev-token read\n")
    server = ServerProcess(tmp_path / "storage", "--auth-tokens", str(tokens))
    bazel = Bazel(
        executable=require_bazel(),
        workspace=copy_workspace(tmp_path / "workspace"),
        output_user_root=tmp_path / "bazel_root",
    )
    offline = offline_flags(repository_cache=tmp_path / "repository_cache")
    cache = f"--remote_cache=grpc://{server.address}"
    ci = [*offline, cache, "--remote_header=authorization=Bearer ci-token"]
    dev = [*offline, cache, "--remote_header=authorization=Bearer dev-token"]
    bazel_bin = bazel.workspace / "bazel-bin"
    try:
        filled = bazel.run("test", *ci, TARGETS)
        ci_outputs = sha256_files(bazel_bin, OUTPUTS)
        results_after_ci = _action_results(server)
        bazel.run("clean")
        developer = bazel.run("test", *dev, TARGETS)
        dev_outputs = sha256_files(bazel_bin, OUTPUTS)
        # A change CI has not built: a miss, built locally; the upload is refused.
        source = bazel.workspace / "examples" / "fnvsum.cc"
        source.write_text(source.read_text() + "\n/* a developer's change */\n")
        changed = bazel.run("build", *dev, TARGETS)
        results_after_dev = _action_results(server)
    finally:
        bazel.shutdown()
        server.stop()
    assert results_after_ci, "CI stored no action result"
    ci_counts, dev_counts = process_summary(filled), process_summary(developer)
    assert CACHE_HIT not in ci_counts
    assert {k: n for k, n in dev_counts.items() if k not in NOT_EXECUTED} == {}, developer
    assert dev_counts.get(CACHE_HIT) == sum(
        n for kind, n in ci_counts.items() if kind not in NOT_EXECUTED
    )
    assert dev_outputs == ci_outputs
    changed_counts = process_summary(changed)
    assert sum(n for k, n in changed_counts.items() if k not in NOT_EXECUTED) >= 1, changed
    assert results_after_dev == results_after_ci, "a read token stored action results"
    # Bazel says it could not upload, and goes on.
    assert "WARNING: Writing to Remote Cache" in changed, changed
    assert "Build completed successfully" in changed


def _action_results(server: ServerProcess) -> list[str]:
    """The action cache's entries (cas/action_cache.py keeps one file each)."""
    return sorted(path.name for path in (server.storage / "ac").rglob("*") if path.is_file())
