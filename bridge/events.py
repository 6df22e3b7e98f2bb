"""Pure: turn a callback body into a WebhookEvent and pick the exchange it goes to."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import orjson

from bridge.errors import InvalidBody

# AMQP short strings (message_id, type, routing key) hold at most 255 bytes.
MAX_SHORT_STRING_BYTES = 255
# No callback nests deeper; and the stdlib parser of the repeated-key check recurses, so a
# deeper body would take it to Python's recursion limit.
MAX_NESTING_DEPTH = 256
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))

UNROUTED_EXCHANGE = "one-bridge.unrouted"
UNKNOWN_TYPE_LABEL = "unknown"
_ZERO_UUID = "00000000-0000-0000-0000-000000000000"
_ZERO_UUID_BYTES = _ZERO_UUID.encode()

# The platform's documented type -> exchangeName table, with the tenant key as suffix.
_DOCUMENTED_EXCHANGE_STEMS = MappingProxyType(
    {
        "CartOpened": "p-u-o-m-e-c-cartopened-",
        "ClientLogged": "p-u-o-m-e-c-clientlogged-",
        "OfferOpened": "p-u-o-m-e-o-offeropened-",
    }
)
KNOWN_EVENT_TYPES = tuple(_DOCUMENTED_EXCHANGE_STEMS)


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One accepted callback; `body` is the request body exactly as received."""

    tenant: str
    event_type: str
    event_id: str
    body: bytes
    received_at: float  # unix seconds
    # Sent by the platform's "example" call: never treated as a duplicate (see is_example_body).
    is_example: bool = False


def documented_exchanges(tenant: str) -> dict[str, str]:
    """The documented type -> exchangeName table for a tenant."""
    return {event_type: stem + tenant for event_type, stem in _DOCUMENTED_EXCHANGE_STEMS.items()}


def parse_event(body: bytes, *, tenant: str, received_at: float) -> WebhookEvent:
    """Validate the fields the bridge relies on; the body itself is kept untouched."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidBody(f"body is not valid JSON ({exc.msg})") from None
    if not isinstance(document, dict):
        raise InvalidBody("body is not a JSON object")
    if body.count(b"[") + body.count(b"{") > MAX_NESTING_DEPTH and _nests_deeper_than(
        body, MAX_NESTING_DEPTH
    ):
        raise InvalidBody(f"body nests deeper than {MAX_NESTING_DEPTH} levels")
    if _may_repeat_a_key(body):
        _refuse_repeated_keys(body)
    event_type = _short_string(document, "type")
    event_id = _short_string(document, "eventId")
    # Cheap test first: an example's bytes hold "example" or the zero UUID, unless escaped.
    might_be_example = b"example" in body or _ZERO_UUID_BYTES in body or b"\\u" in body
    is_example = might_be_example and is_example_body(document)
    return WebhookEvent(tenant, event_type, event_id, body, received_at, is_example=is_example)


def is_example_body(document: Mapping[str, object]) -> bool:
    """The platform's example call sends tenantKey "example" and all-zero ids.

    Either sign is enough: a real event has neither, and an example swallowed as a duplicate
    would make a working registration look broken.
    """
    if document.get("tenantKey") == "example":
        return True
    ids = [
        value
        for key, value in document.items()
        if key.endswith("Id") and key != "eventId" and isinstance(value, str)
    ]
    return bool(ids) and all(_is_zero_id(value) for value in ids)


def _is_zero_id(value: str) -> bool:
    return value.rpartition(":")[2] == _ZERO_UUID


def _may_repeat_a_key(body: bytes) -> bool:
    # orjson keeps the last of repeated keys, a consumer's parser may keep the first: the body
    # travels untouched, so both must agree. Cheap test first; escapes could spell a key too.
    return body.count(b'"type"') > 1 or body.count(b'"eventId"') > 1 or b"\\u" in body


def _nests_deeper_than(body: bytes, limit: int) -> bool:
    """Whether a valid JSON text nests past `limit`: its brackets outside strings, in order."""
    depth = 0
    for bracket in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        if bracket in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _refuse_repeated_keys(body: bytes) -> None:
    top_level: list[list[tuple[str, object]]] = []

    def keep(pairs: list[tuple[str, object]]) -> dict[str, object]:
        top_level.append(pairs)  # the outermost object is the last one completed
        return dict(pairs)

    json.loads(body, object_pairs_hook=keep)
    keys = [key for key, _ in top_level[-1]]
    for field in ("type", "eventId"):
        if keys.count(field) > 1:
            raise InvalidBody(f"field {field!r} appears more than once")


def _short_string(document: Mapping[str, object], field: str) -> str:
    value = document.get(field)
    if value is None:
        raise InvalidBody(f"field {field!r} is missing")
    if not isinstance(value, str):
        raise InvalidBody(f"field {field!r} is not a string")
    if not value:
        raise InvalidBody(f"field {field!r} is empty")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise InvalidBody(f"field {field!r} is not valid UTF-8") from None
    if size > MAX_SHORT_STRING_BYTES:
        raise InvalidBody(f"field {field!r} is longer than {MAX_SHORT_STRING_BYTES} bytes")
    return value


class RoutingTable:
    """Which exchange each (tenant, event type) goes to.

    Precedence: the tenant's explicit `exchanges` config, then what the platform reports for the
    tenant (filled in at run time), then the documented table.
    """

    def __init__(self, overrides: Mapping[str, Mapping[str, str]]) -> None:
        self._overrides = {tenant: dict(table) for tenant, table in overrides.items()}
        self._platform: dict[str, dict[str, str]] = {}

    def set_platform_exchanges(self, tenant: str, table: Mapping[str, str]) -> None:
        self._platform[tenant] = dict(table)

    def table_for(self, tenant: str) -> dict[str, str]:
        return {
            **documented_exchanges(tenant),
            **self._platform.get(tenant, {}),
            **self._overrides.get(tenant, {}),
        }

    def exchange_for(self, tenant: str, event_type: str) -> str | None:
        """The exchange for a known type, or None when the tenant does not know the type."""
        for table in (self._overrides, self._platform):
            exchange = table.get(tenant, {}).get(event_type)
            if exchange is not None:
                return exchange
        stem = _DOCUMENTED_EXCHANGE_STEMS.get(event_type)
        return None if stem is None else stem + tenant

    def all_exchanges(self, tenants: list[str]) -> set[str]:
        return {exchange for tenant in tenants for exchange in self.table_for(tenant).values()}
