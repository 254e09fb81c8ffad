"""Remote execution end to end: the real server, real worker processes, bubblewrap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2

from cas.disk import DiskStore
from cas.remote import RemoteStore
from reapi.core.conventions import file_identity
from reapi.core.digests import Digest
from reapi.protos import remote_execution_pb2 as re_pb2
from tests.actions import (
    SHA256,
    execute,
    execution,
    precondition_violations,
    read_blob,
    stage,
    upload_action,
)
from tests.helpers import ServerProcess

QUEUED, EXECUTING, COMPLETED = (
    re_pb2.ExecutionStage.QUEUED,
    re_pb2.ExecutionStage.EXECUTING,
    re_pb2.ExecutionStage.COMPLETED,
)


@pytest.fixture
def exec_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "storage", workers=1)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
async def channel(exec_server: ServerProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(exec_server.address) as chan:
        yield chan


async def test_runs_then_serves_from_cache(channel: grpc.aio.Channel) -> None:
    action = await upload_action(
        channel,
        ["/bin/sh", "-c", "mkdir -p out && tr a-z A-Z < in.txt > out/up.txt; echo done"],
        files={"in.txt": b"hello\n"},
        outputs=["out/up.txt"],
    )
    operations, response = await execute(channel, action)
    assert [op.done for op in operations] == [False] * (len(operations) - 1) + [True]
    assert stage(operations[-1]) == COMPLETED
    assert response.status.code == code_pb2.OK and not response.cached_result
    result = response.result
    assert result.exit_code == 0
    assert await read_blob(channel, result.stdout_digest) == b"done\n"
    (output,) = result.output_files
    assert output.path == "out/up.txt"
    assert await read_blob(channel, output.digest) == b"HELLO\n"
    metadata = result.execution_metadata
    assert metadata.worker and metadata.execution_start_timestamp.seconds > 0
    assert metadata.output_upload_completed_timestamp.ToNanoseconds() >= (
        metadata.execution_completed_timestamp.ToNanoseconds()
    )
    _ops, again = await execute(channel, action, inline_stdout=True)
    assert again.cached_result and again.result.stdout_raw == b"done\n"


async def test_a_quick_actions_stream_holds_one_message(channel: grpc.aio.Channel) -> None:
    """Nothing is sent in the first FIRST_UPDATE_AFTER seconds, so a quick action's
    stream is its result alone. A loaded machine may make any one action slow: one
    of three must show it."""
    streams = []
    for n in range(3):
        action = await upload_action(channel, ["/bin/sh", "-c", f"echo {n}"])
        operations, _response = await execute(channel, action)
        streams.append([(stage(op), op.done) for op in operations])
    assert [(COMPLETED, True)] in streams, streams


async def test_a_slow_actions_stream_reports_it_running(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/bin/sh", "-c", "sleep 1.5"])
    operations, response = await execute(channel, action)
    stages = [stage(op) for op in operations]
    assert not operations[0].done and stages[0] in (QUEUED, EXECUTING), stages
    assert stages[-1] == COMPLETED and EXECUTING in stages, stages
    assert [op.done for op in operations].count(True) == 1
    assert len({op.name for op in operations}) == 1
    assert response.status.code == code_pb2.OK and response.result.exit_code == 0


async def test_failures_are_not_cached(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/bin/sh", "-c", "echo oops >&2; exit 3"])
    _ops, first = await execute(channel, action, inline_stderr=True)
    assert first.result.exit_code == 3 and first.result.stderr_raw == b"oops\n"
    _ops, second = await execute(channel, action)
    assert not second.cached_result


async def test_an_input_tree_larger_than_a_message_runs(channel: grpc.aio.Channel) -> None:
    """A lease carries a few MiB of the input tree, the worker reads the rest
    from the CAS: here one Directory of 6 MB, with small ones that do come in
    the lease. (Before, the whole tree went in the lease, a message the worker
    refused: the stream broke, and the action failed after three tries.)"""
    files: dict[str, bytes] = {
        f"big/{n:05d}-a-header-with-a-rather-long-name.h": b"x" for n in range(60_000)
    }
    files.update({f"small{n}/f.h": f"{n}\n".encode() for n in range(20)})
    action = await upload_action(
        channel, ["/bin/sh", "-c", "ls big | wc -l; cat small*/f.h"], files
    )
    _ops, response = await execute(channel, action, inline_stdout=True)
    assert response.status.code == code_pb2.OK, response.status
    count, *small = response.result.stdout_raw.decode().split()
    assert count == "60000"
    assert sorted(small) == sorted(str(n) for n in range(20))


async def test_an_action_without_its_command_or_input_root_says_which(
    channel: grpc.aio.Channel,
) -> None:
    store = RemoteStore(channel)
    command = re_pb2.Command(arguments=["/bin/true"]).SerializeToString()
    command_digest = SHA256.digest_of(command)
    empty_root = SHA256.digest_of(b"")
    for action, missing in (
        (re_pb2.Action(input_root_digest=empty_root.to_proto()), "command_digest"),
        (re_pb2.Action(command_digest=command_digest.to_proto()), "input_root_digest"),
    ):
        data = action.SerializeToString()
        digest = SHA256.digest_of(data)
        await store.put_many([(digest, data), (command_digest, command)])
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await execute(channel, digest)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the Action has no {missing}" in (raised.value.details() or "")


async def test_results_say_when_they_were_queued(channel: grpc.aio.Channel) -> None:
    """Every timestamp of ExecutedActionMetadata is set, queued first (bgd
    showed 1970 for it), in the order the stages happen."""
    before = time.time()
    action = await upload_action(channel, ["/bin/true"], salt=b"timestamps")
    operations, response = await execute(channel, action)
    metadata = response.result.execution_metadata
    stamps = [
        getattr(metadata, field).ToNanoseconds() / 1e9
        for field in (
            "queued_timestamp", "worker_start_timestamp", "input_fetch_start_timestamp",
            "input_fetch_completed_timestamp", "execution_start_timestamp",
            "execution_completed_timestamp", "output_upload_start_timestamp",
            "output_upload_completed_timestamp", "worker_completed_timestamp",
        )
    ]  # fmt: skip
    assert before - 1 <= stamps[0] <= stamps[1], stamps
    assert stamps == sorted(stamps) and stamps[-1] <= time.time()
    assert metadata.worker
    partial = re_pb2.ExecuteOperationMetadata()
    operations[-1].metadata.Unpack(partial)
    assert partial.partial_execution_metadata.queued_timestamp == metadata.queued_timestamp


async def test_an_action_too_large_for_a_lease_is_invalid(channel: grpc.aio.Channel) -> None:
    """A 9 MB Command (150,000 output paths) is INVALID_ARGUMENT, and the worker
    still runs the next action. (Before, the lease was larger than the server
    may send: the worker's stream broke three times, cutting off whatever else
    it was running, and the action failed as UNAVAILABLE.)"""
    outputs = [f"out/a/rather/long/path/to/an/output/number-{n:06d}.o" for n in range(150_000)]
    action = await upload_action(channel, ["/bin/true"], outputs=outputs)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await execute(channel, action)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this server runs actions of up to 4194304 bytes" in (raised.value.details() or "")
    small = await upload_action(channel, ["/bin/sh", "-c", "echo ok"])
    _ops, response = await execute(channel, small, inline_stdout=True)
    assert response.result.stdout_raw == b"ok\n"


async def test_a_result_too_large_to_return_is_an_error(channel: grpc.aio.Channel) -> None:
    """An action that makes 80,000 declared outputs: its result would list them in
    about 10 MB, more than one message to the server may hold (8 MiB), and more
    than a client takes by default (4 MiB). RESOURCE_EXHAUSTED, with the exit
    code and stdout still there, and the worker runs the next action. (Before,
    the worker's stream broke three times, cutting off whatever else it was
    running, and the action failed as UNAVAILABLE.)"""
    outputs = [f"out/{n:05d}-an-output-with-a-rather-long-name.o" for n in range(80_000)]
    action = await upload_action(
        channel,
        [
            "/bin/sh",
            "-c",
            "cd out && seq -f '%05g' 0 79999 | "
            "sed 's/$/-an-output-with-a-rather-long-name.o/' | xargs touch && echo made",
        ],
        outputs=outputs,
    )
    _ops, response = await execute(channel, action, inline_stdout=True)
    assert response.status.code == code_pb2.RESOURCE_EXHAUSTED, response.status
    assert "this worker returns results of up to 4194304 bytes" in response.status.message
    assert response.result.exit_code == 0 and response.result.stdout_raw == b"made\n"
    assert not response.result.output_files
    small = await upload_action(channel, ["/bin/sh", "-c", "echo ok"])
    _ops, response = await execute(channel, small, inline_stdout=True)
    assert response.result.stdout_raw == b"ok\n"


async def test_missing_inputs_are_listed(channel: grpc.aio.Channel) -> None:
    ghost = SHA256.digest_of(b"never uploaded action")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await execute(channel, ghost)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_violations(raised.value) == [
        ("MISSING", f"blobs/{ghost.hash}/{ghost.size}")
    ]


async def test_identical_actions_run_once(channel: grpc.aio.Channel) -> None:
    action = await upload_action(
        channel, ["/bin/sh", "-c", "sleep 1; cat /proc/sys/kernel/random/uuid"]
    )
    results = await asyncio.gather(*(execute(channel, action) for _ in range(3)))
    names = {ops[-1].name for ops, _ in results}
    stdouts = {await read_blob(channel, r.result.stdout_digest) for _, r in results}
    assert len(names) == 1 and len(stdouts) == 1, (names, stdouts)


async def test_do_not_cache_is_never_merged_or_cached(channel: grpc.aio.Channel) -> None:
    action = await upload_action(
        channel, ["/bin/sh", "-c", "cat /proc/sys/kernel/random/uuid"], do_not_cache=True
    )
    results = await asyncio.gather(*(execute(channel, action) for _ in range(2)))
    assert len({ops[-1].name for ops, _ in results}) == 2
    _ops, again = await execute(channel, action)
    assert not again.cached_result


async def test_timeout_kills_the_action(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/bin/sleep", "30"], timeout=1)
    _ops, response = await execute(channel, action)
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED
    # A non-OK status is never cached: the action runs (and times out) again.
    _ops, again = await execute(channel, action)
    assert again.status.code == code_pb2.DEADLINE_EXCEEDED and not again.cached_result


async def test_timed_out_output_is_kept(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/bin/sh", "-c", "echo started; sleep 30"], timeout=1)
    _ops, response = await execute(channel, action)
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED
    assert await read_blob(channel, response.result.stdout_digest) == b"started\n"


async def test_small_and_large_outputs_reach_the_cas(channel: grpc.aio.Channel) -> None:
    """Small output blobs travel with the worker's Finished message, the rest
    through the CAS (reapi/frontend/services/workers.py, OUTPUT_BLOB_BYTES): both must be there."""
    script = "head -c 3000000 /dev/urandom > big && echo small > small && cat small"
    action = await upload_action(channel, ["/bin/sh", "-c", script], outputs=["big", "small"])
    _ops, response = await execute(channel, action)
    assert response.status.code == code_pb2.OK, response.status
    outputs = {f.path: f.digest for f in response.result.output_files}
    assert outputs["big"].size_bytes == 3_000_000
    big = await read_blob(channel, outputs["big"])
    assert SHA256.digest_of(big).to_proto() == outputs["big"]
    assert await read_blob(channel, outputs["small"]) == b"small\n"
    assert await read_blob(channel, response.result.stdout_digest) == b"small\n"


async def test_unmatchable_platform_fails_fast(channel: grpc.aio.Channel) -> None:
    warmup = await upload_action(channel, ["/bin/true"])
    await execute(channel, warmup)  # a worker is connected now
    action = await upload_action(channel, ["/bin/true"], platform={"gpu": "a100"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await execute(channel, action)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no worker matches" in (raised.value.details() or "")


async def test_wait_execution_of_unknown_operation(channel: grpc.aio.Channel) -> None:
    call = execution(channel).WaitExecution(re_pb2.WaitExecutionRequest(name="operations/nope"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [op async for op in call]
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("script", "expect_in_stderr"),
    [
        # Reading outside the input root (the host's /root, /home, /work are not there).
        ("cat /root/.bashrc /work/main/README.md /home/*/.profile", "No such file"),
        # Writing outside the tree: system directories are read-only, the rest absent.
        ("echo x > /usr/evil; echo x > /etc/evil", "Read-only file system"),
        # The network: no interface but a loopback of its own, where nothing listens.
        ("exec 3<>/dev/tcp/{server}/{port}", "connect: Connection refused"),
    ],
)
async def test_adversarial_actions_are_contained(
    channel: grpc.aio.Channel, exec_server: ServerProcess, script: str, expect_in_stderr: str
) -> None:
    host, port = exec_server.address.split(":")
    command = script.format(server=host, port=port)
    action = await upload_action(channel, ["/bin/bash", "-c", command])
    _ops, response = await execute(channel, action, inline_stderr=True)
    assert response.result.exit_code != 0, response
    assert expect_in_stderr.encode() in response.result.stderr_raw, response.result.stderr_raw
    assert not (Path("/usr/evil").exists() or Path("/etc/evil").exists())
    # The worker keeps working.
    fine = await upload_action(channel, ["/bin/echo", "still here"], salt=command.encode())
    _ops, after = await execute(channel, fine)
    assert after.status.code == code_pb2.OK and after.result.exit_code == 0


async def test_an_action_sees_only_its_sandboxs_processes(channel: grpc.aio.Channel) -> None:
    """A fresh PID namespace: bubblewrap's, the helper's and the action's own."""
    script = "for f in /proc/[0-9]*/cmdline; do cat $f; printf '\\n--\\n'; done"
    action = await upload_action(channel, ["/bin/sh", "-c", script])
    _ops, response = await execute(channel, action, inline_stdout=True)
    assert response.result.exit_code == 0, response
    seen = [blob.split(b"\0") for blob in response.result.stdout_raw.split(b"\n--\n")[:-1]]
    programs = [argv[0] for argv in seen]
    assert not [argv for argv in seen if b"reapi" in argv], programs  # the server, the worker
    assert 2 <= len(seen) <= 4, programs


