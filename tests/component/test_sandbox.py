"""The stand-in ONe platform over HTTP: documented API, callbacks it sends, and its fault knobs."""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import logging
import re
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import CASES

from bridge import sandbox
from bridge.sandbox import API_PREFIX, DEV_API_KEY, SANDBOX_STATE, Faults, SandboxState

WEBHOOKS = f"{API_PREFIX}/webhooks"
TENANT = "klient"
PLANTED_KEY = "planted-api-KEY-9f3c"
PLANTED_PASSWORD = "planted-s3cret-Pa55word"
ACCEPT = "application/json, application/cbor, application/*+json"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
ZERO = "00000000-0000-0000-0000-000000000000"

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


def exchange(event_type: str, tenant: str = TENANT) -> str:
    """The documented exchange names, written out here rather than taken from the sandbox."""
    prefix = {
        "CartOpened": "p-u-o-m-e-c-cartopened-",
        "ClientLogged": "p-u-o-m-e-c-clientlogged-",
        "OfferOpened": "p-u-o-m-e-o-offeropened-",
    }[event_type]
    return prefix + tenant


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def webhook_body(
    tenant: str = TENANT,
    *,
    name: str = "New sale",
    event_type: str = "CartOpened",
    status: str = "ACTIVE",
    callback_url: str = "https://hooks.example.test/one",
    auth: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "status": status,
        "webhookType": {"name": event_type, "exchangeName": exchange(event_type, tenant)},
        "callbackUrl": callback_url,
        "callbackAuthentication": auth
        if auth is not None
        else {"type": "HTTP_BASIC", "username": "admin", "password": PLANTED_PASSWORD},
    }


@dataclass
class Sandbox:
    """A test client on the sandbox app, sending the platform's headers by default."""

    client: TestClient[Any, Any]
    state: SandboxState

    async def call(
        self,
        method: str,
        path: str,
        *,
        tenant: str | None = TENANT,
        api_key: str | None = DEV_API_KEY,
        **kwargs: Any,
    ) -> aiohttp.ClientResponse:
        headers: dict[str, str] = {"accept": "*/*", **kwargs.pop("headers", {})}
        if tenant is not None:
            headers["one-tenant"] = tenant
        if api_key is not None:
            headers["ApiAuth"] = api_key
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def create(self, tenant: str = TENANT, **overrides: Any) -> str:
        response = await self.call(
            "POST", WEBHOOKS, tenant=tenant, json=webhook_body(tenant, **overrides)
        )
        assert response.status == 200, await response.text()
        return str((await response.json())["id"])

    async def page(self, **params: Any) -> dict[str, Any]:
        response = await self.call("GET", WEBHOOKS, params=params)
        assert response.status == 200, await response.text()
        return dict(await response.json())


@pytest.fixture
async def sb(aiohttp_client: ClientFactory) -> Sandbox:
    app = sandbox.build_sandbox_app()
    return Sandbox(await aiohttp_client(app), app[SANDBOX_STATE])


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]
    header_names: tuple[str, ...]
    body: bytes


@dataclass
class Receiver:
    """An in-test callback receiver: records every request, answers `status`."""

    status: int = 200
    requests: list[Recorded] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Recorded(
                path=request.path,
                headers=dict(request.headers),
                header_names=tuple(name.lower() for name in request.headers),
                body=await request.read(),
            )
        )
        return web.Response(status=self.status, text="ok")

    async def start(self, aiohttp_server: ServerFactory) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        server = await aiohttp_server(app)
        return str(server.make_url("/hook"))

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(recorded.body) for recorded in self.requests]


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting is refused, no race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


async def error_field(response: aiohttp.ClientResponse) -> str | None:
    body = await response.json()
    assert set(body) >= {"error", "message"}
    return body.get("field")


# --- types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["klient", "acme"])
async def test_types_are_the_documented_three_ending_in_the_tenant_key(sb: Sandbox, tenant: str):
    """GET /webhooks/types answers the documented table for the caller's tenant."""
    response = await sb.call("GET", f"{WEBHOOKS}/types", tenant=tenant)

    assert response.status == 200
    assert await response.json() == [
        {"name": name, "exchangeName": exchange(name, tenant)}
        for name in ("CartOpened", "ClientLogged", "OfferOpened")
    ]


async def test_types_path_switch_moves_the_list_to_the_singular_path(sb: Sandbox):
    """Off: only /types works. On: /types is 404 and /type (the doc's prose) answers the list."""
    assert (await sb.call("GET", f"{WEBHOOKS}/type")).status == 404
    listed = await (await sb.call("GET", f"{WEBHOOKS}/types")).json()

    sb.state.faults.types_path_404 = True

    missing = await sb.call("GET", f"{WEBHOOKS}/types")
    assert missing.status == 404
    assert (await missing.json())["error"] == "not_found"
    fallback = await sb.call("GET", f"{WEBHOOKS}/type")
    assert fallback.status == 200
    assert await fallback.json() == listed


async def test_extra_types_are_per_tenant_and_usable(sb: Sandbox):
    """A type added for one tenant is listed and accepted for it alone."""
    added = await sb.call(
        "POST", "/sandbox/types", json={"name": "OrderPlaced", "exchangeName": "p-orders-klient"}
    )
    assert added.status == 200
    sb.state.add_type("acme", "Other", "p-other-acme")

    klient = await (await sb.call("GET", f"{WEBHOOKS}/types")).json()
    acme = await (await sb.call("GET", f"{WEBHOOKS}/types", tenant="acme")).json()
    assert {"name": "OrderPlaced", "exchangeName": "p-orders-klient"} in klient
    assert [t["name"] for t in acme] == ["CartOpened", "ClientLogged", "OfferOpened", "Other"]

    body = webhook_body()
    body["webhookType"] = {"name": "OrderPlaced", "exchangeName": "p-orders-klient"}
    assert (await sb.call("POST", WEBHOOKS, json=body)).status == 200
    assert (await sb.call("POST", WEBHOOKS, tenant="acme", json=body)).status == 400
    again = await sb.call(
        "POST", "/sandbox/types", json={"name": "OrderPlaced", "exchangeName": "x"}
    )
    assert again.status == 400


# --- create, read, update, delete ----------------------------------------------------------------


async def test_created_webhook_is_readable_with_its_password_in_clear(sb: Sandbox):
    """POST answers a uuid4 id; GET and the list return the webhook as stored, password included."""
    response = await sb.call("POST", WEBHOOKS, json=webhook_body())
    assert response.status == 200
    answer = await response.json()
    assert set(answer) == {"id"}
    assert uuid.UUID(answer["id"]).version == 4

    got = await sb.call("GET", f"{WEBHOOKS}/{answer['id']}")
    assert got.status == 200
    expected = {"id": answer["id"], **webhook_body()}
    assert await got.json() == expected
    assert list(await got.json()) == [
        "id", "status", "name", "webhookType", "callbackUrl", "callbackAuthentication",
    ]  # fmt: skip
    assert (await sb.page(pageNumber=1, pageSize=10))["items"] == [expected]
    assert sb.state.webhooks(TENANT) == [expected]


async def test_none_authentication_drops_username_and_password(sb: Sandbox):
    """With type NONE, username and password are ignored, as documented."""
    auth = {"type": "NONE", "username": "admin", "password": PLANTED_PASSWORD}
    webhook_id = await sb.create(auth=auth)

    stored = await (await sb.call("GET", f"{WEBHOOKS}/{webhook_id}")).json()
    assert stored["callbackAuthentication"] == {"type": "NONE"}


def _without(path: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = body
        for parent in parents:
            target = target[parent]
        del target[last]

    return change


def _setting(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = body
        for parent in parents:
            target = target[parent]
        target[last] = value

    return change


INVALID_WEBHOOKS = [
    ("name", _without("name")),
    ("name", _setting("name", "  ")),
    ("name", _setting("name", 7)),
    ("status", _without("status")),
    ("status", _setting("status", "active")),
    ("webhookType", _without("webhookType")),
    ("webhookType", _setting("webhookType", "CartOpened")),
    ("webhookType.name", _without("webhookType.name")),
    ("webhookType.name", _setting("webhookType.name", "CartClosed")),
    ("webhookType.exchangeName", _without("webhookType.exchangeName")),
    ("webhookType.exchangeName", _setting("webhookType.exchangeName", "p-u-o-m-e-c-cartopened-x")),
    ("callbackUrl", _without("callbackUrl")),
    ("callbackUrl", _setting("callbackUrl", "ftp://hooks.example.test/")),
    ("callbackUrl", _setting("callbackUrl", "/relative/only")),
    ("callbackUrl", _setting("callbackUrl", "https://user:pw@hooks.example.test/")),
    ("callbackAuthentication", _without("callbackAuthentication")),
    ("callbackAuthentication.type", _without("callbackAuthentication.type")),
    ("callbackAuthentication.type", _setting("callbackAuthentication.type", "BEARER")),
    ("callbackAuthentication.username", _without("callbackAuthentication.username")),
    ("callbackAuthentication.password", _without("callbackAuthentication.password")),
    ("callbackAuthentication.password", _setting("callbackAuthentication.password", "")),
]


@pytest.mark.parametrize(("field_name", "change"), INVALID_WEBHOOKS)
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_invalid_webhook_is_400_naming_the_field(
    sb: Sandbox, method: str, field_name: str, change: Callable[[dict[str, Any]], None]
):
    """Create and update reject each bad or missing field, name it, and store nothing."""
    body = webhook_body()
    if method == "PUT":
        body["id"] = await sb.create(name="original")
    change(body)

    response = await sb.call(method, WEBHOOKS, json=body)

    assert response.status == 400
    assert await error_field(response) == field_name
    assert PLANTED_PASSWORD not in await response.text()
    names = [webhook["name"] for webhook in sb.state.webhooks(TENANT)]
    assert names == (["original"] if method == "PUT" else [])


@pytest.mark.parametrize(
    ("data", "content_type", "status", "field_name"),
    [
        (b"{not json", "application/json", 400, "body"),
        (b"[1, 2]", "application/json", 400, "body"),
        (json.dumps(webhook_body()).encode(), "text/plain", 415, None),
        (
            json.dumps({**webhook_body(), "id": str(uuid.uuid4())}).encode(),
            "application/json",
            400,
            "id",
        ),
    ],
)
async def test_create_rejects_bad_bodies(
    sb: Sandbox, data: bytes, content_type: str, status: int, field_name: str | None
):
    """Not JSON, not an object, not declared as JSON, or carrying an id: refused."""
    response = await sb.call("POST", WEBHOOKS, data=data, headers={"Content-Type": content_type})

    assert response.status == status
    assert await error_field(response) == field_name
    assert sb.state.webhooks(TENANT) == []


async def test_update_replaces_the_webhook_and_answers_it(sb: Sandbox):
    """PUT with the id in the body answers 200 with the updated webhook; GET agrees."""
    webhook_id = await sb.create()
    body = {
        "id": webhook_id,
        **webhook_body(name="Renamed", status="INACTIVE", auth={"type": "NONE"}),
    }

    response = await sb.call("PUT", WEBHOOKS, json=body)

    assert response.status == 200
    assert await response.json() == body
    assert await (await sb.call("GET", f"{WEBHOOKS}/{webhook_id}")).json() == body


async def test_update_needs_a_known_id_in_the_body(sb: Sandbox):
    """No id is 400 naming it; an unknown id is 404."""
    missing = await sb.call("PUT", WEBHOOKS, json=webhook_body())
    assert missing.status == 400
    assert await error_field(missing) == "id"

    unknown = await sb.call("PUT", WEBHOOKS, json={"id": str(uuid.uuid4()), **webhook_body()})
    assert unknown.status == 404
    assert (await unknown.json())["error"] == "not_found"


async def test_delete_answers_204_then_the_webhook_is_gone(sb: Sandbox):
    """DELETE is 204 with no body; afterwards GET and DELETE are 404."""
    webhook_id = await sb.create()

    deleted = await sb.call("DELETE", f"{WEBHOOKS}/{webhook_id}")

    assert deleted.status == 204
    assert await deleted.read() == b""
    assert (await sb.call("GET", f"{WEBHOOKS}/{webhook_id}")).status == 404
    assert (await sb.call("DELETE", f"{WEBHOOKS}/{webhook_id}")).status == 404
    assert sb.state.webhooks(TENANT) == []


async def test_unknown_ids_are_404_with_a_json_body(sb: Sandbox):
    """GET and DELETE of an id that never existed: 404, JSON error."""
    for method in ("GET", "DELETE"):
        response = await sb.call(method, f"{WEBHOOKS}/{uuid.uuid4()}")
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"


# --- listing -------------------------------------------------------------------------------------


async def test_25_webhooks_page_by_10_into_3_pages(sb: Sandbox):
    """Pages start at 1, nextPage points at the next one and is null on the last."""
    ids = [await sb.create(name=f"hook {n:02}") for n in range(25)]

    pages = [await sb.page(pageNumber=n, pageSize=10) for n in (1, 2, 3)]

    assert [len(page["items"]) for page in pages] == [10, 10, 5]
    assert [page["nextPage"] for page in pages] == [2, 3, None]
    assert [page["pageNumber"] for page in pages] == [1, 2, 3]
    assert all(page["totalItems"] == 25 for page in pages)
    assert all(page["totalPages"] == 3 for page in pages)
    assert all(page["pageSize"] == 10 for page in pages)
    assert [item["id"] for page in pages for item in page["items"]] == ids
    assert list(pages[0]) == [
        "items", "totalItems", "pageNumber", "totalPages", "pageSize", "nextPage",
    ]  # fmt: skip


async def test_page_past_the_end_and_empty_list(sb: Sandbox):
    """No webhooks: no items, no pages, no next page; past the last page: empty items."""
    empty = await sb.page(pageNumber=1, pageSize=10)
    assert empty == {
        "items": [], "totalItems": 0, "pageNumber": 1, "totalPages": 0, "pageSize": 10,
        "nextPage": None,
    }  # fmt: skip

    await sb.create()
    past = await sb.page(pageNumber=2, pageSize=10)
    assert (past["items"], past["totalItems"], past["totalPages"], past["nextPage"]) == (
        [], 1, 1, None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"pageSize": "10"}, "pageNumber"),
        ({"pageNumber": "1"}, "pageSize"),
        ({"pageNumber": "0", "pageSize": "10"}, "pageNumber"),
        ({"pageNumber": "-1", "pageSize": "10"}, "pageNumber"),
        ({"pageNumber": "one", "pageSize": "10"}, "pageNumber"),
        ({"pageNumber": "1", "pageSize": "0"}, "pageSize"),
        ({"pageNumber": "1", "pageSize": "1.5"}, "pageSize"),
        ({"pageNumber": "1", "pageSize": "101"}, "pageSize"),
        ({"pageNumber": "1", "pageSize": "10", "search": "ab"}, "search"),
        ({"pageNumber": "1", "pageSize": "10", "search": ""}, "search"),
    ],
)
async def test_bad_list_parameters_are_400_naming_them(
    sb: Sandbox, params: dict[str, str], field_name: str
):
    """Missing or malformed paging, or a search under 3 characters: 400 with a JSON error."""
    response = await sb.call("GET", WEBHOOKS, params=params)

    assert response.status == 400
    assert await error_field(response) == field_name


async def test_search_filters_names_case_insensitively_and_pages_the_result(sb: Sandbox):
    """search matches a name substring regardless of case; totals count the matches only."""
    for name in ("New sale", "Cart SALES eu", "Login", "wholesale", "Offer"):
        await sb.create(name=name)

    first = await sb.page(pageNumber=1, pageSize=2, search="sAl")
    second = await sb.page(pageNumber=2, pageSize=2, search="sAl")

    names = [item["name"] for item in first["items"] + second["items"]]
    assert names == ["New sale", "Cart SALES eu", "wholesale"]
    assert (first["totalItems"], first["totalPages"], first["nextPage"]) == (3, 2, 2)
    assert second["nextPage"] is None


