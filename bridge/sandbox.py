"""Stand-in ONe platform: the documented webhook management API, callback firing, fault knobs.

`build_sandbox_app()` serves the management API under `API_PREFIX` with in-memory state per tenant
(`one-tenant` header, `ApiAuth` key), really POSTs example and "live" callbacks to registered
`callbackUrl`s, and has sandbox-only control endpoints under `/sandbox` (fire events, inject
faults, reset). Like the real platform it returns callback passwords in clear text in list and get
answers; it never logs or prints them, nor any configured API key (only the public dev key is
announced). It imports aiohttp and the stdlib only, never the `bridge` package, so a bug in our
models or client cannot hide in the fake. Where the platform's behaviour is undocumented, the
choice made here is marked "undocumented" next to the code.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
JsonObject = dict[str, JsonValue]

API_PREFIX: Final = "/api/v1/webhooks/integrations/auth-required"
CONTROL_PREFIX: Final = "/sandbox"
DEV_API_KEY: Final = "dev-api-key"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8090

STATUSES: Final = ("ACTIVE", "INACTIVE")
AUTH_TYPES: Final = ("NONE", "HTTP_BASIC")
# The documented types; each exchange name is this prefix plus the tenant key.
DOCUMENTED_TYPES: Final[Mapping[str, str]] = {
    "CartOpened": "p-u-o-m-e-c-cartopened-",
    "ClientLogged": "p-u-o-m-e-c-clientlogged-",
    "OfferOpened": "p-u-o-m-e-o-offeropened-",
}
# Id fields per type, in wire order. CartOpened is documented; the other two are guesses
# (undocumented). Deliberately a copy of bridge.sender's table: this module imports no bridge code.
ID_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "CartOpened": ("cartId", "clientId"),
    "ClientLogged": ("clientId",),
    "OfferOpened": ("offerId", "clientId"),
}
UNKNOWN_TYPE_ID_FIELDS: Final = ("clientId",)
ZERO_ID: Final = "00000000-0000-0000-0000-000000000000"
EXAMPLE_TENANT_KEY: Final = "example"  # the documented example body's tenantKey
CALLBACK_ACCEPT: Final = "application/json, application/cbor, application/*+json"
# aiohttp adds these by default; the platform's documented callback request has neither.
_SKIP_AUTO_HEADERS: Final = ("User-Agent", "Accept-Encoding")

# Limits the platform does not document; chosen so a client that does not page is caught early.
MAX_PAGE_SIZE: Final = 100
MIN_SEARCH_CHARS: Final = 3
MAX_FIRE_COUNT: Final = 1000
DEFAULT_CALLBACK_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_MAX_RECORDED_CALLS: Final = 1000

logger = logging.getLogger(__name__)


# --- errors: each one is an HTTP answer --------------------------------------------------------


class SandboxError(Exception):
    """A request the sandbox refuses; `response()` is its JSON answer (no secret in it)."""

    status: int = 500
    error: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status
            self.error = _error_code(status)
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body: JsonObject = {"error": self.error, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return web.json_response(body, status=self.status, headers=self.headers)


class InvalidInput(SandboxError, ValueError):
    """400: a field is missing or wrong; `field` names it (dotted path)."""

    status = 400
    error = "bad_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)


class UnknownWebhook(SandboxError, LookupError):
    """404: no webhook with this id for this tenant."""

    status = 404
    error = "not_found"

    def __init__(self) -> None:
        super().__init__("no webhook with this id for this tenant")


def _error_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One management API call as the sandbox saw it; `status` None when no answer was sent."""

    method: str
    path: str
    tenant: str | None
    status: int | None


@dataclass(frozen=True)
class Delivery:
    """One callback the sandbox sent; `status` None (and `error` set) when no answer came."""

    webhook_id: str
    event_id: str
    status: int | None
    error: str | None

    def as_json(self) -> JsonObject:
        return {
            "webhookId": self.webhook_id,
            "eventId": self.event_id,
            "status": self.status,
            "error": self.error,
        }


# --- faults -------------------------------------------------------------------------------------


