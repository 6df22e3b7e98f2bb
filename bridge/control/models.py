"""Pure: the platform's webhook objects as frozen dataclasses, and their camelCase JSON.

Parsing (`from_json`) is tolerant of unknown extra fields and of missing optional ones (`id`,
`username`, `password`) and strict about everything else: a missing required field or a wrong
type raises ValueError naming the field (never its value: answers carry passwords in clear).
Serialising (`to_json`) is strict about what the platform requires on create and update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Self, TypeVar, cast, get_args

# A JSON document as orjson/aiohttp hand it over: parsed, still untrusted.
JsonObject = dict[str, object]

AuthType = Literal["NONE", "HTTP_BASIC"]
WebhookStatus = Literal["ACTIVE", "INACTIVE"]
AUTH_TYPES: tuple[AuthType, ...] = get_args(AuthType)
WEBHOOK_STATUSES: tuple[WebhookStatus, ...] = get_args(WebhookStatus)

_MASK = "***"
_Choice = TypeVar("_Choice", bound=str)
# Header names whose values are credentials in an example answer.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "apiauth", "cookie"})


# --- field readers: each error names the field path and the expected type, never the value --


def _object(value: object, where: str) -> JsonObject:
    if not isinstance(value, dict):
        raise ValueError(f"{where or 'document'}: expected a JSON object, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):  # pragma: no cover - JSON keys are always strings
            raise ValueError(f"{where}: object keys must be strings")
    return cast(JsonObject, value)


def _required(obj: JsonObject, key: str, where: str) -> object:
    if key not in obj:
        raise ValueError(f"{_path(where, key)}: required field is missing")
    return obj[key]


def _str(obj: JsonObject, key: str, where: str) -> str:
    value = _required(obj, key, where)
    if not isinstance(value, str):
        raise ValueError(f"{_path(where, key)}: expected a string, got {_kind(value)}")
    return value


def _optional_str(obj: JsonObject, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{_path(where, key)}: expected a string or null, got {_kind(value)}")


def _int(obj: JsonObject, key: str, where: str) -> int:
    value = _required(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_path(where, key)}: expected an integer, got {_kind(value)}")
    return value


def _optional_int(obj: JsonObject, key: str, where: str) -> int | None:
    """A field that must be present but may be null (nextPage: absent would end paging early)."""
    value = _required(obj, key, where)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_path(where, key)}: expected an integer or null, got {_kind(value)}")
    return value


def _list(obj: JsonObject, key: str, where: str) -> list[object]:
    value = _required(obj, key, where)
    if not isinstance(value, list):
        raise ValueError(f"{_path(where, key)}: expected an array, got {_kind(value)}")
    return cast(list[object], value)


def _choice(obj: JsonObject, key: str, where: str, choices: tuple[_Choice, ...]) -> _Choice:
    value = _str(obj, key, where)
    for choice in choices:
        if value == choice:
            return choice
    raise ValueError(f"{_path(where, key)}: expected one of {', '.join(choices)}")


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --- the platform's objects ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookType:
    """An event type and the exchange the platform names for it (`webhookType`)."""

    name: str
    exchange_name: str

    def to_json(self) -> JsonObject:
        return {"name": self.name, "exchangeName": self.exchange_name}

    @classmethod
    def from_json(cls, data: object, where: str = "") -> Self:
        obj = _object(data, where)
        return cls(_str(obj, "name", where), _str(obj, "exchangeName", where))


@dataclass(frozen=True, slots=True, repr=False)
class CallbackAuth:
    """How the platform authenticates its callbacks (`callbackAuthentication`).

    The repr never shows the password. For type NONE the credentials are meaningless to the
    platform ("ignored otherwise"): `from_json` drops them and `to_json` omits them.
    """

    type: AuthType
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.type not in AUTH_TYPES:
            raise ValueError(f"type: expected one of {', '.join(AUTH_TYPES)}")

    @classmethod
    def none(cls) -> Self:
        return cls("NONE")

    @classmethod
    def basic(cls, username: str, password: str) -> Self:
        return cls("HTTP_BASIC", username, password)

    def __repr__(self) -> str:
        password = None if self.password is None else _MASK
        return (
            f"CallbackAuth(type={self.type!r}, username={self.username!r}, password={password!r})"
        )

    def to_json(self) -> JsonObject:
        """Strict: HTTP_BASIC needs both credentials, as the platform requires on create/update."""
        if self.type == "NONE":
            return {"type": "NONE"}
        if self.username is None:
            raise ValueError("callbackAuthentication.username: required for HTTP_BASIC")
        if self.password is None:
            raise ValueError("callbackAuthentication.password: required for HTTP_BASIC")
        return {"type": self.type, "username": self.username, "password": self.password}

    @classmethod
    def from_json(cls, data: object, where: str = "") -> Self:
        obj = _object(data, where)
        auth_type = _choice(obj, "type", where, AUTH_TYPES)
        if auth_type == "NONE":
            return cls("NONE")
        return cls(
            auth_type,
            _optional_str(obj, "username", where),
            _optional_str(obj, "password", where),
        )


@dataclass(frozen=True, slots=True)
class Webhook:
    """One registration on the platform; `id` is None until the platform assigned one."""

    id: str | None
    name: str
    status: WebhookStatus
    webhook_type: WebhookType
    callback_url: str
    callback_auth: CallbackAuth

    def __post_init__(self) -> None:
        if self.status not in WEBHOOK_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(WEBHOOK_STATUSES)}")

    def to_json(self, *, include_id: bool = True) -> JsonObject:
        """The platform's JSON; `id` only when set and wanted (create sends none, update must)."""
        document: JsonObject = {}
        if include_id and self.id is not None:
            document["id"] = self.id
        document.update(
            {
                "name": self.name,
                "status": self.status,
                "webhookType": self.webhook_type.to_json(),
                "callbackUrl": self.callback_url,
                "callbackAuthentication": self.callback_auth.to_json(),
            }
        )
        return document

    @classmethod
    def from_json(cls, data: object, where: str = "") -> Self:
        obj = _object(data, where)
        return cls(
            id=_optional_str(obj, "id", where),
            name=_str(obj, "name", where),
            status=_choice(obj, "status", where, WEBHOOK_STATUSES),
            webhook_type=WebhookType.from_json(
                _required(obj, "webhookType", where), _path(where, "webhookType")
            ),
            callback_url=_str(obj, "callbackUrl", where),
            callback_auth=CallbackAuth.from_json(
                _required(obj, "callbackAuthentication", where),
                _path(where, "callbackAuthentication"),
            ),
        )


