"""Running Debian's Bazel 4 on the examples workspace, fully offline, for integration tests.

Bazel 4 wants several repositories from the network even for a C++-only build. These are
served from Debian's packages (bazel-platforms, bazel-rules-java) and from a local stand-in
for rules_cc; the test rules' coverage report generator (which would come from
@remote_coverage_tools) is pointed at a local file, since coverage is never collected here.
"""

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_CC = REPO_ROOT / "tests" / "bazel_rules_cc"
DEBIAN_PLATFORMS = Path("/usr/share/bazel/platforms")
DEBIAN_RULES_JAVA = Path("/usr/share/bazel/rules/java")
INSTALL_HINT = "apt-get install -y bazel-bootstrap bazel-platforms bazel-rules-java"

# Generous: a cold build on a small machine takes seconds, but a JVM start can stall.
COMMAND_TIMEOUT_S = 600


def offline_flags(repository_cache: Path) -> list[str]:
    """Build/test flags that let Debian's Bazel 4 build //examples/... with no network."""
    return [
        f"--override_repository=rules_cc={RULES_CC}",
        f"--override_repository=rules_java={DEBIAN_RULES_JAVA}",
        f"--override_repository=platforms={DEBIAN_PLATFORMS}",
        # The default generator lives in @remote_coverage_tools, a download; any local
        # label will do because nothing is built with coverage.
        "--coverage_report_generator=@bazel_tools//tools/test:coverage_support",
        f"--repository_cache={repository_cache}",
        # Debian's /etc/bazel/bazelrc turns on --sandbox_debug, which floods the output.
        "--nosandbox_debug",
        # Keep PATH and friends out of action keys, so cache keys do not depend on the shell.
        "--incompatible_strict_action_env",
        "--jobs=2",
        "--color=no",
        "--curses=no",
    ]


def require_bazel() -> str:
    """The path of the bazel executable; fails the calling test if Bazel 4 is not set up."""
    bazel = shutil.which("bazel")
    if bazel is None:
        pytest.fail(f"bazel is not installed; run: {INSTALL_HINT}", pytrace=False)
    for path in (DEBIAN_PLATFORMS, DEBIAN_RULES_JAVA):
        if not (path / "WORKSPACE").is_file():
            pytest.fail(f"{path} is missing; run: {INSTALL_HINT}", pytrace=False)
    return bazel


def copy_workspace(dest: Path) -> Path:
    """Copies the repository's WORKSPACE and examples/ into `dest` and returns `dest`.

    Building the copy keeps the bazel-* convenience symlinks out of the repository.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO_ROOT / "WORKSPACE", dest / "WORKSPACE")
    shutil.copytree(REPO_ROOT / "examples", dest / "examples")
    return dest


@dataclass(frozen=True)
class Bazel:
    """One Bazel server for one workspace, with all its state under `output_user_root`.

    Every call uses the same startup options, so they all talk to the same server; call
    `shutdown` when done so that no JVM lingers (`--max_idle_secs` is the backstop).
    """

    executable: str
    workspace: Path
    output_user_root: Path

    def run(self, command: str, *args: str) -> str:
        """Runs `bazel COMMAND ARGS...` and returns its combined output; fails on non-zero exit."""
        argv = self._argv(command, *args)
        result = self._call(argv)
        if result.returncode != 0:
            pytest.fail(
                f"{' '.join(argv)} exited with {result.returncode}:\n{result.stdout}",
                pytrace=False,
            )
        return result.stdout

    def shutdown(self) -> None:
        """Stops the server. Never fails, so it can run in a `finally` without hiding an error."""
        self._call(self._argv("shutdown"))

    def _argv(self, command: str, *args: str) -> list[str]:
        return [
            self.executable,
            "--nohome_rc",
            f"--output_user_root={self.output_user_root}",
            "--max_idle_secs=120",
            command,
            *args,
        ]

    def _call(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=self.workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )


# Bazel prints e.g. "INFO: 19 processes: 9 remote cache hit, 10 internal." after each build,
# "INFO: 1 process: 1 internal." for one, and "INFO: 0 processes." for none.
_PROCESS_SUMMARY = re.compile(r"^INFO: (\d+) process(?:es)?(?:: (.*))?\.$", re.MULTILINE)


def process_summary(output: str) -> dict[str, int]:
    """The last process summary in Bazel's output, as {kind: count}.

    Kinds are Bazel's own words: "remote cache hit", "internal", "linux-sandbox",
    "processwrapper-sandbox", "local", "worker", ...
    """
    matches = _PROCESS_SUMMARY.findall(output)
    if not matches:
        raise ValueError(f"no process summary in Bazel output:\n{output}")
    total, breakdown = matches[-1]
    counts: dict[str, int] = {}
    for part in breakdown.split(", ") if breakdown else []:
        count, kind = part.split(" ", 1)
        counts[kind] = int(count)
    if sum(counts.values()) != int(total):
        raise ValueError(f"process summary does not add up to {total}: {counts}")
    return counts


def sha256_files(root: Path, paths: list[str]) -> dict[str, str]:
    """{path: sha256 hex} for each of `paths`, relative to `root`."""
    return {path: hashlib.sha256((root / path).read_bytes()).hexdigest() for path in paths}