@dataclass
class Faults:
    """Fault switches for the management API (never for `/sandbox/*`, so they can be cleared).

    `fail_status` is answered to the next `fail_times` calls (None: every call until cleared), then
    clears itself; 429 comes with `Retry-After: 1`. `delay_seconds` delays every answer.
    `types_path_404` makes `/webhooks/types` answer 404 and `/webhooks/type` work.
    """

    delay_seconds: float = 0.0
    fail_status: int | None = None
    fail_times: int | None = 1
    types_path_404: bool = False

    def __post_init__(self) -> None:
        if self.delay_seconds < 0:
            raise InvalidInput("delay_seconds", "must be 0 or more")
        if self.fail_status is not None and not 400 <= self.fail_status <= 599:
            raise InvalidInput("fail_status", "must be an HTTP error status (400-599) or null")
        if self.fail_times is not None and self.fail_times < 1:
            raise InvalidInput("fail_times", "must be at least 1, or null for every call")

    def take_failure(self) -> int | None:
        """The status this call must fail with, if any; counts it against `fail_times`."""
        status = self.fail_status
        if status is None or self.fail_times is None:
            return status
        self.fail_times -= 1
        if self.fail_times <= 0:
            self.fail_status, self.fail_times = None, 1
        return status

    def updated(self, changes: Mapping[str, JsonValue]) -> Faults:
        """A copy with `changes` (JSON names) applied; InvalidInput names a bad key or value.

        Setting `fail_status` without `fail_times` means "the next call only".
        """
        unknown = sorted(set(changes) - set(_FAULT_FIELDS))
        if unknown:
            raise InvalidInput(unknown[0], f"unknown fault; known: {', '.join(_FAULT_FIELDS)}")
        fail_times = changes.get("fail_times", 1 if "fail_status" in changes else self.fail_times)
        return Faults(
            delay_seconds=_number(
                changes.get("delay_seconds", self.delay_seconds), "delay_seconds"
            ),
            fail_status=_optional_int(changes.get("fail_status", self.fail_status), "fail_status"),
            fail_times=_optional_int(fail_times, "fail_times"),
            types_path_404=_flag(changes.get("types_path_404", self.types_path_404)),
        )

    def as_json(self) -> JsonObject:
        return {
            "delay_seconds": self.delay_seconds,
            "fail_status": self.fail_status,
            "fail_times": self.fail_times,
            "types_path_404": self.types_path_404,
        }


_FAULT_FIELDS: Final = ("delay_seconds", "fail_status", "fail_times", "types_path_404")


def _number(value: JsonValue, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, "must be a number")
    return float(value)


def _optional_int(value: JsonValue, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, "must be an integer or null")
    return value


def _flag(value: JsonValue) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput("types_path_404", "must be true or false")
    return value


# --- state --------------------------------------------------------------------------------------