@dataclass(frozen=True, slots=True)
class WebhookPage:
    """One page of the list answer; `next_page` is None on the last page. Pages start at 1."""

    items: tuple[Webhook, ...]
    total_items: int
    page_number: int
    total_pages: int
    page_size: int
    next_page: int | None

    def to_json(self) -> JsonObject:
        return {
            "items": [item.to_json() for item in self.items],
            "totalItems": self.total_items,
            "pageNumber": self.page_number,
            "totalPages": self.total_pages,
            "pageSize": self.page_size,
            "nextPage": self.next_page,
        }

    @classmethod
    def from_json(cls, data: object, where: str = "") -> Self:
        obj = _object(data, where)
        items = _list(obj, "items", where)
        return cls(
            items=tuple(
                Webhook.from_json(item, f"{_path(where, 'items')}[{index}]")
                for index, item in enumerate(items)
            ),
            total_items=_int(obj, "totalItems", where),
            page_number=_int(obj, "pageNumber", where),
            total_pages=_int(obj, "totalPages", where),
            page_size=_int(obj, "pageSize", where),
            next_page=_optional_int(obj, "nextPage", where),
        )


@dataclass(frozen=True, slots=True, repr=False)
class ExampleResult:
    """What the platform sent to the callback URL for an example call.

    `request_headers` holds the Authorization header with the Basic credentials: the repr masks
    credential headers. `request_body` is the JSON text exactly as the platform sent it.
    """

    request_headers: dict[str, list[str]] = field(hash=False)
    request_body: str

    def __repr__(self) -> str:
        headers = {
            name: [_MASK] * len(values) if name.lower() in _SECRET_HEADERS else values
            for name, values in self.request_headers.items()
        }
        return f"ExampleResult(request_headers={headers!r}, request_body={self.request_body!r})"

    def to_json(self) -> JsonObject:
        return {
            "requestHeaders": {name: list(values) for name, values in self.request_headers.items()},
            "requestBody": self.request_body,
        }

    @classmethod
    def from_json(cls, data: object, where: str = "") -> Self:
        obj = _object(data, where)
        headers_where = _path(where, "requestHeaders")
        raw_headers = _object(_required(obj, "requestHeaders", where), headers_where)
        headers: dict[str, list[str]] = {}
        for name, values in raw_headers.items():
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{headers_where}.{name}: expected an array of strings")
            headers[name] = cast(list[str], values)
        return cls(headers, _str(obj, "requestBody", where))


def example_request_json(
    webhook_type: WebhookType, callback_url: str, callback_auth: CallbackAuth
) -> JsonObject:
    """The body of `POST /webhooks/example`."""
    return {
        "webhookType": webhook_type.to_json(),
        "callbackUrl": callback_url,
        "callbackAuthentication": callback_auth.to_json(),
    }


def webhook_types_from_json(data: object) -> list[WebhookType]:
    """The answer of `GET /webhooks/types`: an array of `{name, exchangeName}`."""
    if not isinstance(data, list):
        raise ValueError(f"types: expected an array, got {_kind(data)}")
    return [WebhookType.from_json(item, f"types[{index}]") for index, item in enumerate(data)]


def created_id_from_json(data: object) -> str:
    """The answer of `POST /webhooks`: `{"id": "<uuid>"}`."""
    webhook_id = _str(_object(data, ""), "id", "")
    if not webhook_id:
        raise ValueError("id: expected a non-empty string")
    return webhook_id