@pytest.mark.parametrize("target", ["/etc", "../../../../etc/passwd"])
async def test_symlink_outputs_leaving_the_tree_are_refused(
    channel: grpc.aio.Channel, target: str
) -> None:
    action = await upload_action(channel, ["/bin/ln", "-s", target, "out"], outputs=["out"])
    _ops, response = await execute(channel, action)
    assert response.status.code == code_pb2.FAILED_PRECONDITION, response
    assert "symlink" in response.status.message


async def test_inputs_cannot_corrupt_the_workers_cache(channel: grpc.aio.Channel) -> None:
    files = {"shared.txt": b"pristine\n"}
    vandal = await upload_action(
        channel,
        ["/bin/sh", "-c", "chmod 666 shared.txt; echo ruined > shared.txt; true"],
        files=files,
    )
    await execute(channel, vandal)
    reader = await upload_action(channel, ["/bin/cat", "shared.txt"], files=files)
    _ops, response = await execute(channel, reader, inline_stdout=True)
    assert response.result.stdout_raw == b"pristine\n"


async def test_output_kinds(channel: grpc.aio.Channel) -> None:
    script = (
        "mkdir -p gen/sub && echo a > gen/a.txt && echo b > gen/sub/b.txt && "
        "ln -s a.txt gen/link && printf '#!/bin/sh\\necho hi\\n' > tool && chmod +x tool && "
        "ln -s tool tool-link"
    )
    action = await upload_action(
        channel, ["/bin/sh", "-c", script], outputs=["gen", "tool", "tool-link", "absent"]
    )
    _ops, response = await execute(channel, action)
    result = response.result
    assert response.status.code == code_pb2.OK, response.status
    (tool,) = result.output_files
    assert (tool.path, tool.is_executable) == ("tool", True)
    assert [(s.path, s.target) for s in result.output_symlinks] == [("tool-link", "tool")]
    (gen,) = result.output_directories
    tree = re_pb2.Tree.FromString(await read_blob(channel, gen.tree_digest))
    assert [f.name for f in tree.root.files] == ["a.txt"]
    assert [(s.name, s.target) for s in tree.root.symlinks] == [("link", "a.txt")]
    assert [d.name for d in tree.root.directories] == ["sub"]
    (sub,) = tree.children
    assert await read_blob(channel, sub.files[0].digest) == b"b\n"


