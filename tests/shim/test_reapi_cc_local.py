"""reapi-cc's local path: the real compiler, same bytes, same exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = """
#include <stdio.h>
#include "answer.h"
int main(void) { printf("%d\\n", ANSWER); return 0; }
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "main.c").write_text(SOURCE)
    (tmp_path / "answer.h").write_text("#define ANSWER 42\n")
    return tmp_path


def reapi_cc() -> str:
    found = shutil.which("reapi-cc")
    assert found, "reapi-cc is not installed (pip install -e .)"
    return found


def test_object_is_byte_identical_to_gcc(project: Path) -> None:
    subprocess.run(["gcc", "-O2", "-c", "main.c", "-o", "direct.o"], cwd=project, check=True)
    subprocess.run(
        [reapi_cc(), "gcc", "-O2", "-c", "main.c", "-o", "shim.o"], cwd=project, check=True
    )
    assert (project / "shim.o").read_bytes() == (project / "direct.o").read_bytes()


def test_masquerade_symlink_finds_the_real_compiler(project: Path) -> None:
    bin_dir = project / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcc").symlink_to(reapi_cc())
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["gcc", "main.c", "-o", "prog"], cwd=project, env=env, check=True)
    assert subprocess.run([project / "prog"], capture_output=True, text=True).stdout == "42\n"


def test_compile_errors_pass_through(project: Path) -> None:
    (project / "bad.c").write_text("int main(void) { return undefined_name; }\n")
    result = subprocess.run(
        [reapi_cc(), "gcc", "-c", "bad.c"], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "undefined_name" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "usage: reapi-cc COMPILER"),
        (["-c", "x.c"], "usage: reapi-cc COMPILER"),
        (["no-such-compiler-here", "-c", "x.c"], "compiler 'no-such-compiler-here' not found"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    result = subprocess.run([reapi_cc(), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr
