"""A throwaway PKI for TLS tests: a CA, a server certificate for localhost, and
client certificates, made with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc
from tests.helpers import ServerProcess


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


def make_pki(folder: Path, tokens: str) -> Pki:
    """A CA, a server certificate, a client certificate ("reapi client") and a
    token file with `tokens`, under `folder`."""
    ca = issue("reapi test CA", None)
    server, client = issue("reapi server", ca, san=True), issue("reapi client", ca)
    files = {}
    for name, data in [
        ("ca.pem", ca.cert),
        ("server.pem", server.cert),
        ("server.key", server.key),
        ("tokens", tokens.encode()),
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