class SandboxState:
    """Everything the sandbox knows, per tenant, in memory; tests read and change it directly.

    The direct methods (`put_webhook`, `edit_webhook`, `remove_webhook`) skip validation on
    purpose: they stand for a human editing in BackOffice or a database, so tests can plant drift.
    Every read returns copies, so a test cannot change the state by accident.
    """

    def __init__(
        self,
        *,
        api_keys: Mapping[str, str] | None = None,
        default_api_key: str | None = DEV_API_KEY,
        faults: Faults | None = None,
        callback_timeout_seconds: float = DEFAULT_CALLBACK_TIMEOUT_SECONDS,
        max_recorded_calls: int = DEFAULT_MAX_RECORDED_CALLS,
    ) -> None:
        self.faults = faults or Faults()
        self.calls: deque[Call] = deque(maxlen=max_recorded_calls)
        self.callback_timeout_seconds = callback_timeout_seconds
        self._api_keys = dict(api_keys or {})
        self._default_api_key = default_api_key
        self._webhooks: dict[str, dict[str, JsonObject]] = {}
        self._extra_types: dict[str, dict[str, str]] = {}

    # auth

    def is_authorized(self, tenant: str, api_key: str) -> bool:
        """A configured tenant needs its own key; any other tenant the default key (if any)."""
        expected = self._api_keys.get(tenant, self._default_api_key)
        if not tenant or expected is None:
            return False
        return hmac.compare_digest(api_key.encode(), expected.encode())

    # types

    def type_table(self, tenant: str) -> dict[str, str]:
        """Type name -> exchange name for the tenant: the documented three plus added ones."""
        table = {name: prefix + tenant for name, prefix in DOCUMENTED_TYPES.items()}
        table.update(self._extra_types.get(tenant, {}))
        return table

    def types(self, tenant: str) -> list[JsonObject]:
        """What `GET /webhooks/types` answers for the tenant."""
        return [{"name": n, "exchangeName": e} for n, e in self.type_table(tenant).items()]

    def add_type(self, tenant: str, name: str, exchange_name: str) -> None:
        """Give one tenant an extra webhook type (the platform may add types at any time)."""
        if not name.strip():
            raise InvalidInput("name", "required, a non-empty string")
        if not exchange_name.strip():
            raise InvalidInput("exchangeName", "required, a non-empty string")
        if name in self.type_table(tenant):
            raise InvalidInput("name", f"type {name!r} already exists for this tenant")
        self._extra_types.setdefault(tenant, {})[name] = exchange_name

    # webhooks

    def webhooks(self, tenant: str) -> list[JsonObject]:
        """The tenant's webhooks in creation order, passwords included (copies)."""
        return copy.deepcopy(list(self._store(tenant).values()))

    def webhook(self, tenant: str, webhook_id: str) -> JsonObject | None:
        found = self._store(tenant).get(webhook_id)
        return copy.deepcopy(found) if found is not None else None

    def put_webhook(self, tenant: str, webhook: Mapping[str, JsonValue]) -> str:
        """Store a webhook as given (no validation); keeps its `id` or assigns a uuid4."""
        given = webhook.get("id")
        webhook_id = given if isinstance(given, str) else str(uuid.uuid4())
        stored: JsonObject = {"id": webhook_id}
        stored.update((key, copy.deepcopy(value)) for key, value in webhook.items() if key != "id")
        self._store(tenant)[webhook_id] = stored
        return webhook_id

    def edit_webhook(
        self, tenant: str, webhook_id: str, changes: Mapping[str, JsonValue]
    ) -> JsonObject:
        """Merge `changes` into a webhook (nested objects merged too), like a BackOffice edit."""
        stored = self._store(tenant).get(webhook_id)
        if stored is None:
            raise UnknownWebhook()
        if "id" in changes:
            raise InvalidInput("id", "cannot be changed; put_webhook() a new one instead")
        _deep_merge(stored, changes)
        return copy.deepcopy(stored)

    def remove_webhook(self, tenant: str, webhook_id: str) -> bool:
        return self._store(tenant).pop(webhook_id, None) is not None

    def _store(self, tenant: str) -> dict[str, JsonObject]:
        return self._webhooks.setdefault(tenant, {})

    # calls

    def record(self, call: Call) -> None:
        self.calls.append(call)

    def count_calls(
        self, method: str | None = None, path: str | None = None, tenant: str | None = None
    ) -> int:
        """Recorded calls matching every given criterion (`path` is the full request path)."""
        return sum(
            1
            for call in self.calls
            if (method is None or call.method == method)
            and (path is None or call.path == path)
            and (tenant is None or call.tenant == tenant)
        )

    def reset(self) -> None:
        """Forget everything: webhooks and added types of every tenant, faults, recorded calls."""
        self._webhooks.clear()
        self._extra_types.clear()
        self.faults = Faults()
        self.calls.clear()

    # callbacks

    async def fire(
        self, tenant: str, event_type: str, *, count: int = 1, webhook_id: str | None = None
    ) -> list[Delivery]:
        """Play the platform: `count` events of a type, each sent to every ACTIVE webhook of it.

        Each event gets fresh ids, eventId and timestamp, and goes with the same body to every
        matching webhook (one event, many subscribers; the platform's real fan-out is
        undocumented). `webhook_id` narrows the targets to that webhook. INACTIVE webhooks get
        nothing. Deliveries come back event by event, in webhook creation order.
        """
        targets = self._fire_targets(tenant, event_type, count=count, webhook_id=webhook_id)
        deliveries: list[Delivery] = []
        if not targets:
            return deliveries
        async with self._callback_session() as session:
            for _ in range(count):
                event_id = str(uuid.uuid4())
                body = new_callback_body(event_type, tenant_key=tenant, event_id=event_id)
                sends = (
                    self._send_to(session, tenant, target, body, event_id) for target in targets
                )
                deliveries += await asyncio.gather(*sends)
        return deliveries

    def _fire_targets(
        self, tenant: str, event_type: str, *, count: int, webhook_id: str | None
    ) -> list[JsonObject]:
        if event_type not in self.type_table(tenant):
            raise InvalidInput("type", f"unknown webhook type {event_type!r} for this tenant")
        if not 1 <= count <= MAX_FIRE_COUNT:
            raise InvalidInput("count", f"must be between 1 and {MAX_FIRE_COUNT}")
        if webhook_id is not None and webhook_id not in self._store(tenant):
            raise UnknownWebhook()
        return [
            webhook
            for webhook in self.webhooks(tenant)
            if webhook.get("status") == "ACTIVE"
            and _type_name(webhook) == event_type
            and webhook_id in (None, webhook.get("id"))
        ]

    async def _send_to(
        self,
        session: aiohttp.ClientSession,
        tenant: str,
        webhook: JsonObject,
        body: bytes,
        event_id: str,
    ) -> Delivery:
        auth = webhook.get("callbackAuthentication")
        headers = callback_headers(tenant, auth if isinstance(auth, dict) else {})
        status, error = await deliver(session, str(webhook.get("callbackUrl")), headers, body)
        return Delivery(str(webhook.get("id")), event_id, status, error)

    async def send_example(
        self, tenant: str, event_type: str, callback_url: str, auth: Mapping[str, JsonValue]
    ) -> JsonObject:
        """Send the documented example callback; answer what was sent, plus how it went.

        The example's answer for a failed callback is undocumented. We always answer 200 with
        what was sent, plus `callbackStatus` (the status it got, null without an answer) and,
        when it was not 2xx, `callbackError`: a client can show both and nothing is hidden.
        """
        event_id = str(uuid.uuid4())
        body = example_callback_body(event_type, event_id=event_id)
        headers = callback_headers(tenant, auth)
        async with self._callback_session() as session:
            status, error = await deliver(session, callback_url, headers, body)
        sent = {**headers, "Content-Length": str(len(body))}
        answer: JsonObject = {
            "requestHeaders": {name: [value] for name, value in sent.items()},
            "requestBody": body.decode(),
            "callbackStatus": status,
        }
        if error is not None:
            answer["callbackError"] = error
        return answer

    def _callback_session(self) -> aiohttp.ClientSession:
        # One short-lived session per batch: the sandbox has no lifecycle to hang a shared one on
        # when tests call fire() directly.
        timeout = aiohttp.ClientTimeout(total=self.callback_timeout_seconds)
        return aiohttp.ClientSession(timeout=timeout, skip_auto_headers=_SKIP_AUTO_HEADERS)