async def test_legacy_output_fields(channel: grpc.aio.Channel) -> None:
    action = await upload_action(
        channel,
        ["/bin/sh", "-c", "echo f > deep/file.txt && mkdir d && echo x > d/x"],
        legacy_outputs=(["deep/file.txt"], ["d"]),
    )
    _ops, response = await execute(channel, action)
    assert [f.path for f in response.result.output_files] == ["deep/file.txt"]
    assert [d.path for d in response.result.output_directories] == ["d"]


async def test_environment_is_exactly_the_commands(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/usr/bin/env"], env={"ONLY": "this", "PATH": "/bin"})
    _ops, response = await execute(channel, action, inline_stdout=True)
    assert sorted(response.result.stdout_raw.decode().split()) == ["ONLY=this", "PATH=/bin"]


async def test_skip_cache_lookup_runs_again(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/bin/sh", "-c", "cat /proc/sys/kernel/random/uuid"])
    _ops, first = await execute(channel, action)
    _ops, cached = await execute(channel, action)
    assert cached.cached_result
    _ops, fresh = await execute(channel, action, skip_cache_lookup=True)
    assert not fresh.cached_result
    assert fresh.result.stdout_digest != first.result.stdout_digest
    # ... and its result replaces the cached one.
    _ops, after = await execute(channel, action)
    assert after.cached_result and after.result.stdout_digest == fresh.result.stdout_digest


async def test_missing_input_file_is_named(
    channel: grpc.aio.Channel, exec_server: ServerProcess
) -> None:
    action = await upload_action(channel, ["/bin/cat", "a.txt"], files={"a.txt": b"gone soon"})
    missing = SHA256.digest_of(b"gone soon")
    # The blob disappears behind the server's back, as eviction would make it.
    store = DiskStore(exec_server.storage)
    assert await store.delete(missing)
    store.close()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await execute(channel, action)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_violations(raised.value) == [
        ("MISSING", f"blobs/{missing.hash}/{missing.size}")
    ]


async def test_timeout_above_the_server_maximum_is_refused(channel: grpc.aio.Channel) -> None:
    action = await upload_action(channel, ["/bin/true"], timeout=7200)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await execute(channel, action)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Action.timeout" in (raised.value.details() or "")


async def upload_raw(
    channel: grpc.aio.Channel, root: re_pb2.Directory, command: re_pb2.Command, files: list[bytes]
) -> Digest:
    """Upload an Action made of these messages as they are (no checks)."""
    blobs = {SHA256.digest_of(data): data for data in files}
    for message in (root, command):
        blobs[SHA256.digest_of(message.SerializeToString())] = message.SerializeToString()
    action = re_pb2.Action(
        command_digest=SHA256.digest_of(command.SerializeToString()).to_proto(),
        input_root_digest=SHA256.digest_of(root.SerializeToString()).to_proto(),
    )
    action_digest = SHA256.digest_of(action.SerializeToString())
    blobs[action_digest] = action.SerializeToString()
    await RemoteStore(channel).put_many(list(blobs.items()))
    return action_digest


async def test_absolute_input_symlink_is_invalid(channel: grpc.aio.Channel) -> None:
    root = re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="passwd", target="/etc/passwd")])
    command = re_pb2.Command(arguments=["/bin/cat", "passwd"])
    action = await upload_raw(channel, root, command, [])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await execute(channel, action)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "absolute targets are not allowed" in (raised.value.details() or "")


