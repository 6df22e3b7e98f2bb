"""Configuration: defaults < TOML file < BRIDGE_* environment < CLI flags, validated once at load.

Secrets are SecretStr and may come from a sibling `<key>_file` (systemd credentials, mounted
Kubernetes secrets). Nothing here does network I/O or logs.
"""

from __future__ import annotations

import os
import tomllib
from base64 import b64encode
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from yarl import URL

from bridge.errors import ConfigError
from bridge.redact import redact_url

ENV_PREFIX = "BRIDGE_"
MAX_TENANT_KEY_CHARS = 64
ENV_NESTING = "__"

_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("toml_data", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def read_secret_file(path: Path, key: str) -> str:
    """A secret file's content without its trailing newline."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read {key} ({exc.strerror}: {path})") from None


class QueueBinding(_Section):
    exchange: str = Field(min_length=1, max_length=255)
    routing_key: str = Field(default="#", max_length=255)


class QueueConfig(_Section):
    """A durable queue declared and bound at start, so events are kept before any consumer."""

    name: str = Field(min_length=1, max_length=255)
    queue_type: Literal["quorum", "classic"] = "quorum"
    bindings: tuple[QueueBinding, ...] = ()
    # Passed to queue.declare as they are: x-max-length, x-overflow, x-dead-letter-exchange, ...
    arguments: dict[str, str | int | bool] = Field(default_factory=dict)


class BrokerConfig(_Section):
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    url_file: Path | None = None
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    # "fast": our own frame-level publisher; "aio-pika": the library's, kept selectable.
    publisher: Literal["fast", "aio-pika"] = "fast"
    publish_timeout_seconds: PositiveFloat = 5.0
    connect_timeout_seconds: PositiveFloat = 5.0
    reconnect_interval_seconds: PositiveFloat = 1.0
    heartbeat_seconds: int = Field(default=30, ge=0, le=3600)
    max_in_flight: PositiveInt = 1024
    queues: tuple[QueueConfig, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _url_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("url_file"):
            data = {**data, "url": read_secret_file(Path(data["url_file"]), "broker.url_file")}
        return data

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        url = URL(value.get_secret_value())
        if url.scheme not in ("amqp", "amqps") or not url.host:
            raise ValueError("must be an amqp:// or amqps:// URL with a host")
        return value


class ReceiverConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: PositiveInt = 262_144
    body_timeout_seconds: PositiveFloat = 10.0
    # A connection must finish a request's headers this fast (slow-header attacks).
    header_timeout_seconds: PositiveFloat = 10.0
    # An idle keep-alive connection is closed after this (the sender reconnects).
    keepalive_timeout_seconds: PositiveFloat = 75.0
    # Connections beyond this are closed at once, before file descriptors run out.
    max_connections: PositiveInt = 4096
    shutdown_timeout_seconds: PositiveFloat = 10.0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> ReceiverConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file not found: {path}")
        return self


class OpsConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=9102, ge=0, le=65535)


class SpoolConfig(_Section):
    """Durable outbox for events the broker did not confirm in time."""

    dir: Path = Path("/var/lib/one-bridge/spool")
    max_bytes: PositiveInt = 1024**3
    max_events: PositiveInt = 1_000_000
    replay_batch_size: PositiveInt = 256
    # A record the broker refuses this often (returned, channel error) is set aside.
    max_attempts: PositiveInt = 5


class DedupeConfig(_Section):
    """Window of recently accepted eventIds per tenant; 0 in either key turns it off."""

    window_seconds: float = Field(default=600.0, ge=0)
    max_events: int = Field(default=100_000, ge=0)


class ControlConfig(_Section):
    """Keeps the platform's webhook registrations pointing at this bridge (off without base_url)."""

    # The platform's API, e.g. https://api-preprod.one.unity.pl (production differs per customer).
    base_url: str | None = None
    # The public URL of this bridge's receiver, as the platform must call it.
    callback_base_url: str | None = None
    interval_seconds: PositiveFloat = 300.0
    # Webhooks whose name starts with this are ours; no other webhook is ever touched.
    name_prefix: str = Field(default="one-bridge:", min_length=3)
    timeout_seconds: PositiveFloat = 10.0
    # After every change, and every canary_interval_seconds (0: only after changes), ask the
    # platform for an example callback per registration and check that it arrived.
    canary_interval_seconds: float = Field(default=900.0, ge=0)
    canary_timeout_seconds: PositiveFloat = 15.0
    # One reconciler across replicas: an exclusive RabbitMQ queue named after this.
    lock_name: str = Field(default="default", min_length=1, max_length=100)

    @field_validator("base_url", "callback_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _both_urls(self) -> ControlConfig:
        if self.base_url and not self.callback_base_url:
            raise ValueError("base_url needs callback_base_url (where the platform calls us)")
        return self

    @property
    def is_enabled(self) -> bool:
        return self.base_url is not None


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class TenantConfig(_Section):
    """One ONe tenant: how its callbacks authenticate and where its events go."""

    auth: Literal["basic", "none"] = "basic"
    username: str | None = None
    # The first password is the current one; the others are still accepted during a rotation.
    passwords: tuple[SecretStr, ...] = ()
    passwords_file: Path | None = None
    exchanges: dict[str, str] = Field(default_factory=dict)
    # The platform's management API key for this tenant (control module only).
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    # Event types to register at the platform; empty: every type the platform lists.
    types: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("passwords_file"):
            text = read_secret_file(Path(data["passwords_file"]), "passwords_file")
            lines = [line.strip() for line in text.splitlines()]
            data = {**data, "passwords": [line for line in lines if line]}
        if isinstance(data, dict) and data.get("api_key_file"):
            data = {**data, "api_key": read_secret_file(Path(data["api_key_file"]), "api_key_file")}
        return data

    @model_validator(mode="after")
    def _credentials(self) -> TenantConfig:
        if self.auth == "basic":
            if not self.username:
                raise ValueError("auth = 'basic' needs a username")
            if not self.passwords:
                raise ValueError("auth = 'basic' needs passwords or passwords_file")
            if any(not p.get_secret_value() for p in self.passwords):
                raise ValueError("passwords must not be empty")
            if ":" in self.username:
                raise ValueError("username must not contain ':' (Basic auth)")
        return self

    @field_validator("exchanges")
    @classmethod
    def _exchange_names(cls, value: dict[str, str]) -> dict[str, str]:
        for event_type, exchange in value.items():
            if not event_type or not exchange or len(exchange.encode()) > 255:
                raise ValueError(f"invalid exchange name for type {event_type!r}")
        return value

    def password_values(self) -> tuple[str, ...]:
        return tuple(p.get_secret_value() for p in self.passwords)


class _TomlSource(PydanticBaseSettingsSource):
    """The already-parsed TOML file, below the environment in precedence."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _toml_data.get() or {}


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTING,
        extra="forbid",
        frozen=True,
    )

    # "auto": uvloop when installed (it is a dependency on Linux), else asyncio's own loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    broker: BrokerConfig = BrokerConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    ops: OpsConfig = OpsConfig()
    spool: SpoolConfig = SpoolConfig()
    dedupe: DedupeConfig = DedupeConfig()
    control: ControlConfig = ControlConfig()
    log: LogConfig = LogConfig()
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSource(settings_cls)

    @field_validator("tenants")
    @classmethod
    def _tenant_keys(cls, value: dict[str, TenantConfig]) -> dict[str, TenantConfig]:
        for key in value:
            if not key or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in key):
                raise ValueError(f"tenant key {key!r} may hold only letters, digits, '-', '_', '.'")
            if len(key) > MAX_TENANT_KEY_CHARS:
                # It ends every exchange name, and those hold at most 255 bytes.
                raise ValueError(f"tenant key is longer than {MAX_TENANT_KEY_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _control_keys(self) -> Config:
        if self.control.is_enabled:
            missing = [key for key, tenant in self.tenants.items() if tenant.api_key is None]
            if missing:
                raise ValueError(
                    f"control.base_url is set: tenants {', '.join(missing)} need api_key"
                    " or api_key_file"
                )
        return self


def load(
    path: Path | None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate the configuration; ConfigError names the key and its source.

    `overrides` are the CLI flags, as nested sections (e.g. {"log": {"level": "debug"}}).
    """
    data = _read_toml(path) if path is not None else {}
    _refuse_unknown_environment(os.environ)
    token = _toml_data.set(data)
    try:
        return Config(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, data, os.environ, overrides or {})) from None
    except SettingsError as exc:
        # A complex value (list, table) in an environment variable that is not valid JSON.
        field = str(exc).partition('field "')[2].partition('"')[0] or "?"
        prefix = f"{ENV_PREFIX}{field}".upper()
        names = sorted(name for name in os.environ if name.upper().startswith(prefix))
        raise ConfigError(
            f"{field} (from env {', '.join(names) or ENV_PREFIX + field.upper()}):"
            " value is not valid JSON"
        ) from None
    finally:
        _toml_data.reset(token)


# BRIDGE_* variables that are not settings: the config path, and the test suite's broker.
_NON_SETTING_VARIABLES = frozenset({"BRIDGE_CONFIG", "BRIDGE_TEST_AMQP_URL"})


def _refuse_unknown_environment(environ: Mapping[str, str]) -> None:
    """A misspelt section (BRIDGE_RECEIVR__PORT) would otherwise be ignored without a word."""
    sections = {name.upper() for name in Config.model_fields}
    unknown = sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in _NON_SETTING_VARIABLES
        and name.upper()[len(ENV_PREFIX) :].partition(ENV_NESTING)[0] not in sections
    )
    if unknown:
        raise ConfigError(
            f"unknown setting in the environment: {', '.join(unknown)}"
            f" (sections: {', '.join(sorted(s.lower() for s in sections))})"
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _describe(
    exc: ValidationError,
    path: Path | None,
    data: Mapping[str, Any],
    environ: Mapping[str, str],
    overrides: Mapping[str, Any],
) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        keys = [str(part) for part in error["loc"] if not isinstance(part, int)]
        source = _source_of(keys, path, data, environ, overrides)
        lines.append(f"{'.'.join(keys) or '(top level)'} (from {source}): {error['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _source_of(
    keys: list[str],
    path: Path | None,
    data: Mapping[str, Any],
    environ: Mapping[str, str],
    overrides: Mapping[str, Any],
) -> str:
    if not keys:
        return str(path) if path is not None else "the configuration as a whole"
    if keys[0] in overrides:
        return "command line"
    # The most specific environment variable that sets this key, a parent or a child of it.
    lowered = {name.lower(): name for name in environ}
    for depth in range(len(keys), 0, -1):
        name = (ENV_PREFIX + ENV_NESTING.join(keys[:depth])).lower()
        if name in lowered:
            return f"env {lowered[name]}"
    prefix = (ENV_PREFIX + ENV_NESTING.join(keys) + ENV_NESTING).lower()
    children = sorted(original for name, original in lowered.items() if name.startswith(prefix))
    if children:
        return "env " + ", ".join(children) + (f" over {path}" if path else "")
    node: Any = data
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            break
        node = node[key]
    else:
        return str(path)
    if keys and path is not None and keys[0] in data:
        return str(path)
    return "defaults"


def effective(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, every secret masked (for check-config)."""
    return config.model_dump(mode="json") | {
        "broker": {
            **config.broker.model_dump(mode="json", exclude={"url"}),
            "url": redact_url(config.broker.url.get_secret_value()),
        }
    }


def secret_values(config: Config) -> list[str]:
    """Every secret the configuration holds, with the forms it travels in (for log scrubbing)."""
    values: list[str] = []
    url = URL(config.broker.url.get_secret_value())
    if url.password:
        values.append(url.password)
    for tenant in config.tenants.values():
        for password in tenant.password_values():
            values.append(password)
            if tenant.username:
                basic = b64encode(f"{tenant.username}:{password}".encode()).decode()
                values.append(basic)
        if tenant.api_key is not None:
            values.append(tenant.api_key.get_secret_value())
    return values