def _deep_merge(target: JsonObject, changes: Mapping[str, JsonValue]) -> None:
    for key, value in changes.items():
        current = target.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            _deep_merge(current, value)
        else:
            target[key] = copy.deepcopy(value)


def _type_name(webhook: JsonObject) -> JsonValue:
    webhook_type = webhook.get("webhookType")
    return webhook_type.get("name") if isinstance(webhook_type, dict) else None


SANDBOX_STATE: Final = web.AppKey("sandbox_state", SandboxState)


# --- callbacks (pure parts) ---------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """The platform's timestamp format: UTC, microseconds, `Z` (2023-02-22T04:32:51.014160Z)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def callback_body(
    event_type: str, *, tenant_key: str, ids: Mapping[str, str], event_id: str, timestamp: str
) -> bytes:
    """A callback body as the platform puts it on the wire: Jackson-style pretty JSON, `" : "`.

    Field order: type, tenantKey, the ids, eventId, timestamp; no trailing newline.
    """
    payload = {"type": event_type, "tenantKey": tenant_key, **ids}
    payload.update(eventId=event_id, timestamp=timestamp)
    return json.dumps(payload, indent=2, separators=(",", " : "), ensure_ascii=False).encode()


def _id_fields(event_type: str) -> tuple[str, ...]:
    return ID_FIELDS.get(event_type, UNKNOWN_TYPE_ID_FIELDS)


def _id_value(name: str, value: str) -> str:
    return f"org:{value}" if name == "clientId" else value  # client ids carry an `org:` prefix


def example_callback_body(event_type: str, *, event_id: str, now: datetime | None = None) -> bytes:
    """The example endpoint's body: tenantKey "example", all-zero ids, the given eventId."""
    ids = {name: _id_value(name, ZERO_ID) for name in _id_fields(event_type)}
    timestamp = format_timestamp(now or datetime.now(UTC))
    return callback_body(
        event_type, tenant_key=EXAMPLE_TENANT_KEY, ids=ids, event_id=event_id, timestamp=timestamp
    )


def new_callback_body(event_type: str, *, tenant_key: str, event_id: str) -> bytes:
    """A realistic body: fresh uuid4 ids, the tenant's key, the current time."""
    ids = {name: _id_value(name, str(uuid.uuid4())) for name in _id_fields(event_type)}
    timestamp = format_timestamp(datetime.now(UTC))
    return callback_body(
        event_type, tenant_key=tenant_key, ids=ids, event_id=event_id, timestamp=timestamp
    )