# --- auth and tenants ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "api_key"),
    [(TENANT, None), (TENANT, "wrong-key"), (None, DEV_API_KEY), ("", DEV_API_KEY)],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", WEBHOOKS + "?pageNumber=1&pageSize=10"),
        ("POST", WEBHOOKS),
        ("GET", WEBHOOKS + "/types"),
        ("POST", WEBHOOKS + "/example"),
        ("POST", "/sandbox/fire"),
        ("POST", "/sandbox/faults"),
        ("POST", "/sandbox/reset"),
    ],
)
async def test_missing_or_wrong_credentials_are_401(
    sb: Sandbox, tenant: str | None, api_key: str | None, method: str, path: str
):
    """Every call, documented or sandbox-only, needs one-tenant and the right ApiAuth key."""
    await sb.create()

    response = await sb.call(method, path, tenant=tenant, api_key=api_key, json={})

    assert response.status == 401
    assert (await response.json())["error"] == "unauthorized"
    assert len(sb.state.webhooks(TENANT)) == 1


async def test_configured_tenant_key_replaces_the_default_for_that_tenant(
    aiohttp_client: ClientFactory,
):
    """klient needs its own key; other tenants still take the dev key; the key is never echoed."""
    app = sandbox.build_sandbox_app(api_keys={TENANT: PLANTED_KEY})
    sb = Sandbox(await aiohttp_client(app), app[SANDBOX_STATE])
    types = f"{WEBHOOKS}/types"

    assert (await sb.call("GET", types, api_key=PLANTED_KEY)).status == 200
    refused = await sb.call("GET", types, api_key=DEV_API_KEY)
    assert refused.status == 401
    assert PLANTED_KEY not in await refused.text()
    assert (await sb.call("GET", types, tenant="acme", api_key=DEV_API_KEY)).status == 200
    assert (await sb.call("GET", types, tenant="acme", api_key=PLANTED_KEY)).status == 401


async def test_without_a_default_key_only_configured_tenants_get_in(
    aiohttp_client: ClientFactory,
):
    """default_api_key=None: an unconfigured tenant is refused whatever key it sends."""
    app = sandbox.build_sandbox_app(api_keys={TENANT: PLANTED_KEY}, default_api_key=None)
    sb = Sandbox(await aiohttp_client(app), app[SANDBOX_STATE])

    assert (await sb.call("GET", f"{WEBHOOKS}/types", api_key=PLANTED_KEY)).status == 200
    for key in (DEV_API_KEY, PLANTED_KEY, ""):
        response = await sb.call("GET", f"{WEBHOOKS}/types", tenant="acme", api_key=key)
        assert response.status == 401


async def test_tenants_do_not_see_each_others_webhooks(sb: Sandbox):
    """A webhook of klient is invisible to acme: list, get, update and delete all miss it."""
    webhook_id = await sb.create()

    assert (
        await sb.call("GET", WEBHOOKS + "?pageNumber=1&pageSize=10", tenant="acme")
    ).status == 200
    listed = await (
        await sb.call("GET", WEBHOOKS, tenant="acme", params={"pageNumber": 1, "pageSize": 10})
    ).json()
    assert listed["items"] == []
    assert (await sb.call("GET", f"{WEBHOOKS}/{webhook_id}", tenant="acme")).status == 404
    update = {"id": webhook_id, **webhook_body("acme")}
    assert (await sb.call("PUT", WEBHOOKS, tenant="acme", json=update)).status == 404
    assert (await sb.call("DELETE", f"{WEBHOOKS}/{webhook_id}", tenant="acme")).status == 404
    assert [w["id"] for w in sb.state.webhooks(TENANT)] == [webhook_id]


# --- example callback ----------------------------------------------------------------------------


def example_request(callback_url: str, *, event_type: str = "CartOpened", auth: Any = None) -> Any:
    return {
        "webhookType": {"name": event_type, "exchangeName": exchange(event_type)},
        "callbackUrl": callback_url,
        "callbackAuthentication": auth
        or {"type": "HTTP_BASIC", "username": "admin", "password": "admin"},
    }


async def test_example_reaches_the_callback_with_documented_headers_and_body(
    sb: Sandbox, aiohttp_server: ServerFactory
):
    """The sandbox really POSTs the example; the answer shows exactly what was sent."""
    receiver = Receiver()
    url = await receiver.start(aiohttp_server)
    before = datetime.now(UTC)

    response = await sb.call("POST", f"{WEBHOOKS}/example", json=example_request(url))

    assert response.status == 200
    answer = await response.json()
    [sent] = receiver.requests
    assert sent.path == "/hook"
    assert sorted(sent.header_names) == sorted(
        ["host", "accept", "authorization", "one-tenant", "content-type", "content-length"]
    )
    assert sent.headers["Accept"] == ACCEPT
    assert sent.headers["Authorization"] == "Basic YWRtaW46YWRtaW4="  # the documented value
    assert sent.headers["one-tenant"] == TENANT
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Content-Length"] == str(len(sent.body))

    body = json.loads(sent.body)
    assert list(body) == ["type", "tenantKey", "cartId", "clientId", "eventId", "timestamp"]
    assert body["type"] == "CartOpened"
    assert body["tenantKey"] == "example"
    assert body["cartId"] == ZERO
    assert body["clientId"] == f"org:{ZERO}"
    assert uuid.UUID(body["eventId"]).version == 4
    assert TIMESTAMP.match(body["timestamp"])
    stamped = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= stamped <= datetime.now(UTC)
    assert b'\n  "type" : "CartOpened",\n' in sent.body

    assert answer["requestBody"] == sent.body.decode()
    assert answer["requestHeaders"] == {
        "Accept": [ACCEPT],
        "Authorization": ["Basic YWRtaW46YWRtaW4="],
        "one-tenant": [TENANT],
        "Content-Type": ["application/json"],
        "Content-Length": [str(len(sent.body))],
    }
    assert answer["callbackStatus"] == 200
    assert "callbackError" not in answer


