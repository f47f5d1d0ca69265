"""TLS and mutual TLS with certificates made here (the `cryptography` package), over
loopback: a TLS client is served, a plaintext client or one trusting another CA is not;
with a client CA configured, only clients with a certificate it signed get in."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraloop.client import LoraLoopClient, tls_credentials
from loraloop.core.settings import Settings
from loraloop.service.tls import TlsConfigError, server_credentials
from tests.support import InProcessServer, isolated_settings


@dataclass
class Pem:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    pem = Pem(out / f"{stem}.crt", out / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


def make_ca(out: Path, name: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _write(out, name, cert, key), cert, key


def make_leaf(
    out: Path,
    name: str,
    ca: tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey],
    server: bool,
) -> Pem:
    _, ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return _write(out, name, builder.sign(ca_key, hashes.SHA256()), key)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_ca: Pem
    stranger: Pem  # a client certificate from the other CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca = make_ca(out, "loraloop-test-ca")
    other = make_ca(out, "someone-else-ca")
    return Pki(
        ca=ca[0],
        server=make_leaf(out, "server", ca, server=True),
        client=make_leaf(out, "client", ca, server=False),
        other_ca=other[0],
        stranger=make_leaf(out, "stranger", other, server=False),
    )


def _settings(tmp: Path, **tls: Path) -> Settings:
    return isolated_settings(f"127.0.0.1:{_closed_port()}", tmp, max_new_tokens=8, **tls)


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    settings = _settings(
        tmp_path_factory.mktemp("tls"), tls_cert_file=pki.server.cert, tls_key_file=pki.server.key
    )
    server = InProcessServer(settings)
    yield server
    server.stop()


def _health(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="")
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def _fails(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as info:
        _health(channel)
    return info.value.code()


def test_tls_client_is_served_and_plaintext_is_not(pki: Pki, tls_server: InProcessServer) -> None:
    credentials = tls_credentials(str(pki.ca.cert))
    assert credentials is not None
    with LoraLoopClient(tls_server.target, timeout=60, credentials=credentials) as client:
        client.wait_ready()
        reply = client.generate("tina", "How do I cook rice?", max_tokens=4)
        assert reply.completion_tokens > 0
        assert client.feedback(reply.request_id, "tina", thumbs=1)
    code = _fails(grpc.insecure_channel(tls_server.target))
    assert code == grpc.StatusCode.UNAVAILABLE
    untrusted = grpc.ssl_channel_credentials(pki.other_ca.cert.read_bytes())
    assert _fails(grpc.secure_channel(tls_server.target, untrusted)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    print(f"\nTLS server on {tls_server.target}: TLS client OK, plaintext client: {code.name}")


def test_client_takes_tls_from_the_environment(
    pki: Pki, tls_server: InProcessServer, monkeypatch
) -> None:
    monkeypatch.setenv("LORALOOP_TLS_CA_FILE", str(pki.ca.cert))
    with LoraLoopClient(tls_server.target, timeout=60) as client:
        assert client.generate("tom", "Hello", max_tokens=4).request_id
    monkeypatch.setenv("LORALOOP_TLS_CLIENT_CERT_FILE", str(pki.client.cert))
    with pytest.raises(ValueError, match="LORALOOP_TLS_CLIENT_KEY_FILE"):
        tls_credentials()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(pki: Pki, tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_client_ca_file=pki.ca.cert,
    )
    server = InProcessServer(settings)
    try:
        mine = tls_credentials(str(pki.ca.cert), str(pki.client.cert), str(pki.client.key))
        with LoraLoopClient(server.target, timeout=60, credentials=mine) as client:
            assert client.generate("uma", "Hello", max_tokens=4).completion_tokens > 0
        ca = pki.ca.cert.read_bytes()
        no_cert = grpc.ssl_channel_credentials(ca)
        stranger = grpc.ssl_channel_credentials(
            ca, pki.stranger.key.read_bytes(), pki.stranger.cert.read_bytes()
        )
        refused = {
            "plaintext": _fails(grpc.insecure_channel(server.target)),
            "no client certificate": _fails(grpc.secure_channel(server.target, no_cert)),
            "certificate of another CA": _fails(grpc.secure_channel(server.target, stranger)),
        }
        print(f"\nmutual TLS refused: { {k: v.name for k, v in refused.items()} }")
        assert set(refused.values()) == {grpc.StatusCode.UNAVAILABLE}
    finally:
        server.stop()


def test_incomplete_tls_settings_say_what_to_fix(pki: Pki, tmp_path: Path) -> None:
    def error(**tls: Path) -> str:
        with pytest.raises(TlsConfigError) as info:
            server_credentials(_settings(tmp_path, **tls))
        return str(info.value)

    assert "LORALOOP_TLS_KEY_FILE" in error(tls_cert_file=pki.server.cert)
    assert "LORALOOP_TLS_CERT_FILE" in error(tls_client_ca_file=pki.ca.cert)
    missing = tmp_path / "missing.pem"
    assert "cannot be read" in error(tls_cert_file=missing, tls_key_file=pki.server.key)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    assert "not a PEM file" in error(tls_cert_file=not_pem, tls_key_file=pki.server.key)
    assert server_credentials(_settings(tmp_path)) is None  # plaintext: the local demo


def test_api_keys_without_tls_are_warned_about(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """API keys on and TLS off: a WARNING at start that the keys cross the network readable
    (never the key itself); with TLS, or without keys, no such warning."""
    key = "warn-" + secrets.token_urlsafe(24)
    cases = {
        "keys, plaintext": {"api_keys": f"{key}=*", "auth_required": True},
        "keys, TLS": {
            "api_keys": f"{key}=*",
            "auth_required": True,
            "tls_cert_file": pki.server.cert,
            "tls_key_file": pki.server.key,
        },
        "no keys, plaintext": {},
    }
    warned = {}
    for name, extra in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="loraloop.service.server"):
            settings = isolated_settings(
                f"127.0.0.1:{_closed_port()}", tmp_path / name.replace(" ", ""), **extra
            )
            InProcessServer(settings).stop(0)
        lines = [r for r in caplog.records if "TLS is off" in r.getMessage()]
        assert all(key not in r.getMessage() for r in caplog.records)
        warned[name] = [r.levelname for r in lines]
    print(f"\nstart-up warnings about keys in plaintext: {warned}")
    assert warned == {"keys, plaintext": ["WARNING"], "keys, TLS": [], "no keys, plaintext": []}
