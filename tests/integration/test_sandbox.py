"""The worker's sandbox with the real bubblewrap: a warm sandbox (one
bubblewrap kept per slot, a helper inside starting each command) must behave
as a bubblewrap started for each command, and leave nothing behind."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cas.memory import MemoryStore
from cas.store import put_blob
from executor import layout
from executor import sandbox as sandbox_module
from executor.local_cache import LocalCache
from executor.sandbox import Sandbox, Slot
from reapi.core.digests import DigestFunction

SHA256 = DigestFunction.SHA256


@pytest.fixture(params=["warm", "cold"])
async def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sandbox]:
    box = Sandbox("bwrap", tmp_path / "actions")
    box.warm = request.param == "warm"
    yield box
    box.close()


async def run(slot: Slot, script: str, workdir: str = "", timeout: float = 30) -> tuple[int, str]:
    outcome = await slot.run(workdir, ["/bin/sh", "-c", script], {"PATH": "/bin"}, timeout)
    return outcome.exit_code, slot.stdout.read_text() + slot.stderr.read_text()


async def test_exit_codes_and_output(sandbox: Sandbox) -> None:
    async with sandbox.slot() as slot:
        assert await run(slot, "echo out; echo err >&2; exit 3") == (3, "out\nerr\n")
        assert (await run(slot, "kill -SEGV $$"))[0] == 128 + 11
        outcome = await slot.run("", ["no-such-program"], {"PATH": "/bin"}, 30)
        assert outcome.exit_code == 127
        assert b"no-such-program" in slot.stderr.read_bytes()


async def test_environment_and_directory_are_the_commands(sandbox: Sandbox) -> None:
    async with sandbox.slot() as slot:
        (slot.root / "sub").mkdir()
        env = {"ONLY": "this", "PATH": "/usr/bin:/bin"}
        outcome = await slot.run("sub", ["env"], env, 30)
        assert outcome.exit_code == 0
        assert sorted(slot.stdout.read_text().split()) == ["ONLY=this", "PATH=/usr/bin:/bin"]
        assert await run(slot, "pwd; ls", workdir="sub") == (0, "/build/sub\n")


async def test_signals_start_as_the_system_has_them(sandbox: Sandbox) -> None:
    """Python ignores SIGPIPE; a command started from it must not."""
    async with sandbox.slot() as slot:
        assert await run(slot, "yes | head -n 1") == (0, "y\n")


async def test_nothing_is_left_for_the_next_command(sandbox: Sandbox) -> None:
    async with sandbox.slot() as slot:
        script = "sleep 300 & echo x > /tmp/left; echo y > /build/tree-file"
        assert (await run(slot, script))[0] == 0
        assert (slot.root / "tree-file").exists()
    async with sandbox.slot() as slot:
        assert list(slot.root.iterdir()) == []
        listing = "cat /proc/[0-9]*/comm | sort | uniq; ls -A /tmp"
        code, output = await run(slot, listing)
        assert code == 0
        assert "sleep" not in output and "left" not in output, output


@pytest.mark.parametrize(
    ("change", "look"),
    [
        ("rm /dev/stdout && ln -s /tmp/x /dev/stdout", "readlink /dev/stdout"),
        ("echo x > /dev/shm/left; mkdir /home", "ls -A /dev/shm /home 2>&1"),
        ("chmod 700 /build /tmp", "stat -c %a /build /tmp"),
        ("mkdir /tmp/d && touch /tmp/d/f && chmod 500 /tmp/d", "ls -A /tmp"),
        ("chmod 0 /tmp /dev/shm", "stat -c %a /tmp /dev/shm"),
        ("ipcmk -M 4096 >/dev/null", "ipcs -m | grep -c 0x"),
        ("setsid sh -c 'trap \"\" TERM; sleep 300' &", "cat /proc/[0-9]*/comm | grep -c sleep"),
        # Settings of the helper (same user): they would pass to every later command.
        ("prlimit --pid $PPID --nofile=64:64 --fsize=1000", "ulimit -n; ulimit -f"),
        ("taskset -p 1 $PPID >/dev/null", "nproc"),
        ("renice -n 10 -p $PPID >/dev/null", "nice"),
    ],
)
async def test_what_a_command_changes_is_not_seen_by_the_next(
    sandbox: Sandbox, change: str, look: str
) -> None:
    async with sandbox.slot() as slot:
        before = await run(slot, look + "; true")
    async with sandbox.slot() as slot:
        code, output = await run(slot, change)
        # In a sandbox of its own a command has no helper to change ($PPID is
        # bwrap's); a command run by a root worker may not change what root owns.
        refused = "Permission denied" in output or "Operation not permitted" in output
        assert code == 0 or refused or (not sandbox.warm and "PPID" in change), output
    async with sandbox.slot() as slot:
        assert await run(slot, look + "; true") == before


async def test_a_command_gets_only_its_own_descriptors(sandbox: Sandbox) -> None:
    async with sandbox.slot() as slot:
        # ls's own: the three standard ones and the directory it reads.
        assert await run(slot, "exec ls /proc/self/fd") == (0, "0\n1\n2\n3\n")


async def test_a_command_cannot_reach_into_the_helper(tmp_path: Path) -> None:
    box = Sandbox("bwrap", tmp_path / "actions")
    try:
        async with box.slot() as slot:
            code, output = await run(slot, "head -c 1 /proc/$PPID/mem")
            assert code != 0 and "Permission denied" in output
    finally:
        box.close()


PYTHON = os.path.realpath(sys.executable)  # mounted in a warm sandbox (its helper's)
DEEP = os.path.dirname(sys.base_prefix)  # a directory bwrap made for that mount


@pytest.mark.parametrize(
    ("change", "look"),
    [
        (  # a POSIX message queue
            "import ctypes, os; "
            "ctypes.CDLL('librt.so.1').mq_open(b'/left', os.O_CREAT | os.O_RDWR, 0o600, None)",
            "import os; print(os.listdir('/dev/mqueue'))",
        ),
        (  # a TCP connection in TIME_WAIT on the sandbox's loopback
            "import socket; s = socket.create_server(('127.0.0.1', 5555)); "
            "c = socket.create_connection(('127.0.0.1', 5555)); "
            "a, _ = s.accept(); a.close(); c.close()",
            "print(len(open('/proc/net/tcp').readlines()))",
        ),
        (  # extended attributes on the tree's directory (a default ACL is one)
            "import os; os.setxattr('/build', 'user.left', b'1')",
            "import os; print(os.listxattr('/build'))",
        ),
        (  # extended attributes, and a file deep in the mount points' directories
            f"import os; os.setxattr('/', 'user.left', b'1'); open('{DEEP}/left', 'w')",
            f"import os; print(os.listxattr('/'), os.listdir('{DEEP}'))",
        ),
    ],
)
async def test_what_a_command_leaves_in_its_namespaces_is_not_seen_by_the_next(
    tmp_path: Path, change: str, look: str
) -> None:
    box = Sandbox("bwrap", tmp_path / "actions")
    try:
        async with box.slot() as slot:
            _code, before = await run(slot, f'{PYTHON} -I -S -c "{look}"')
            assert slot._warm is not None  # a warm sandbox, where a command can leave these
        async with box.slot() as slot:
            code, output = await run(slot, f'{PYTHON} -I -S -c "{change}"')
            # A root worker's command may not change what root owns.
            assert (code, output) == (0, "") or "PermissionError" in output, output
        async with box.slot() as slot:
            assert await run(slot, f'{PYTHON} -I -S -c "{look}"') == (0, before)
    finally:
        box.close()


async def test_commands_start_as_a_shell_would_start_them(sandbox: Sandbox) -> None:
    async with sandbox.slot() as slot:
        script = slot.root / "script"
        script.write_text("echo from a script without a first line\n")
        script.chmod(0o755)
        (slot.root / "not-executable").write_text("echo no\n")
        assert await run(slot, "./script") == (0, "from a script without a first line\n")
        outcome = await slot.run("", ["./script"], {"PATH": "/bin"}, 30)
        expected = (0, "from a script without a first line\n")
        assert (outcome.exit_code, slot.stdout.read_text()) == expected
        outcome = await slot.run("", ["./not-executable"], {"PATH": "/bin"}, 30)
        assert outcome.exit_code == 126
        # `kill 0` ends the command's own processes, and nothing else.
        assert (await run(slot, "sleep 300 & kill 0"))[0] == 128 + 15
        assert await run(slot, "echo still here") == (0, "still here\n")


async def test_a_command_is_found_on_its_own_path(sandbox: Sandbox) -> None:
    async with sandbox.slot() as slot:
        for directory, text in (("denied", "echo not me"), ("tools", "echo found")):
            (slot.root / directory).mkdir()
            (slot.root / directory / "tool").write_text(text + "\n")
        (slot.root / "tools" / "tool").chmod(0o755)
        path = {"PATH": "/build/missing:/build/denied:/build/tools:/bin"}
        outcome = await slot.run("", ["tool"], path, 30)
        assert (outcome.exit_code, slot.stdout.read_text()) == (0, "found\n")
        outcome = await slot.run("", ["tool"], {"PATH": "/build/denied"}, 30)
        assert outcome.exit_code == 126
        outcome = await slot.run("", ["tool"], {"PATH": "/bin"}, 30)
        assert outcome.exit_code == 127 and "tool" in slot.stderr.read_text()
        outcome = await slot.run("", ["true"], {}, 30)  # no PATH: the system's default
        assert outcome.exit_code == 0
        assert (await slot.run("", [""], path, 30)).exit_code == 127
        assert (await slot.run("missing", ["true"], path, 30)).exit_code == 1  # no such cwd


async def test_timeout_kills_and_the_slot_works_again(sandbox: Sandbox) -> None:
    async with sandbox.slot() as slot:
        outcome = await slot.run("", ["/bin/sleep", "300"], {}, 0.5)
        assert outcome.timed_out
        assert await run(slot, "echo again") == (0, "again\n")


async def test_cancelled_command_is_killed_and_the_slot_works_again(sandbox: Sandbox) -> None:
    async with sandbox.slot() as slot:
        running = asyncio.create_task(run(slot, "sleep 300"))
        await asyncio.sleep(0.3)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert await run(slot, "echo again") == (0, "again\n")


async def test_a_warm_sandbox_serves_many_commands(tmp_path: Path) -> None:
    box = Sandbox("bwrap", tmp_path / "actions")
    try:
        async with box.slot() as slot:
            await run(slot, "true")
            first = slot._warm
            assert first is not None
            for _ in range(3):
                async with asyncio.timeout(10):
                    await run(slot, "true")
            assert slot._warm is first
    finally:
        box.close()
    assert not list((tmp_path / "actions").iterdir())


async def test_without_a_helper_each_command_gets_its_own_bubblewrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "helper.py"
    broken.write_text("import sys\nsys.exit(1)\n")
    monkeypatch.setattr(sandbox_module, "HELPER_SOURCE", broken)
    box = Sandbox("bwrap", tmp_path / "actions")
    try:
        async with box.slot() as slot:
            assert await run(slot, "echo fine") == (0, "fine\n")
            assert not box.warm and slot._warm is None
    finally:
        box.close()


async def cached_tree(cache: LocalCache, store: MemoryStore, spec: dict[str, bytes]) -> layout.Dir:
    """A layout of `spec` (path -> contents) whose files are the worker cache's."""
    digests = {path: SHA256.digest_of(data) for path, data in spec.items()}
    for path, digest in digests.items():
        await put_blob(store, digest, spec[path])
    inodes = await cache.ensure((digest, False) for digest in digests.values())
    root = layout.Dir()
    for path, digest in digests.items():
        directory = root.subdirectory(os.path.dirname(path))
        assert directory is not None
        file = layout.File(cache.path(digest, False), inodes[(digest, False)])
        directory.entries[os.path.basename(path)] = file
    return root


