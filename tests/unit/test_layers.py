"""Imports point down (../shared/DESIGN.md): reapi.core (digests, errors,
names, conventions) and the generated reapi.protos at the bottom, then cas,
then executor and shim, and reapi.frontend (services, server, command line) on
top. Nothing below imports the top; the bottom imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOP = ("reapi.frontend",)
ABOVE_CORE = ("reapi.frontend", "cas", "executor", "shim")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def below_the_top() -> list[Path]:
    paths = sorted((REPO / "reapi" / "core").glob("*.py"))
    for package in ("cas", "executor", "shim"):
        paths += sorted((REPO / package).rglob("*.py"))
    return paths


def upward_imports(paths: list[Path], above: tuple[str, ...]) -> dict[str, list[str]]:
    found = {
        str(path.relative_to(REPO)): sorted(
            name for name in imported(path) if name.split(".")[0] in above or name.startswith(above)
        )
        for path in paths
    }
    return {path: names for path, names in found.items() if names}


def test_nothing_below_imports_the_top() -> None:
    assert upward_imports(below_the_top(), TOP) == {}


def test_the_core_imports_nothing_above_it() -> None:
    core = sorted((REPO / "reapi" / "core").glob("*.py"))
    assert upward_imports(core, ABOVE_CORE) == {}


def test_reapi_has_no_modules_outside_its_layers() -> None:
    """Every module of reapi is in core, frontend or protos: none of both layers at once."""
    loose = sorted(p.name for p in (REPO / "reapi").glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"]