@pytest.mark.parametrize(
    ("names", "workdir", "outputs", "named"),
    [
        (["twice.h", "twice.h"], "", [], "'twice.h'"),
        ([".."], "", [], "'..'"),
        (["sub/x.h"], "", [], "'sub/x.h'"),
        (["x.h"], "../escape", [], "'../escape'"),
        (["x.h"], "sub", ["../../escape/x.o"], "output '../../escape/x.o'"),
        (["x.h"], "", ["/escape/x.o"], "output '/escape/x.o'"),
        (["x.h"], "x.h/sub", [], "working directory 'x.h/sub': a file or symlink"),
        (["x.h"], "", ["x.h/y.o"], "output 'x.h/y.o': a file or symlink"),
    ],
)
async def test_trees_and_paths_that_do_not_stay_in_the_input_root_are_invalid(
    channel: grpc.aio.Channel, names: list[str], workdir: str, outputs: list[str], named: str
) -> None:
    data = b"int x;\n"
    digest = SHA256.digest_of(data)
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name=name, digest=digest.to_proto()) for name in names]
    )
    command = re_pb2.Command(arguments=["/bin/ls"], working_directory=workdir, output_paths=outputs)
    _ops, response = await execute(channel, await upload_raw(channel, root, command, [data]))
    assert response.status.code == code_pb2.INVALID_ARGUMENT, response.status
    assert named in response.status.message
    # The worker's slot is fine for the next action.
    after = await upload_action(channel, ["/bin/ls"], files={"ok.h": data})
    _ops, response = await execute(channel, after, inline_stdout=True)
    assert response.result.stdout_raw == b"ok.h\n"


