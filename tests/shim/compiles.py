"""One compile through reapi-cc beside the same compile with plain gcc."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("deps", "scan", "cpp")


def stats(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        ["reapi-cc", "--stats", "--json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The counters and reasons that moved, by how much."""
    moved: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, dict):
            table = {k: v - before.get(key, {}).get(k, 0) for k, v in value.items()}
            if any(table.values()):
                moved[key] = {k: v for k, v in table.items() if v}
        elif value != before.get(key, 0):
            moved[key] = value - before.get(key, 0)
    return moved


@dataclass
class Compared:
    expected: bytes  # what gcc wrote
    actual: bytes  # what reapi-cc wrote
    moved: dict[str, Any]  # the agent's counters that moved
    gcc: subprocess.CompletedProcess[bytes]
    shim: subprocess.CompletedProcess[bytes]
    others: dict[str, tuple[bytes, bytes]]  # more outputs: (gcc's, reapi-cc's)

    @property
    def remote(self) -> bool:
        """Whether the object came from the remote side (run or cached)."""
        return bool(self.moved.get("remote_executions") or self.moved.get("cache_hits"))


def compile_both(
    cwd: Path,
    arguments: list[str],
    env: dict[str, str],
    mode: str,
    gcc_env: dict[str, str] | None = None,
    compiler: str = "gcc",
    others: tuple[str, ...] = (),
) -> Compared:
    """`compiler ARGUMENTS` with plain gcc, then through reapi-cc in `mode`,
    in the same directory and to the same output (so that even debug info
    can match): both objects, and how the agent went about it."""
    output = cwd / arguments[arguments.index("-o") + 1]
    gcc = subprocess.run([compiler, *arguments], cwd=cwd, env=gcc_env, capture_output=True)
    assert gcc.returncode == 0, gcc.stderr.decode()
    expected = output.read_bytes()
    output.unlink()
    theirs = {}
    for other in others:
        theirs[other] = (cwd / other).read_bytes()
        (cwd / other).unlink()
    before = stats(env)
    reapi_cc = shutil.which("reapi-cc")
    assert reapi_cc is not None
    shim = subprocess.run(
        [reapi_cc, compiler, *arguments],
        cwd=cwd,
        env=env | {"REAPI_CC_MODE": mode},
        capture_output=True,
    )
    assert shim.returncode == 0, shim.stderr.decode()
    both = {other: (theirs[other], (cwd / other).read_bytes()) for other in others}
    return Compared(expected, output.read_bytes(), changes(before, stats(env)), gcc, shim, both)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root
