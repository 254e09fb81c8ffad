"""Imports point down (../shared/DESIGN.md): reapi's protocol modules at the
bottom, then cas, then executor and shim, and reapi's services, server and
command line on top. Nothing below imports the top."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# reapi's top: what serves and what the command line runs.
TOP = (
    "reapi.server",
    "reapi.cli",
    "reapi.access",
    "reapi.security",
    "reapi.services",
    "reapi.cas_commands",
    "reapi.operation_filter",
)
BOTTOM = ["reapi/digests.py", "reapi/errors.py", "reapi/conventions.py", "reapi/resources.py"]
BOTTOM += ["reapi/watch.py", "reapi/credentials.py"]


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_nothing_below_imports_the_top() -> None:
    below = [REPO / name for name in BOTTOM]
    for package in ("cas", "executor", "shim"):
        below += sorted((REPO / package).rglob("*.py"))
    upward = {
        str(path.relative_to(REPO)): sorted(name for name in imported(path) if name.startswith(TOP))
        for path in below
    }
    assert {path: names for path, names in upward.items() if names} == {}