async def test_output_directories_exist_when_the_command_starts(channel: grpc.aio.Channel) -> None:
    action = await upload_action(
        channel,
        ["/bin/sh", "-c", "ls -d . ../out ../out/deeper && : > ../out/deeper/x.o"],
        files={"src/a.c": b"int a;\n"},
        outputs=["../out/deeper/x.o", "../gen/list"],
        workdir="src",
    )
    _ops, response = await execute(channel, action, inline_stdout=True)
    assert response.result.exit_code == 0, response
    assert response.result.stdout_raw == b".\n../out\n../out/deeper\n"
    assert [f.path for f in response.result.output_files] == ["../out/deeper/x.o"]


async def test_worker_refuses_when_its_system_files_differ(channel: grpc.aio.Channel) -> None:
    identity = file_identity("/bin/sh")
    assert identity is not None
    real = identity[0]
    for digest, expect_ok in ((real, True), ("0" * 64, False)):
        manifest = f"{digest} 0 /bin/sh\n".encode()
        action = await upload_action(
            channel,
            ["/bin/sh", "-c", "echo ran"],
            files={".reapi/system-files": manifest},
            env={"PATH": "/bin", "REAPI_SYSTEM_FILES": ".reapi/system-files"},
        )
        _ops, response = await execute(channel, action, inline_stdout=True)
        if expect_ok:
            assert response.status.code == code_pb2.OK and response.result.stdout_raw == b"ran\n"
        else:
            assert response.status.code == code_pb2.FAILED_PRECONDITION
            assert "/bin/sh on this worker differs" in response.status.message


