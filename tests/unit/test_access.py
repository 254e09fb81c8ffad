"""The token file's grammar, what each permission allows, and who sees an operation."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.longrunning import operations_pb2

from reapi.core.credentials import read_token
from reapi.core.errors import PermissionDenied
from reapi.frontend.access import (
    ADMIN,
    ANYONE,
    EXECUTE,
    METHOD_PERMISSIONS,
    READ,
    WORKER,
    WRITE,
    Caller,
    instance_of,
    load_grants,
    parse_grant,
    token_name,
)
from reapi.frontend.security import ConfigError
from reapi.protos import bytestream_pb2, worker_pb2
from reapi.protos import remote_execution_pb2 as re_pb2


@pytest.mark.parametrize(
    ("line", "permissions", "instances"),
    [
        ("tok", {READ, WRITE, EXECUTE}, None),
        ("tok read", {READ}, None),
        ("tok write", {READ, WRITE}, None),
        ("tok execute", {READ, EXECUTE}, None),
        ("tok worker", {WORKER}, None),
        ("tok admin", {READ, WRITE, EXECUTE, ADMIN}, None),
        ("tok read,worker", {READ, WORKER}, None),
        ("tok write,execute @team-a", {READ, WRITE, EXECUTE}, {"team-a"}),
        ("tok @a/b @", {READ, WRITE, EXECUTE}, {"a/b", ""}),
        ("  tok\tread  @x ", {READ}, {"x"}),
        ("tok write   # CI fills the cache", {READ, WRITE}, None),
    ],
)
def test_grant_lines(line: str, permissions: set[str], instances: set[str] | None) -> None:
    subject, caller = parse_grant(line, "here")
    assert subject == "tok"
    assert caller.permissions == permissions
    assert caller.instances == (None if instances is None else frozenset(instances))
    assert caller.name == token_name("tok") and "tok" not in caller.name.removeprefix("token:")


def test_a_hash_inside_a_token_is_part_of_it() -> None:
    subject, caller = parse_grant("abc#def read # a comment", "here")
    assert subject == "abc#def" and caller.permissions == {READ}


def test_errors_never_repeat_the_secret() -> None:
    for line in ("s3cret-token read write", "s3cret-token reed", 's3cret-token "read'):
        with pytest.raises(ConfigError) as error:
            parse_grant(line, "line 1")
        assert "s3cret" not in str(error.value)


def test_certificate_lines() -> None:
    subject, caller = parse_grant("CN=ci.example.org write", "here")
    assert subject == "CN=ci.example.org"
    assert caller.name == "cert:ci.example.org" and caller.permissions == {READ, WRITE}
    subject, caller = parse_grant('"CN=build farm" worker @a', "here")
    assert subject == "CN=build farm" and caller.instances == frozenset({"a"})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("tok reed", "unknown permission 'reed'"),
        ("tok read write", "expected TOKEN"),
        ("CN= read", "common name"),
        ("tok read,,write", "unknown permission ''"),
        ('"CN=build farm worker', "a quote that does not close"),
        ('tok"en read', "a quote that does not close"),
        ('"" read', "an empty token"),
    ],
)
def test_bad_grant_lines(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        parse_grant(line, "file, line 3")
    assert str(error.value).startswith("file, line 3: ")


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        "# CI writes, developers read\nci-token write\n\ndev-token read\nCN=w1 worker\n"
    )
    grants = load_grants(path)
    assert grants.by_token(b"ci-token") == parse_grant("ci-token write", "")[1]
    assert grants.by_token(b"dev-token") is not None
    assert grants.by_token(b"dev-toke") is None and grants.by_token(b"") is None
    assert grants.common_names["w1"].permissions == {WORKER}
    extra = grants.with_token("w", Caller("local", frozenset({WORKER})))
    assert extra.by_token(b"w") is not None and grants.by_token(b"w") is None

    path.write_text("same read\nother write\nsame write\n")
    with pytest.raises(ConfigError, match=r"line 3: token:[0-9a-f]{12} is granted twice"):
        load_grants(path)
    path.write_text('"CN=alice" read\nxyzalice write\n')  # a token, not the name again
    assert load_grants(path).by_token(b"xyzalice") is not None
    path.write_text('"CN=a b" read\n"CN=a b" write\n')
    with pytest.raises(ConfigError, match="line 2: cert:a b is granted twice"):
        load_grants(path)
    path.write_text("ok\nbad reed\n")
    with pytest.raises(ConfigError, match="line 2: unknown permission"):
        load_grants(path)
    path.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="holds no token"):
        load_grants(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_grants(tmp_path / "absent")


def test_client_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("# mine\n  s3cret  read\n")
    assert read_token(path) == "s3cret"
    path.write_text("#\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_token(path)


def _served_methods() -> set[str]:
    """Every method of every service `reapi serve` registers, but health."""
    services = [
        *(re_pb2.DESCRIPTOR.services_by_name[name] for name in re_pb2.DESCRIPTOR.services_by_name),
        operations_pb2.DESCRIPTOR.services_by_name["Operations"],
        bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"],
        worker_pb2.DESCRIPTOR.services_by_name["Workers"],
    ]
    return {
        f"/{service.full_name}/{method.name}" for service in services for method in service.methods
    }


def test_every_method_has_its_permissions() -> None:
    assert _served_methods() == set(METHOD_PERMISSIONS)


def _allowed(*granted: str) -> set[str]:
    """The methods a grant of `granted` may make."""
    _subject, caller = parse_grant(f"tok {','.join(granted)}", "")
    return {
        method for method, allowed in METHOD_PERMISSIONS.items() if allowed & caller.permissions
    }


def _short(methods: set[str]) -> set[str]:
    return {method.rpartition("/")[2] for method in methods}


READS = {
    "GetCapabilities", "FindMissingBlobs", "BatchReadBlobs", "GetTree", "Read",
    "GetActionResult", "GetProvided",
}  # fmt: skip
UPLOADS = {"BatchUpdateBlobs", "Write", "QueryWriteStatus"}
EXECUTION = {
    "Execute", "WaitExecution", "GetOperation", "ListOperations", "CancelOperation",
    "DeleteOperation", "WaitOperation",
}  # fmt: skip


def test_the_permission_matrix() -> None:
    assert _short(_allowed(READ)) == READS
    assert _short(_allowed(WRITE)) == READS | UPLOADS | {"UpdateActionResult"}
    assert _short(_allowed(EXECUTE)) == READS | UPLOADS | EXECUTION
    assert _short(_allowed(WORKER)) == {
        "GetCapabilities", "FindMissingBlobs", "BatchReadBlobs", "GetTree", "Read",
        "GetProvided", *UPLOADS, "Work",
    }  # fmt: skip
    assert _short(_allowed(ADMIN)) == READS | UPLOADS | EXECUTION | {"UpdateActionResult"}
    # Only a worker grant leases actions; a bare token cannot.
    workers = {m for m in METHOD_PERMISSIONS if m.endswith("/Work")}
    assert not workers & _allowed(READ, WRITE, EXECUTE, ADMIN)


def test_who_sees_an_operation() -> None:
    alice = Caller("token:alice", frozenset({READ, EXECUTE}))
    scoped_admin = Caller("token:root", frozenset({ADMIN, EXECUTE}), frozenset({"a"}))
    assert alice.sees({"token:alice", "token:bob"}, "")
    assert not alice.sees({"token:bob"}, "")
    assert scoped_admin.sees({"token:bob"}, "a") and not scoped_admin.sees({"token:bob"}, "b")
    assert ANYONE.sees({"anyone"}, "whatever")


def test_instance_scope() -> None:
    team = Caller("token:t", frozenset({READ}), frozenset({"team-a", ""}))
    team.check_instance("team-a")
    team.check_instance("")
    with pytest.raises(PermissionDenied, match="'team-b'"):
        team.check_instance("team-b")
    ANYONE.check_instance("team-b")


@pytest.mark.parametrize(
    ("request_", "instance"),
    [
        (re_pb2.FindMissingBlobsRequest(instance_name="x/y"), "x/y"),
        (re_pb2.GetActionResultRequest(), ""),
        (bytestream_pb2.ReadRequest(resource_name="t/blobs/" + "a" * 64 + "/3"), "t"),
        (bytestream_pb2.ReadRequest(resource_name="blobs/" + "a" * 64 + "/3"), ""),
        (
            bytestream_pb2.WriteRequest(resource_name="u/v/uploads/1/blobs/" + "a" * 64 + "/3"),
            "u/v",
        ),
        (bytestream_pb2.WriteRequest(), None),  # later messages of an upload
        (operations_pb2.GetOperationRequest(name="operations/1"), None),
        (re_pb2.WaitExecutionRequest(name="operations/1"), None),
    ],
)
def test_instance_of(request_: object, instance: str | None) -> None:
    assert instance_of(request_) == instance