def callback_headers(tenant: str, auth: Mapping[str, JsonValue]) -> dict[str, str]:
    """The documented callback headers, in documented order (Content-Length comes from aiohttp)."""
    headers = {"Accept": CALLBACK_ACCEPT}
    if auth.get("type") == "HTTP_BASIC":
        credentials = f"{auth.get('username') or ''}:{auth.get('password') or ''}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    headers["one-tenant"] = tenant
    headers["Content-Type"] = "application/json"
    return headers


async def deliver(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str], body: bytes
) -> tuple[int | None, str | None]:
    """POST one callback: (status, None) on 2xx, (status, error) otherwise, (None, error) without
    an answer. Never raises for I/O; the error text holds no URL, header or body."""
    try:
        # Redirects are not followed: whether the platform does is undocumented, and a 3xx is
        # more useful to see than to hide.
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as answer:
            status = answer.status
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        return None, f"no answer from callbackUrl: {_error_kind(exc)}"
    if 200 <= status < 300:
        return status, None
    return status, f"callbackUrl answered {status}"


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid_url"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns_error"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "tls_error"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection_refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server_disconnected"
    return "connection_error"


# --- validation (pure; raises InvalidInput naming the field) ------------------------------------


def validate_webhook(body: Mapping[str, JsonValue], types: Mapping[str, str]) -> JsonObject:
    """The stored form (no id) of a create or update body, in the documented field order.

    Unknown fields are dropped. For `NONE` authentication username and password are "ignored"
    as documented: not stored, so list and get show only `{"type": "NONE"}` (undocumented).
    """
    return {
        "status": _one_of(body, "status", STATUSES, "status"),
        "name": _text(body, "name", "name"),
        "webhookType": validate_type(body.get("webhookType"), types),
        "callbackUrl": validate_url(body.get("callbackUrl")),
        "callbackAuthentication": validate_auth(body.get("callbackAuthentication")),
    }


def validate_type(value: JsonValue, types: Mapping[str, str]) -> JsonObject:
    """`webhookType` must name one of the tenant's types with that type's exchange name.

    Whether the platform checks the exchange name is undocumented; we do, since a mismatch means
    events would land on an exchange nobody binds.
    """
    webhook_type = _object(value, "webhookType")
    name = _text(webhook_type, "name", "webhookType.name")
    exchange_name = _text(webhook_type, "exchangeName", "webhookType.exchangeName")
    if name not in types:
        known = ", ".join(types)
        raise InvalidInput("webhookType.name", f"unknown type {name!r}; this tenant has {known}")
    if types[name] != exchange_name:
        raise InvalidInput(
            "webhookType.exchangeName", f"{name} must use exchangeName {types[name]!r}"
        )
    return {"name": name, "exchangeName": exchange_name}


def validate_url(value: JsonValue) -> str:
    """An absolute http(s) URL without credentials in it (they belong in the authentication)."""
    url = _text({"callbackUrl": value}, "callbackUrl", "callbackUrl")
    try:
        parts = urlsplit(url)
        has_credentials = parts.username is not None or parts.password is not None
        is_valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        is_valid, has_credentials = False, False
    if not is_valid:
        raise InvalidInput("callbackUrl", "must be an absolute http:// or https:// URL")
    if has_credentials:
        raise InvalidInput(
            "callbackUrl", "must not contain credentials; use callbackAuthentication"
        )
    return url


def validate_auth(value: JsonValue) -> JsonObject:
    """`callbackAuthentication`: type NONE, or HTTP_BASIC with a username and a password."""
    auth = _object(value, "callbackAuthentication")
    auth_type = _one_of(auth, "type", AUTH_TYPES, "callbackAuthentication.type")
    if auth_type == "NONE":
        return {"type": "NONE"}
    username = _text(auth, "username", "callbackAuthentication.username")
    password = auth.get("password")
    if not isinstance(password, str) or not password:
        # The message never repeats the value: it is a password.
        raise InvalidInput("callbackAuthentication.password", "required for HTTP_BASIC")
    return {"type": auth_type, "username": username, "password": password}


def _object(value: JsonValue, field: str) -> JsonObject:
    if not isinstance(value, dict):
        raise InvalidInput(field, "required, a JSON object")
    return value