async def test_each_example_has_a_fresh_event_id(sb: Sandbox, aiohttp_server: ServerFactory):
    """Two example calls carry two different eventIds."""
    receiver = Receiver()
    url = await receiver.start(aiohttp_server)

    for _ in range(2):
        assert (
            await sb.call("POST", f"{WEBHOOKS}/example", json=example_request(url))
        ).status == 200

    event_ids = [body["eventId"] for body in receiver.bodies()]
    assert len(set(event_ids)) == 2


async def test_example_without_authentication_sends_no_authorization(
    sb: Sandbox, aiohttp_server: ServerFactory
):
    """NONE: no Authorization header on the callback, nor in the answer."""
    receiver = Receiver()
    url = await receiver.start(aiohttp_server)

    response = await sb.call(
        "POST", f"{WEBHOOKS}/example", json=example_request(url, auth={"type": "NONE"})
    )

    assert "authorization" not in receiver.requests[0].header_names
    assert "Authorization" not in (await response.json())["requestHeaders"]


async def test_offer_opened_example_carries_a_zero_offer_id(
    sb: Sandbox, aiohttp_server: ServerFactory
):
    """OfferOpened's example names an all-zero offerId instead of a cartId."""
    receiver = Receiver()
    url = await receiver.start(aiohttp_server)

    await sb.call(
        "POST", f"{WEBHOOKS}/example", json=example_request(url, event_type="OfferOpened")
    )

    [body] = receiver.bodies()
    assert body["type"] == "OfferOpened"
    assert body["offerId"] == ZERO
    assert "cartId" not in body


def test_documented_example_body_is_reproduced_byte_for_byte():
    """With the documented eventId and timestamp the body equals the documented 267 bytes."""
    documented = (CASES / "documented-example-cartopened.body.json").read_bytes()
    moment = datetime(2023, 2, 22, 4, 32, 51, 14160, tzinfo=UTC)

    body = sandbox.example_callback_body(
        "CartOpened", event_id="13200948-cf44-4853-9eee-88eb9284ea23", now=moment
    )

    assert body == documented
    assert len(body) == 267


async def test_example_callback_failures_are_reported_in_a_200(
    sb: Sandbox, aiohttp_server: ServerFactory, refusing_url: str
):
    """Unreachable: callbackStatus null plus callbackError. Non-2xx: that status plus an error."""
    refused = await sb.call("POST", f"{WEBHOOKS}/example", json=example_request(refusing_url))
    assert refused.status == 200
    answer = await refused.json()
    assert answer["callbackStatus"] is None
    assert "connection_refused" in answer["callbackError"]
    assert json.loads(answer["requestBody"])["type"] == "CartOpened"

    receiver = Receiver(status=500)
    url = await receiver.start(aiohttp_server)
    failed = await (await sb.call("POST", f"{WEBHOOKS}/example", json=example_request(url))).json()
    assert failed["callbackStatus"] == 500
    assert "500" in failed["callbackError"]


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        (_without("callbackUrl"), "callbackUrl"),
        (_without("webhookType"), "webhookType"),
        (_setting("webhookType.name", "Nope"), "webhookType.name"),
        (_without("callbackAuthentication"), "callbackAuthentication"),
        (_without("callbackAuthentication.password"), "callbackAuthentication.password"),
    ],
)
async def test_invalid_example_request_is_400_and_sends_nothing(
    sb: Sandbox,
    aiohttp_server: ServerFactory,
    change: Callable[[dict[str, Any]], None],
    field_name: str,
):
    """The example request is validated like a webhook; nothing is sent when it is wrong."""
    receiver = Receiver()
    body = example_request(await receiver.start(aiohttp_server))
    change(body)

    response = await sb.call("POST", f"{WEBHOOKS}/example", json=body)

    assert response.status == 400
    assert await error_field(response) == field_name
    assert receiver.requests == []


# --- firing events -------------------------------------------------------------------------------