async def test_worker_refuses_when_a_file_the_client_lacks_exists(
    channel: grpc.aio.Channel,
) -> None:
    for path, expect_ok in (("/usr/include/no-such-header.h", True), ("/bin/sh", False)):
        action = await upload_action(
            channel,
            ["/bin/sh", "-c", "echo ran"],
            files={".reapi/system-files": f"ABSENT 0 {path}\n".encode()},
            env={"PATH": "/bin", "REAPI_SYSTEM_FILES": ".reapi/system-files"},
        )
        _ops, response = await execute(channel, action, inline_stdout=True)
        if expect_ok:
            assert response.status.code == code_pb2.OK and response.result.stdout_raw == b"ran\n"
        else:
            assert response.status.code == code_pb2.FAILED_PRECONDITION
            assert "/bin/sh exists on this worker but not on the client" in (
                response.status.message
            )


async def test_inputs_are_hard_links_into_the_cache(channel: grpc.aio.Channel) -> None:
    files = {"big.txt": b"x" * 100_000, "dir/small.txt": b"y"}
    action = await upload_action(
        channel, ["/usr/bin/stat", "-c", "%h", "big.txt", "dir/small.txt"], files=files
    )
    _ops, response = await execute(channel, action, inline_stdout=True)
    link_counts = [int(n) for n in response.result.stdout_raw.split()]
    assert link_counts and all(n >= 2 for n in link_counts), link_counts