# Everything a command can see of the tree: entries, types, modes, link targets, bytes.
LISTING = (
    "cd /build && find . -printf '%p %y %m %l\\n' | LC_ALL=C sort"
    " && find . -type f | LC_ALL=C sort | xargs cat"
)


async def test_the_tree_kept_for_the_next_action_is_as_a_fresh_one(
    sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    cache = LocalCache(tmp_path / "cache", store)
    first = {
        "keep.h": b"keep\n",
        "gone.h": b"gone\n",
        "twin.h": b"twin\n",
        "dir/sub/deep.h": b"deep\n",
    }
    second = {
        "keep.h": b"keep\n",
        "twin.h": b"twin\n",
        "dir/sub/deep.h": b"deep\n",
        "dir/new.h": b"new\n",
    }
    tamper = (
        "echo object > out.o; mkdir -p made/deeper && touch made/deeper/x;"
        " rm gone.h; rm twin.h && echo forged > twin.h; mv dir/sub/deep.h dir/moved.h;"
        " ln -s /etc etc; mkfifo dir/fifo; chmod 700 dir; chmod 0 dir/sub;"
        " echo overwritten > keep.h; true"
    )
    async with sandbox.slot() as slot:
        slot.lay_out(await cached_tree(cache, store, first))
        assert (await run(slot, tamper))[0] == 0
    async with sandbox.slot() as slot:
        slot.lay_out(await cached_tree(cache, store, second))
        code, kept = await run(slot, LISTING)
    assert code == 0
    # The tree was put back and laid out over, not emptied and made again.
    assert [r.message for r in caplog.records if r.levelno >= logging.WARNING] == []
    other = Sandbox("bwrap", tmp_path / "fresh")
    other.warm = sandbox.warm
    try:
        async with other.slot() as slot:
            slot.lay_out(await cached_tree(cache, store, second))
            assert await run(slot, LISTING) == (0, kept)
    finally:
        other.close()
    assert "keep\ntwin\n" in kept and "forged" not in kept and "overwritten" not in kept


async def test_extended_attributes_a_command_set_in_the_tree_are_not_kept(tmp_path: Path) -> None:
    store = MemoryStore()
    cache = LocalCache(tmp_path / "cache", store)
    box = Sandbox("bwrap", tmp_path / "actions")
    look = f"{PYTHON} -I -S -c \"import os; print(os.listxattr('/build/dir'))\""
    try:
        async with box.slot() as slot:
            slot.lay_out(await cached_tree(cache, store, {"dir/a.h": b"a\n"}))
            setting = "import os; os.setxattr('/build/dir', 'user.left', b'1')"
            assert await run(slot, f'{PYTHON} -I -S -c "{setting}"') == (0, "")
            assert await run(slot, look) == (0, "['user.left']\n")
        async with box.slot() as slot:
            slot.lay_out(await cached_tree(cache, store, {"dir/b.h": b"b\n"}))
            assert await run(slot, look) == (0, "[]\n")
    finally:
        box.close()


async def test_a_tree_too_deep_for_recursion_is_put_back(sandbox: Sandbox, tmp_path: Path) -> None:
    store = MemoryStore()
    cache = LocalCache(tmp_path / "cache", store)
    deep = "i=0; while [ $i -lt 1200 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done"
    async with sandbox.slot() as slot:
        slot.lay_out(await cached_tree(cache, store, {"a.h": b"a\n"}))
        assert (await run(slot, deep))[0] == 0
        first = slot.place
    async with sandbox.slot() as slot:
        assert slot.place == first  # put back, not abandoned
        slot.lay_out(await cached_tree(cache, store, {"a.h": b"a\n"}))
        assert await run(slot, "ls -A /build") == (0, "a.h\n")


async def test_a_tree_deeper_than_a_path_can_name_costs_only_its_directory(
    tmp_path: Path,
) -> None:
    """Past PATH_MAX the tree cannot be put back or emptied by path: the slot
    abandons that directory and goes on in a new one."""
    box = Sandbox("bwrap", tmp_path / "actions")
    deep = "import os; [(os.mkdir('dd'), os.chdir('dd')) for _ in range(2100)]"
    try:
        async with box.slot() as slot:
            assert await run(slot, f'{PYTHON} -I -S -c "{deep}"') == (0, "")
            first = slot.place
        async with box.slot() as slot:
            assert slot.place != first
            assert await run(slot, "ls -A /build; echo fine") == (0, "fine\n")
    finally:
        box.close()
        subprocess.run(["rm", "-rf", str(tmp_path / "actions")], check=True)  # rm goes deeper


async def test_a_tmp_too_deep_to_empty_costs_only_the_warm_sandbox(tmp_path: Path) -> None:
    """The command's own result is reported; the next command gets a new sandbox."""
    box = Sandbox("bwrap", tmp_path / "actions")
    deep = "import os; os.chdir('/tmp'); [(os.mkdir('d'), os.chdir('d')) for _ in range(1200)]"
    try:
        async with box.slot() as slot:
            assert await run(slot, f'{PYTHON} -I -S -c "{deep}"; echo made') == (0, "made\n")
            assert slot._warm is None  # thrown away: /tmp could not be emptied
        async with box.slot() as slot:
            assert await run(slot, "ls -A /tmp; echo ok") == (0, "ok\n")
    finally:
        box.close()


HOLD_A_SLOT = """
import asyncio, sys, time
from pathlib import Path
from executor.sandbox import Sandbox

async def main():
    box = Sandbox("none", Path(sys.argv[1]))
    async with box.slot() as slot:
        (slot.root / "kept.o").write_bytes(b"object")
        print(slot.place, flush=True)
        time.sleep(600)

asyncio.run(main())
"""


def hold_a_slot(workdir: Path) -> tuple[subprocess.Popen[str], Path]:
    """A worker's sandbox in another process, in the middle of an action."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_SLOT, str(workdir)],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


async def test_slots_a_dead_worker_left_are_removed_by_the_next_one(tmp_path: Path) -> None:
    workdir = tmp_path / "actions"
    dead, dead_place = hold_a_slot(workdir)
    live, live_place = hold_a_slot(workdir)  # a worker sharing the directory
    try:
        stop(dead)
        older = workdir / "slot-0123"  # from a version without locks
        (older / "root").mkdir(parents=True)
        assert dead_place.is_dir() and live_place.is_dir()
        box = Sandbox("none", workdir)
        try:
            assert not dead_place.exists() and not older.exists()
            assert not dead_place.with_name(dead_place.name + ".lock").exists()
            assert (live_place / "root" / "kept.o").read_bytes() == b"object"
            async with box.slot() as slot:  # and the new worker has its own
                assert slot.place not in (dead_place, live_place)
        finally:
            box.close()
        assert sorted(p.name for p in workdir.iterdir()) == [
            live_place.name,
            live_place.name + ".lock",
        ]
    finally:
        stop(live)


def stop(process: subprocess.Popen[str]) -> None:
    process.kill()  # as a worker dies: no clean-up
    process.wait()
    assert process.stdout is not None
    process.stdout.close()


async def test_an_abandoned_slot_is_removed_by_the_next_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "actions"
    box = Sandbox("none", workdir)
    try:
        with monkeypatch.context() as broken:  # the tree can be neither put back nor emptied
            broken.setattr(layout, "restore", _fail)
            broken.setattr(layout, "empty", _fail)
            async with box.slot() as slot:
                slot.lay_out(layout.Dir())
                abandoned = slot.place
        assert slot.place != abandoned and abandoned.is_dir()
        Sandbox("none", workdir).close()  # another worker starting
        assert not abandoned.exists()
        assert slot.place.with_name(slot.place.name + ".lock").exists()  # the live one stays
    finally:
        box.close()


def _fail(*args: object) -> None:
    raise OSError("cannot")


def test_what_a_starting_worker_cannot_check_or_did_not_finish(tmp_path: Path) -> None:
    """A lock it cannot open stays (another user's worker may own it); a lock
    a dead worker was still making goes once it is a minute old."""
    workdir = tmp_path / "actions"
    (workdir / "slot-0456.lock").mkdir(parents=True)  # cannot be opened as a file
    (workdir / "slot-0456").mkdir()
    old, new = workdir / ".slot-07.lock.12", workdir / ".slot-08.lock.13"
    old.touch()
    new.touch()
    os.utime(old, (time.time() - 120, time.time() - 120))
    Sandbox("none", workdir).close()
    assert (workdir / "slot-0456").is_dir()
    assert not old.exists() and new.exists()