async def test_fire_sends_to_active_webhooks_of_the_type_with_their_credentials(
    sb: Sandbox, aiohttp_server: ServerFactory
):
    """ACTIVE CartOpened webhooks get realistic callbacks; INACTIVE and other types get none."""
    basic_hook, open_hook, inactive, other_type = Receiver(), Receiver(), Receiver(), Receiver()
    auth = {"type": "HTTP_BASIC", "username": "one", "password": PLANTED_PASSWORD}
    basic_id = await sb.create(callback_url=await basic_hook.start(aiohttp_server), auth=auth)
    open_id = await sb.create(
        callback_url=await open_hook.start(aiohttp_server), auth={"type": "NONE"}
    )
    await sb.create(callback_url=await inactive.start(aiohttp_server), status="INACTIVE")
    await sb.create(callback_url=await other_type.start(aiohttp_server), event_type="ClientLogged")

    response = await sb.call("POST", "/sandbox/fire", json={"type": "CartOpened", "count": 2})

    assert response.status == 200
    results = await response.json()
    assert [(r["webhookId"], r["status"], r["error"]) for r in results] == [
        (basic_id, 200, None), (open_id, 200, None), (basic_id, 200, None), (open_id, 200, None),
    ]  # fmt: skip
    assert (len(inactive.requests), len(other_type.requests)) == (0, 0)
    assert [r.headers["Authorization"] for r in basic_hook.requests] == [
        basic("one", PLANTED_PASSWORD)
    ] * 2
    assert all("authorization" not in r.header_names for r in open_hook.requests)

    bodies = basic_hook.bodies()
    assert [body["eventId"] for body in bodies] == [r["eventId"] for r in results[::2]]
    assert len({body["eventId"] for body in bodies}) == 2
    for recorded, body in zip(basic_hook.requests, bodies, strict=True):
        assert recorded.headers["one-tenant"] == TENANT
        assert recorded.headers["Accept"] == ACCEPT
        assert body["type"] == "CartOpened"
        assert body["tenantKey"] == TENANT
        assert body["cartId"] != ZERO and uuid.UUID(body["cartId"]).version == 4
        assert body["clientId"].startswith("org:") and ZERO not in body["clientId"]
        assert TIMESTAMP.match(body["timestamp"])
        assert b'" : "' in recorded.body


async def test_fire_from_python_narrowed_to_one_webhook(sb: Sandbox, aiohttp_server: ServerFactory):
    """state.fire() with webhook_id sends only to that webhook and returns Delivery records."""
    first, second = Receiver(), Receiver()
    first_id = await sb.create(
        callback_url=await first.start(aiohttp_server), event_type="OfferOpened"
    )
    await sb.create(callback_url=await second.start(aiohttp_server), event_type="OfferOpened")

    deliveries = await sb.state.fire(TENANT, "OfferOpened", count=3, webhook_id=first_id)

    assert [(d.webhook_id, d.status) for d in deliveries] == [(first_id, 200)] * 3
    assert len({d.event_id for d in deliveries}) == 3
    assert (len(first.requests), len(second.requests)) == (3, 0)
    assert all(uuid.UUID(body["offerId"]).version == 4 for body in first.bodies())


async def test_fire_reports_failed_callbacks_without_failing(
    sb: Sandbox, aiohttp_server: ServerFactory, refusing_url: str
):
    """A callback answered 503 or refused is a result, not an error of the fire call."""
    failing = Receiver(status=503)
    failing_id = await sb.create(callback_url=await failing.start(aiohttp_server))
    refused_id = await sb.create(callback_url=refusing_url)

    results = await (await sb.call("POST", "/sandbox/fire", json={"type": "CartOpened"})).json()

    by_id = {result["webhookId"]: result for result in results}
    assert by_id[failing_id]["status"] == 503
    assert by_id[refused_id]["status"] is None
    assert "connection_refused" in by_id[refused_id]["error"]


@pytest.mark.parametrize(
    ("body", "status", "field_name"),
    [
        ({}, 400, "type"),
        ({"type": "NoSuchType"}, 400, "type"),
        ({"type": "CartOpened", "count": 0}, 400, "count"),
        ({"type": "CartOpened", "count": 1001}, 400, "count"),
        ({"type": "CartOpened", "count": "2"}, 400, "count"),
        ({"type": "CartOpened", "count": True}, 400, "count"),
        ({"type": "CartOpened", "webhookId": 5}, 400, "webhookId"),
        ({"type": "CartOpened", "webhookId": "no-such-id"}, 404, None),
    ],
)
async def test_bad_fire_requests_are_refused(
    sb: Sandbox, body: dict[str, Any], status: int, field_name: str | None
):
    """Unknown type, count out of range, bad or unknown webhookId."""
    response = await sb.call("POST", "/sandbox/fire", json=body)

    assert response.status == status
    assert await error_field(response) == field_name


async def test_fire_with_no_matching_webhook_sends_nothing(sb: Sandbox):
    """No ACTIVE webhook of the type: an empty list."""
    await sb.create(status="INACTIVE")

    assert await sb.state.fire(TENANT, "CartOpened") == []
    response = await sb.call("POST", "/sandbox/fire", json={"type": "ClientLogged", "count": 5})
    assert await response.json() == []


# --- faults --------------------------------------------------------------------------------------


async def test_fail_status_is_answered_to_the_next_n_calls_then_clears(sb: Sandbox):
    """fail_status 500 twice: two 500s, then normal answers; the call log shows all three."""
    set_ = await sb.call("POST", "/sandbox/faults", json={"fail_status": 500, "fail_times": 2})
    assert set_.status == 200
    assert (await set_.json())["fail_status"] == 500

    statuses = [(await sb.call("GET", f"{WEBHOOKS}/types")).status for _ in range(3)]

    assert statuses == [500, 500, 200]
    assert sb.state.count_calls("GET", f"{WEBHOOKS}/types") == 3
    assert [call.status for call in sb.state.calls] == [500, 500, 200]
    assert sb.state.faults.fail_status is None


