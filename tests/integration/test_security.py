"""TLS, mutual TLS and bearer tokens, against the real server process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.actions import execute, upload_action
from tests.helpers import ServerProcess
from tests.pki import Pki, capabilities, issue, make_pki, secure, tls_args

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), f"# ci\n{TOKEN}\n")


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "storage", *tls_args(pki))
    yield server
    server.stop()


def test_tls(tls_server: ServerProcess, pki: Pki) -> None:
    with secure(tls_server, pki) as channel:
        assert capabilities(channel).cache_capabilities.digest_functions
    with grpc.insecure_channel(tls_server.address) as plain, pytest.raises(grpc.RpcError):
        capabilities(plain)


def test_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    server = ServerProcess(
        tmp_path / "storage", *tls_args(pki), "--tls-client-ca", str(pki.files["ca.pem"])
    )
    try:
        with secure(server, pki, client=pki.client) as channel:
            assert capabilities(channel).cache_capabilities.digest_functions
        with secure(server, pki) as channel, pytest.raises(grpc.RpcError) as refused:
            capabilities(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = issue("someone else", issue("another CA", None))
        with secure(server, pki, client=stranger) as channel, pytest.raises(grpc.RpcError):
            capabilities(channel)
    finally:
        server.stop()


def test_bearer_tokens(tmp_path: Path, pki: Pki) -> None:
    # Any address with TLS and tokens is allowed without --insecure.
    server = ServerProcess(
        tmp_path / "storage",
        *tls_args(pki),
        "--listen",
        "0.0.0.0:0",
        "--auth-tokens",
        str(pki.files["tokens"]),
    )
    try:
        with secure(server, pki) as channel:
            for token in (None, "wrong", TOKEN + "x"):
                with pytest.raises(grpc.RpcError) as refused:
                    capabilities(channel, token)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Streaming calls are refused too.
            cas = re_grpc.ContentAddressableStorageStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                list(
                    cas.GetTree(
                        re_pb2.GetTreeRequest(
                            root_digest=re_pb2.Digest(hash="a" * 64, size_bytes=1)
                        )
                    )
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert capabilities(channel, TOKEN).cache_capabilities.digest_functions
            # Health answers without a token, for load balancers.
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


async def test_local_workers_reach_a_tls_server_with_tokens(tmp_path: Path, pki: Pki) -> None:
    server = ServerProcess(
        tmp_path / "storage", *tls_args(pki), "--auth-tokens", str(pki.files["tokens"]), workers=1
    )
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
        call_credentials = grpc.access_token_call_credentials(TOKEN)
        async with grpc.aio.secure_channel(
            f"localhost:{server.port}",
            grpc.composite_channel_credentials(credentials, call_credentials),
        ) as channel:
            action = await upload_action(channel, ["/bin/echo", "over tls"])
            _ops, response = await execute(channel, action, inline_stdout=True)
        assert response.result.stdout_raw == b"over tls\n"
    finally:
        server.stop()
