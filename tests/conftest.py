"""Shared fixtures: configs, fresh metrics, and the real RabbitMQ for integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge import config
from bridge.metrics import Metrics

CASES = Path(__file__).parent / "cases"
DEV_USER, DEV_PASSWORD = "one", "dev-password"


@pytest.fixture(autouse=True)
def _clean_bridge_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A developer's BRIDGE_* variables must not leak into what a test configures; each test
    (and each bridge process it starts) gets a spool of its own."""
    for name in list(os.environ):
        if name.startswith("BRIDGE_") and name != "BRIDGE_TEST_AMQP_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("BRIDGE_SPOOL__DIR", str(tmp_path / "spool"))


def make_config(**sections: Any) -> config.Config:
    """A valid config: tenant klient with the dev credentials, loopback ports chosen by the OS."""
    base: dict[str, Any] = {
        "receiver": {"host": "127.0.0.1", "port": 0},
        "ops": {"host": "127.0.0.1", "port": 0},
        "tenants": {"klient": {"username": DEV_USER, "passwords": [DEV_PASSWORD]}},
    }
    for name, values in sections.items():
        # Tenants are replaced as a whole; the other sections are merged key by key.
        base[name] = values if name == "tenants" else {**base.get(name, {}), **values}
    return config.load(None, overrides=base)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


class ExternalBroker:
    """A broker the developer runs (BRIDGE_TEST_AMQP_URL); tests that stop it are skipped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tls_cert_file = None

    def stop_app(self) -> None:
        pytest.skip("BRIDGE_TEST_AMQP_URL is set: this test stops the broker")

    start_app = stop_app

    @property
    def tls_url(self) -> str:
        pytest.skip("BRIDGE_TEST_AMQP_URL is set: the amqps tests need the harness's own node")


def make_tls_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, the broker's TLS identity; the
    certificate is also what clients trust."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "broker.pem", directory / "broker.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real RabbitMQ for the whole run, on free loopback ports in a temp dir."""
    external = os.environ.get("BRIDGE_TEST_AMQP_URL")
    if external:
        yield ExternalBroker(external)
        return
    from bridge.devbroker import LocalBroker

    cert, key = make_tls_certificate(tmp_path_factory.mktemp("tls"))
    with LocalBroker(
        tmp_path_factory.mktemp("rabbitmq"), port=0, tls_cert_file=cert, tls_key_file=key
    ) as broker:
        yield broker