async def test_429_comes_with_retry_after(sb: Sandbox):
    """An injected 429 carries Retry-After: 1 and a JSON body; the next call succeeds."""
    sb.state.faults = Faults(fail_status=429)

    limited = await sb.call("GET", f"{WEBHOOKS}/types")

    assert limited.status == 429
    assert limited.headers["Retry-After"] == "1"
    assert (await limited.json())["error"] == "too_many_requests"
    assert (await sb.call("GET", f"{WEBHOOKS}/types")).status == 200


async def test_injected_401_refuses_even_the_right_key(sb: Sandbox):
    """fail_status 401 simulates a revoked key for the next call."""
    sb.state.faults.fail_status = 401

    assert (await sb.call("POST", WEBHOOKS, json=webhook_body())).status == 401
    assert sb.state.webhooks(TENANT) == []
    assert (await sb.call("POST", WEBHOOKS, json=webhook_body())).status == 200


async def test_unlimited_failure_lasts_until_cleared_through_the_control_endpoint(sb: Sandbox):
    """fail_times null fails every API call; /sandbox endpoints stay reachable to clear it."""
    await sb.call("POST", "/sandbox/faults", json={"fail_status": 503, "fail_times": None})

    assert [(await sb.call("GET", f"{WEBHOOKS}/types")).status for _ in range(4)] == [503] * 4

    cleared = await sb.call("POST", "/sandbox/faults", json={"fail_status": None})
    assert cleared.status == 200
    assert (await sb.call("GET", f"{WEBHOOKS}/types")).status == 200


async def test_delay_slows_every_answer(aiohttp_client: ClientFactory):
    """delay_seconds set at build time holds each API answer back at least that long."""
    app = sandbox.build_sandbox_app(faults=Faults(delay_seconds=0.2))
    sb = Sandbox(await aiohttp_client(app), app[SANDBOX_STATE])
    loop = asyncio.get_running_loop()

    started = loop.time()
    response = await sb.call("GET", f"{WEBHOOKS}/types")

    assert response.status == 200
    assert loop.time() - started >= 0.2


async def test_delay_makes_a_short_client_timeout_expire(sb: Sandbox):
    """A client whose timeout is below the delay gets a timeout, as against a slow platform."""
    await sb.call("POST", "/sandbox/faults", json={"delay_seconds": 0.5})

    with pytest.raises(TimeoutError):
        await sb.call("GET", f"{WEBHOOKS}/types", timeout=aiohttp.ClientTimeout(total=0.05))

    assert (await (await sb.call("GET", "/sandbox/faults")).json())["delay_seconds"] == 0.5


async def test_types_path_switch_through_the_control_endpoint(sb: Sandbox):
    """types_path_404 can be set over HTTP as well."""
    await sb.call("POST", "/sandbox/faults", json={"types_path_404": True})

    assert (await sb.call("GET", f"{WEBHOOKS}/types")).status == 404
    assert (await sb.call("GET", f"{WEBHOOKS}/type")).status == 200


@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"fail_status": 200}, "fail_status"),
        ({"fail_status": "500"}, "fail_status"),
        ({"fail_status": 500, "fail_times": 0}, "fail_times"),
        ({"delay_seconds": -1}, "delay_seconds"),
        ({"delay_seconds": True}, "delay_seconds"),
        ({"types_path_404": "yes"}, "types_path_404"),
        ({"explode": True}, "explode"),
    ],
)
async def test_bad_fault_settings_are_400_and_change_nothing(
    sb: Sandbox, body: dict[str, Any], field_name: str
):
    """Each fault value is checked; an unknown switch is named."""
    response = await sb.call("POST", "/sandbox/faults", json=body)

    assert response.status == 400
    assert await error_field(response) == field_name
    assert sb.state.faults == Faults()


# --- state access, reset, call log ---------------------------------------------------------------


async def test_reset_forgets_webhooks_types_faults_and_calls(sb: Sandbox):
    """POST /sandbox/reset answers 204 and leaves a fresh sandbox."""
    await sb.create()
    sb.state.add_type(TENANT, "Extra", "p-extra")
    sb.state.faults.delay_seconds = 0.01

    response = await sb.call("POST", "/sandbox/reset")

    assert response.status == 204
    assert sb.state.webhooks(TENANT) == []
    assert [t["name"] for t in sb.state.types(TENANT)] == [
        "CartOpened",
        "ClientLogged",
        "OfferOpened",
    ]
    assert sb.state.faults == Faults()
    assert len(sb.state.calls) == 0


async def test_call_log_records_method_path_tenant_and_status_and_is_bounded(
    aiohttp_client: ClientFactory,
):
    """Only management calls are recorded, newest kept, at most max_recorded_calls of them."""
    app = sandbox.build_sandbox_app(max_recorded_calls=3)
    sb = Sandbox(await aiohttp_client(app), app[SANDBOX_STATE])

    await sb.call("GET", f"{WEBHOOKS}/types", tenant="acme")
    webhook_id = await sb.create()
    await sb.call("GET", f"{WEBHOOKS}/{webhook_id}", api_key="wrong")
    await sb.call("POST", "/sandbox/faults", json={})
    await sb.call("DELETE", f"{WEBHOOKS}/{webhook_id}")

    assert [(c.method, c.path, c.tenant, c.status) for c in sb.state.calls] == [
        ("POST", WEBHOOKS, TENANT, 200),
        ("GET", f"{WEBHOOKS}/{webhook_id}", TENANT, 401),
        ("DELETE", f"{WEBHOOKS}/{webhook_id}", TENANT, 204),
    ]
    assert sb.state.count_calls(tenant="acme") == 0  # pushed out by newer calls