def _text(body: Mapping[str, JsonValue], key: str, field: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(field, "required, a non-empty string")
    return value


def _one_of(body: Mapping[str, JsonValue], key: str, allowed: tuple[str, ...], field: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidInput(field, f"required, one of {', '.join(allowed)}")
    return value


def page_query(query: Mapping[str, str]) -> tuple[int, int, str | None]:
    """pageNumber (from 1), pageSize (1..MAX_PAGE_SIZE) and the optional search (>= 3 chars).

    Both numbers are required: the documentation always sends them, and a default would hide a
    client that forgets (the platform's own default, if any, is undocumented).
    """
    page_number = _positive_int(query.get("pageNumber"), "pageNumber", maximum=None)
    page_size = _positive_int(query.get("pageSize"), "pageSize", maximum=MAX_PAGE_SIZE)
    search = query.get("search")
    if search is not None and len(search) < MIN_SEARCH_CHARS:
        raise InvalidInput("search", f"must be at least {MIN_SEARCH_CHARS} characters")
    return page_number, page_size, search


def _positive_int(value: str | None, field: str, *, maximum: int | None) -> int:
    if value is None or not (value.isascii() and value.isdigit()):
        raise InvalidInput(field, "required, a whole number from 1")
    number = int(value)
    if number < 1 or (maximum is not None and number > maximum):
        limit = f"between 1 and {maximum}" if maximum is not None else "at least 1"
        raise InvalidInput(field, f"must be {limit}")
    return number


def page_of(items: list[JsonObject], page_number: int, page_size: int) -> JsonObject:
    """One page in the documented shape; a page past the end is empty, `nextPage` null."""
    total_pages = -(-len(items) // page_size)  # 0 when there are no items (undocumented)
    start = (page_number - 1) * page_size
    page: list[JsonValue] = list(items[start : start + page_size])
    return {
        "items": page,
        "totalItems": len(items),
        "pageNumber": page_number,
        "totalPages": total_pages,
        "pageSize": page_size,
        "nextPage": page_number + 1 if page_number < total_pages else None,
    }


def _matches(webhook: JsonObject, search: str | None) -> bool:
    if search is None:
        return True
    name = webhook.get("name")
    return isinstance(name, str) and search.casefold() in name.casefold()


# --- request helpers ----------------------------------------------------------------------------


def _context(request: web.Request) -> tuple[SandboxState, str]:
    # The auth middleware has already checked that one-tenant is there.
    return request.config_dict[SANDBOX_STATE], request.headers["one-tenant"]


async def _json_object(request: web.Request, *, require_json_type: bool = True) -> JsonObject:
    # The documented API gets Content-Type checked (the doc's PUT example forgets it: a client
    # copying that must fail here, not in production). The /sandbox controls are lenient for curl.
    if require_json_type and not _is_json_media_type(request.content_type):
        raise SandboxError("Content-Type must be application/json", status=415)
    try:
        value = json.loads(await request.read())
    except ValueError:
        raise InvalidInput("body", "not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInput("body", "must be a JSON object")
    return value


def _is_json_media_type(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def _not_found(message: str) -> SandboxError:
    return SandboxError(message, status=404)


# --- management API handlers --------------------------------------------------------------------


async def _list_webhooks(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    page_number, page_size, search = page_query(request.query)
    # Creation order: the platform's order is undocumented, a stable one makes paging testable.
    items = [webhook for webhook in state.webhooks(tenant) if _matches(webhook, search)]
    return web.json_response(page_of(items, page_number, page_size))


async def _create_webhook(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    body = await _json_object(request)
    # A null id is what a client's model serialises for "no id yet": tolerated.
    if body.get("id") is not None:
        raise InvalidInput("id", "must not be given on create; PUT /webhooks updates")
    webhook = validate_webhook(body, state.type_table(tenant))
    return web.json_response({"id": state.put_webhook(tenant, webhook)})


async def _update_webhook(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    body = await _json_object(request)
    webhook_id = _text(body, "id", "id")
    if state.webhook(tenant, webhook_id) is None:
        raise UnknownWebhook()
    webhook = validate_webhook(body, state.type_table(tenant))
    state.put_webhook(tenant, {"id": webhook_id, **webhook})
    # The real answer to PUT is undocumented (clients treat any 2xx as success); we answer 200
    # with the stored webhook.
    return web.json_response(state.webhook(tenant, webhook_id))


async def _get_webhook(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    webhook = state.webhook(tenant, request.match_info["webhook_id"])
    if webhook is None:
        raise UnknownWebhook()
    return web.json_response(webhook)


async def _delete_webhook(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    if not state.remove_webhook(tenant, request.match_info["webhook_id"]):
        raise UnknownWebhook()
    # The real answer to DELETE is undocumented (clients treat any 2xx as success): 204 here,
    # so a client that insists on 200 or on a body is caught.
    return web.Response(status=204)


async def _list_types(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    if state.faults.types_path_404:
        raise _not_found("no such path (types_path_404 is on; try /webhooks/type)")
    return web.json_response(state.types(tenant))


async def _list_types_singular(request: web.Request) -> web.Response:
    # The doc's prose names `/webhooks/type`; only one of the two paths works at a time, so a
    # client's primary path and its fallback are each observable.
    state, tenant = _context(request)
    if not state.faults.types_path_404:
        raise UnknownWebhook()  # what `/webhooks/{id}` with id "type" would answer
    return web.json_response(state.types(tenant))


async def _send_example(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    body = await _json_object(request)
    webhook_type = validate_type(body.get("webhookType"), state.type_table(tenant))
    callback_url = validate_url(body.get("callbackUrl"))
    auth = validate_auth(body.get("callbackAuthentication"))
    answer = await state.send_example(tenant, str(webhook_type["name"]), callback_url, auth)
    return web.json_response(answer)


# --- sandbox control handlers -------------------------------------------------------------------


async def _fire(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    body = await _json_object(request, require_json_type=False)
    event_type = _text(body, "type", "type")
    count = body.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidInput("count", f"must be a whole number between 1 and {MAX_FIRE_COUNT}")
    webhook_id = body.get("webhookId")
    if webhook_id is not None and not isinstance(webhook_id, str):
        raise InvalidInput("webhookId", "must be a string")
    deliveries = await state.fire(tenant, event_type, count=count, webhook_id=webhook_id)
    return web.json_response([delivery.as_json() for delivery in deliveries])


async def _get_faults(request: web.Request) -> web.Response:
    state, _ = _context(request)
    return web.json_response(state.faults.as_json())


async def _set_faults(request: web.Request) -> web.Response:
    state, _ = _context(request)
    changes = await _json_object(request, require_json_type=False)
    state.faults = state.faults.updated(changes)
    return web.json_response(state.faults.as_json())


async def _reset(request: web.Request) -> web.Response:
    state, _ = _context(request)
    state.reset()
    return web.Response(status=204)


async def _add_type(request: web.Request) -> web.Response:
    state, tenant = _context(request)
    body = await _json_object(request, require_json_type=False)
    name = _text(body, "name", "name")
    state.add_type(tenant, name, _text(body, "exchangeName", "exchangeName"))
    return web.json_response(state.types(tenant))


# --- middlewares --------------------------------------------------------------------------------


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, SandboxError | web.HTTPException):
        return exc.status
    return 500 if isinstance(exc, Exception) else None  # None: cancelled, nothing was answered


@web.middleware
async def _log_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    # One line per request: method, path and status only. Never headers (ApiAuth, Authorization)
    # or bodies (callback passwords), and no query string.
    try:
        response = await handler(request)
    except BaseException as exc:
        logger.info("%s %s %s", request.method, request.path, _status_of(exc))
        raise
    logger.info("%s %s %s", request.method, request.path, response.status)
    return response


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SandboxError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own 404/405: same JSON shape as ours, keeping headers such as Allow.
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        return SandboxError(exc.reason, status=exc.status, headers=headers).response()


@web.middleware
async def _record_calls(request: web.Request, handler: Handler) -> web.StreamResponse:
    status: int | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except BaseException as exc:
        status = _status_of(exc)
        raise
    finally:
        call = Call(request.method, request.path, request.headers.get("one-tenant"), status)
        request.config_dict[SANDBOX_STATE].record(call)


@web.middleware
async def _inject_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.config_dict[SANDBOX_STATE]
    if state.faults.delay_seconds > 0:
        await asyncio.sleep(state.faults.delay_seconds)
    # Read faults again after the delay: a test may have changed them meanwhile.
    status = state.faults.take_failure()
    if status is not None:
        headers = {"Retry-After": "1"} if status == 429 else None
        raise SandboxError("injected by the sandbox (fail_status)", status=status, headers=headers)
    return await handler(request)


@web.middleware
async def _require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.config_dict[SANDBOX_STATE]
    tenant = request.headers.get("one-tenant", "")
    if not tenant:
        raise SandboxError("the one-tenant header is required", status=401)
    if not state.is_authorized(tenant, request.headers.get("ApiAuth", "")):
        raise SandboxError("missing or wrong ApiAuth key for this tenant", status=401)
    return await handler(request)


# --- application --------------------------------------------------------------------------------


def build_sandbox_app(
    *,
    api_keys: Mapping[str, str] | None = None,
    default_api_key: str | None = DEV_API_KEY,
    faults: Faults | None = None,
    callback_timeout_seconds: float = DEFAULT_CALLBACK_TIMEOUT_SECONDS,
    max_recorded_calls: int = DEFAULT_MAX_RECORDED_CALLS,
) -> web.Application:
    """The sandbox as an aiohttp app; its state is `app[SANDBOX_STATE]`.

    `api_keys` maps a tenant to the only key it accepts; any other tenant accepts
    `default_api_key` (None: unconfigured tenants are refused).
    """
    state = SandboxState(
        api_keys=api_keys,
        default_api_key=default_api_key,
        faults=faults,
        callback_timeout_seconds=callback_timeout_seconds,
        max_recorded_calls=max_recorded_calls,
    )
    app = web.Application(middlewares=[_log_requests, _json_errors])
    app[SANDBOX_STATE] = state
    app.add_subapp(API_PREFIX, _management_api())
    app.add_subapp(CONTROL_PREFIX, _control_api())
    return app


def _management_api() -> web.Application:
    # Faults come before the key check: a gateway's 500 or 429 does not look at credentials.
    api = web.Application(middlewares=[_record_calls, _inject_faults, _require_api_key])
    api.router.add_get("/webhooks", _list_webhooks)
    api.router.add_post("/webhooks", _create_webhook)
    api.router.add_put("/webhooks", _update_webhook)
    # Fixed paths before `{webhook_id}`, which would otherwise swallow them.
    api.router.add_get("/webhooks/types", _list_types)
    api.router.add_get("/webhooks/type", _list_types_singular)
    api.router.add_post("/webhooks/example", _send_example)
    api.router.add_get("/webhooks/{webhook_id}", _get_webhook)
    api.router.add_delete("/webhooks/{webhook_id}", _delete_webhook)
    return api


def _control_api() -> web.Application:
    control = web.Application(middlewares=[_require_api_key])
    control.router.add_post("/fire", _fire)
    control.router.add_get("/faults", _get_faults)
    control.router.add_post("/faults", _set_faults)
    control.router.add_post("/reset", _reset)
    control.router.add_post("/types", _add_type)
    return control


# --- serving ------------------------------------------------------------------------------------


def _print_line(line: str) -> None:
    print(line, flush=True)


async def serve_sandbox(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_keys: Mapping[str, str] | None = None,
    default_api_key: str | None = DEV_API_KEY,
    announce: Callable[[str], None] = _print_line,
) -> None:
    """Serve the sandbox until cancelled; announce one line with the URL (and the dev key only)."""
    app = build_sandbox_app(api_keys=api_keys, default_api_key=default_api_key)
    # Our middleware writes the only log line per request; aiohttp's access log is off.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        announce(_announcement(_base_url(runner.addresses[0]), default_api_key))
        await asyncio.Event().wait()  # runs until the caller cancels
    finally:
        await runner.cleanup()


def _base_url(address: Sequence[object]) -> str:
    # IPv4 addresses are (host, port); IPv6 ones (host, port, flowinfo, scope_id).
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


def _announcement(url: str, default_api_key: str | None) -> str:
    # No key is ever shown: the dev key is named by where it is written down.
    if default_api_key == DEV_API_KEY:
        key = "ApiAuth: the dev key of config/bridge.dev.toml, for any one-tenant"
    else:
        key = "ApiAuth as configured (not shown)"
    return f"ONe sandbox on {url} (API under {API_PREFIX}; {key})"


__all__ = [
    "API_PREFIX",
    "CONTROL_PREFIX",
    "DEV_API_KEY",
    "SANDBOX_STATE",
    "Call",
    "Delivery",
    "Faults",
    "InvalidInput",
    "SandboxError",
    "SandboxState",
    "UnknownWebhook",
    "build_sandbox_app",
    "callback_body",
    "callback_headers",
    "example_callback_body",
    "format_timestamp",
    "page_of",
    "serve_sandbox",
    "validate_webhook",
]
