"""Action limits (executor/limits.py): what counts as written, how the
options read, and the users slots claim."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from executor.limits import DEFAULT_LIMITS, SANDBOX_UID_BASE, Limits, SandboxUsers, written
from reapi.frontend.cli import limits_from
from reapi.frontend.security import ConfigError

MIB = 1024 * 1024


def test_written_counts_new_files_and_output_not_inputs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "input").write_bytes(b"i" * MIB)
    inputs = {(tree / "input").stat().st_ino}
    stdout = tmp_path / "stdout"
    stdout.write_bytes(b"o" * MIB)
    assert written(tree, inputs, [stdout]) == MIB
    (tree / "sub" / "new").write_bytes(b"n" * 2 * MIB)
    with open(tree / "sparse", "wb") as sparse:
        sparse.truncate(5 * MIB)  # no disk, but 5 MiB to hash and send
    os.symlink("/usr", tree / "link")  # not followed: counts its own 4 bytes
    assert written(tree, inputs, [stdout, tmp_path / "gone"]) == 8 * MIB + 4


def test_limits_from_options() -> None:
    assert limits_from({}) == DEFAULT_LIMITS
    limits = limits_from({"max-processes": "64", "max_memory": "256M", "max-tree": "1G"})
    assert limits == Limits(processes=64, memory=256 * MIB, tmp=DEFAULT_LIMITS.tmp, tree=1024 * MIB)
    assert limits.rlimits() == {
        "RLIMIT_NPROC": 64,
        "RLIMIT_DATA": 256 * MIB,
        "RLIMIT_FSIZE": 1024 * MIB,
    }
    for option, text in (("max-processes", "-3"), ("max-processes", "x"), ("max-tmp", "0")):
        with pytest.raises(ConfigError, match=f"--{option}"):
            limits_from({option: text})


def test_each_slot_claims_a_user_no_other_holds() -> None:
    first, second = SandboxUsers(), SandboxUsers()
    try:
        mine = {first.claim(), first.claim()}
        theirs = second.claim()
        assert len(mine) == 2 and theirs not in mine
        assert all(uid >= SANDBOX_UID_BASE for uid in (*mine, theirs))
        first.release_all()
        assert second.claim() in mine  # freed for the next worker
    finally:
        first.release_all()
        second.release_all()