async def test_reads_are_copies_and_direct_edits_show_as_drift(sb: Sandbox):
    """Changing a returned dict changes nothing; edit_webhook does, like a BackOffice edit."""
    webhook_id = await sb.create()
    sb.state.webhooks(TENANT)[0]["name"] = "changed by accident"
    assert sb.state.webhook(TENANT, webhook_id)["name"] == "New sale"  # type: ignore[index]

    sb.state.edit_webhook(
        TENANT, webhook_id, {"status": "INACTIVE", "callbackAuthentication": {"password": "new"}}
    )

    got = await (await sb.call("GET", f"{WEBHOOKS}/{webhook_id}")).json()
    assert got["status"] == "INACTIVE"
    assert got["callbackAuthentication"] == {
        "type": "HTTP_BASIC", "username": "admin", "password": "new",
    }  # fmt: skip
    with pytest.raises(LookupError):
        sb.state.edit_webhook(TENANT, str(uuid.uuid4()), {"name": "x"})


async def test_planted_webhooks_and_removals_are_seen_through_the_api(sb: Sandbox):
    """put_webhook plants a webhook (even an odd one); remove_webhook deletes it behind our back."""
    planted = sb.state.put_webhook(TENANT, {"name": "human made", "status": "ACTIVE"})

    page = await sb.page(pageNumber=1, pageSize=10)
    assert page["items"] == [{"id": planted, "name": "human made", "status": "ACTIVE"}]

    assert sb.state.remove_webhook(TENANT, planted) is True
    assert (await sb.call("GET", f"{WEBHOOKS}/{planted}")).status == 404


# --- secrets and isolation -----------------------------------------------------------------------


async def test_log_lines_hold_method_path_status_and_never_secrets(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
):
    """One line per request; neither the API key nor a callback password ever appears."""
    app = sandbox.build_sandbox_app(api_keys={TENANT: PLANTED_KEY})
    sb = Sandbox(await aiohttp_client(app), app[SANDBOX_STATE])
    caplog.set_level(logging.DEBUG)

    created = await sb.call("POST", WEBHOOKS, api_key=PLANTED_KEY, json=webhook_body())
    webhook_id = (await created.json())["id"]
    await sb.call("GET", WEBHOOKS, api_key=PLANTED_KEY, params={"pageNumber": 1, "pageSize": 5})
    await sb.call("GET", f"{WEBHOOKS}/{webhook_id}", api_key="bad-" + PLANTED_KEY)
    bad = {**webhook_body(), "name": ""}
    await sb.call("POST", WEBHOOKS, api_key=PLANTED_KEY, json=bad)

    ours = [r.getMessage() for r in caplog.records if r.name == "bridge.sandbox"]
    assert ours == [
        f"POST {WEBHOOKS} 200",
        f"GET {WEBHOOKS} 200",
        f"GET {WEBHOOKS}/{webhook_id} 401",
        f"POST {WEBHOOKS} 400",
    ]
    assert PLANTED_KEY not in caplog.text
    assert PLANTED_PASSWORD not in caplog.text


async def test_serve_sandbox_announces_its_url_but_not_its_key_and_serves():
    """The announced line has a working URL and names no key; cancelling stops the server."""
    lines: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(sandbox.serve_sandbox("127.0.0.1", 0, announce=lines.put_nowait))
    try:
        line = await asyncio.wait_for(lines.get(), timeout=10)
        assert DEV_API_KEY not in line and "dev key" in line
        base = re.search(r"http://\S+", line)
        assert base is not None and re.fullmatch(r"http://127\.0\.0\.1:[1-9]\d*", base.group(0))
        headers = {"one-tenant": TENANT, "ApiAuth": DEV_API_KEY}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base.group(0)}{WEBHOOKS}/types", headers=headers) as answer:
                assert answer.status == 200
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert lines.empty()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(f"{base.group(0)}{WEBHOOKS}/types", headers=headers)


async def test_serve_sandbox_never_announces_a_configured_key():
    """With configured keys, the announced line shows none of them."""
    lines: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(
        sandbox.serve_sandbox(
            "127.0.0.1",
            0,
            api_keys={TENANT: PLANTED_KEY},
            default_api_key=None,
            announce=lines.put_nowait,
        )
    )
    try:
        line = await asyncio.wait_for(lines.get(), timeout=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert PLANTED_KEY not in line
    assert DEV_API_KEY not in line
    assert re.search(r"http://127\.0\.0\.1:[1-9]\d*", line)


def test_sandbox_imports_only_aiohttp_and_the_stdlib():
    """The fake must not share code with the bridge, or a bug could hide on both sides."""
    source = Path(sandbox.__file__).read_text(encoding="utf-8")
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None
            roots.add(node.module.split(".")[0])

    assert roots - set(sys.stdlib_module_names) == {"aiohttp"}
