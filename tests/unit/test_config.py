"""Configuration: layering, secrets from files, validation errors that name key and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import config
from bridge.errors import ConfigError

ROOT = Path(__file__).parent.parent.parent


@pytest.mark.parametrize("name", ["bridge.dev.toml", "bridge.example.toml"])
def test_shipped_configs_are_valid(name):
    """The dev and the example config both load."""
    loaded = config.load(ROOT / "config" / name)
    assert "klient" in loaded.tenants


def test_dev_config_is_the_documented_local_default():
    """Tenant klient, user one, password dev-password, broker on loopback."""
    loaded = config.load(ROOT / "config" / "bridge.dev.toml")
    tenant = loaded.tenants["klient"]
    assert (tenant.username, tenant.password_values()) == ("one", ("dev-password",))
    assert "127.0.0.1" in loaded.broker.url.get_secret_value()


def test_defaults_apply_without_a_file():
    """Every key has a sensible default."""
    loaded = config.load(None)
    assert (loaded.receiver.port, loaded.ops.port, loaded.ops.host) == (8080, 9102, "127.0.0.1")
    assert loaded.broker.publish_timeout_seconds == 5
    assert loaded.broker.exchange_type == "topic"
    assert loaded.receiver.max_body_bytes == 262_144


def test_environment_beats_file_and_cli_beats_environment(tmp_path, monkeypatch):
    """defaults < TOML < BRIDGE_* env < command-line flags."""
    path = tmp_path / "b.toml"
    path.write_text('[receiver]\nport = 1000\n[log]\nlevel = "warning"\n')
    monkeypatch.setenv("BRIDGE_RECEIVER__PORT", "2000")
    monkeypatch.setenv("BRIDGE_OPS__PORT", "3000")
    monkeypatch.setenv("BRIDGE_BROKER__URL", "amqp://u:p@broker.internal:5673/vh")
    monkeypatch.setenv("BRIDGE_LOG__LEVEL", "error")
    loaded = config.load(path, overrides={"log": {"level": "debug"}})
    assert (loaded.receiver.port, loaded.ops.port) == (2000, 3000)
    assert loaded.broker.url.get_secret_value() == "amqp://u:p@broker.internal:5673/vh"
    assert loaded.log.level == "debug"


def test_tenant_keys_can_be_set_from_the_environment(monkeypatch):
    """Nested tenant settings take JSON values in BRIDGE_TENANTS__<KEY>__<FIELD>."""
    monkeypatch.setenv("BRIDGE_TENANTS__ACME__USERNAME", "one")
    monkeypatch.setenv("BRIDGE_TENANTS__ACME__PASSWORDS", '["a", "b"]')
    loaded = config.load(None)
    assert loaded.tenants["acme"].password_values() == ("a", "b")


def test_secrets_come_from_sibling_files(tmp_path):
    """passwords_file (one per line) and broker url_file, trailing newline dropped."""
    (tmp_path / "passwords").write_text("current\n\nprevious\n")
    (tmp_path / "url").write_text("amqp://u:secret@127.0.0.1:5672/\n")
    path = tmp_path / "b.toml"
    path.write_text(
        f'[broker]\nurl_file = "{tmp_path / "url"}"\n'
        f'[tenants.klient]\nusername = "one"\npasswords_file = "{tmp_path / "passwords"}"\n'
    )
    loaded = config.load(path)
    assert loaded.tenants["klient"].password_values() == ("current", "previous")
    assert loaded.broker.url.get_secret_value() == "amqp://u:secret@127.0.0.1:5672/"


def _error(path: Path | None = None, **overrides: object) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides=overrides or None)
    return str(info.value)


def test_error_names_key_and_file(tmp_path):
    """A bad value in the file names the dotted key and the file."""
    path = tmp_path / "b.toml"
    path.write_text("[broker]\npublish_timeout_seconds = -1\n")
    message = _error(path)
    assert "broker.publish_timeout_seconds" in message
    assert str(path) in message


def test_error_names_the_environment_variable(monkeypatch):
    """A bad value from the environment names the variable."""
    monkeypatch.setenv("BRIDGE_RECEIVER__PORT", "eighty")
    message = _error()
    assert "receiver.port" in message
    assert "env BRIDGE_RECEIVER__PORT" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[broker]\nurl = 'http://x/'\n", "broker.url"),
        ("[broker]\nnot_a_key = 1\n", "broker.not_a_key"),
        ("[receiver]\ntls_cert_file = '/nonexistent.pem'\n", "tls_key_file go together"),
        ("[tenants.klient]\nusername = 'one'\n", "needs passwords"),
        ("[tenants.klient]\npasswords = ['x']\n", "needs a username"),
        (
            "[tenants.klient]\nusername = 'one'\npasswords_file = '/nonexistent'\n",
            "cannot read passwords_file",
        ),
        ("[tenants.klient]\nauth = 'digest'\n", "tenants.klient.auth"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("broker = [\n", "invalid TOML"),
    ],
)
def test_invalid_files_are_refused_with_the_key(tmp_path, text, fragment):
    """Unknown keys, wrong types and missing credentials are all refused at load."""
    path = tmp_path / "b.toml"
    path.write_text(text)
    assert fragment in _error(path)


def test_missing_file_is_a_config_error(tmp_path):
    """A --config that does not exist is reported, not ignored."""
    assert "not found" in _error(tmp_path / "absent.toml")


def test_effective_config_masks_every_secret(tmp_path):
    """check-config output shows neither passwords nor the broker password."""
    path = tmp_path / "b.toml"
    path.write_text(
        '[broker]\nurl = "amqp://user:broker-secret@127.0.0.1/"\n'
        '[tenants.klient]\nusername = "one"\npasswords = ["callback-secret"]\n'
    )
    shown = repr(config.effective(config.load(path)))
    assert "broker-secret" not in shown
    assert "callback-secret" not in shown
    assert "user:***@127.0.0.1" in shown


def test_tenant_key_that_would_overflow_an_exchange_name_is_refused(tmp_path):
    """The key ends every exchange name (255 bytes at most): long keys fail at load."""
    path = tmp_path / "b.toml"
    path.write_text(f"[tenants.{'k' * 65}]\nauth = 'none'\n")
    assert "longer than 64" in _error(path)
