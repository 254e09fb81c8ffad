"""TLS, mutual TLS and bearer tokens, against the real server process."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.actions import execute, upload_action
from tests.helpers import ServerProcess

TOKEN = "s3cret-token-for-tests"


@dataclass
class Pem:
    cert: bytes
    key: bytes


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def issue(common: str, issuer: Pem | None, san: bool = False) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.issuer_name(_name(common)).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        signer = key
    else:
        ca_cert = x509.load_pem_x509_certificate(issuer.cert)
        builder = builder.issuer_name(ca_cert.subject)
        signer = serialization.load_pem_private_key(issuer.key, None)  # type: ignore[assignment]
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(signer, hashes.SHA256())
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    files: dict[str, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = issue("reapi test CA", None)
    server, client = issue("reapi server", ca, san=True), issue("reapi client", ca)
    folder = tmp_path_factory.mktemp("pki")
    files = {}
    for name, data in [
        ("ca.pem", ca.cert),
        ("server.pem", server.cert),
        ("server.key", server.key),
        ("tokens", f"# ci\n{TOKEN}\n".encode()),
    ]:
        (folder / name).write_bytes(data)
        files[name] = folder / name
    return Pki(ca, server, client, files)


def tls_args(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.files["server.pem"]), "--tls-key", str(pki.files["server.key"])]


def capabilities(channel: grpc.Channel, token: str | None = None) -> re_pb2.ServerCapabilities:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    stub = re_grpc.CapabilitiesStub(channel)
    reply: re_pb2.ServerCapabilities = stub.GetCapabilities(
        re_pb2.GetCapabilitiesRequest(), metadata=metadata, timeout=10
    )
    return reply


def secure(server: ServerProcess, pki: Pki, client: Pem | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(f"localhost:{server.port}", credentials)


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
