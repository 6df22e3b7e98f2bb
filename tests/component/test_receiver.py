"""The receiver over HTTP with an in-memory sink: every status it answers, and what it forwards."""

from __future__ import annotations

import asyncio
from base64 import b64encode
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from aiohttp import web
from conftest import CASES, DEV_PASSWORD, DEV_USER, make_config
from support.amqp import wait_until

from bridge.dedupe import RecentEvents
from bridge.delivery import Delivery
from bridge.errors import PublishError
from bridge.events import UNROUTED_EXCHANGE, RoutingTable, WebhookEvent
from bridge.receiver import Receiver
from bridge.spool import SqliteSpool
from bridge.webserver import GuardedServerRunner

EXAMPLE_BODY = (CASES / "documented-example-cartopened.body.json").read_bytes()
URL = "/one/klient/events"


def basic(user: str = DEV_USER, password: str = DEV_PASSWORD) -> str:
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode()


GOOD_HEADERS = {
    "Authorization": basic(),
    "Content-Type": "application/json",
    "one-tenant": "klient",
}


class MemorySink:
    """Records publishes; can be told to fail or to hold publishes until released."""

    def __init__(self) -> None:
        self.published: list[tuple[WebhookEvent, str]] = []
        self.failure: str | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.is_connected = True
        self.is_blocked = False

    async def publish(self, event: WebhookEvent, exchange_name: str, *, timeout: float) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failure:
            raise PublishError(self.failure)
        self.published.append((event, exchange_name))


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
async def spool(tmp_path) -> AsyncIterator[SqliteSpool]:
    async with await SqliteSpool.open(tmp_path / "spool", max_bytes=10**6, max_events=3) as opened:
        yield opened


@pytest.fixture
def make_receiver(sink, spool, metrics) -> Callable[..., Receiver]:
    def make(**sections: object) -> Receiver:
        cfg = make_config(**sections)
        delivery = Delivery(
            sink,
            spool,
            RoutingTable({key: t.exchanges for key, t in cfg.tenants.items()}),
            RecentEvents(
                window_seconds=cfg.dedupe.window_seconds, max_events=cfg.dedupe.max_events
            ),
            publish_timeout_seconds=cfg.broker.publish_timeout_seconds,
            max_in_flight=cfg.broker.max_in_flight,
        )
        return Receiver(
            delivery=delivery, tenants=cfg.tenants, settings=cfg.receiver, metrics=metrics
        )

    return make


@pytest.fixture
def receiver_client(aiohttp_client, aiohttp_raw_server):
    """A test client of a receiver, served by aiohttp's low-level server as in production."""

    async def connect(receiver: Receiver):
        return await aiohttp_client(await aiohttp_raw_server(receiver.handle))

    return connect


@pytest.fixture
async def client(receiver_client, make_receiver):
    return await receiver_client(make_receiver())


async def test_documented_example_is_forwarded_byte_for_byte(client, sink, metrics):
    """The documented callback gets 200 and its exact bytes go to the documented exchange."""
    response = await client.post(URL, data=EXAMPLE_BODY, headers=GOOD_HEADERS)
    assert response.status == 200
    assert await response.json() == {
        "status": "published",
        "eventId": "13200948-cf44-4853-9eee-88eb9284ea23",
    }
    [(event, exchange)] = sink.published
    assert exchange == "p-u-o-m-e-c-cartopened-klient"
    assert event.body == EXAMPLE_BODY
    assert (event.tenant, event.event_type) == ("klient", "CartOpened")
    assert (
        metrics.registry.get_sample_value(
            "onebridge_webhook_requests_total", {"event_type": "CartOpened", "outcome": "published"}
        )
        == 1
    )


@pytest.mark.parametrize(
    ("event_type", "exchange"),
    [
        ("ClientLogged", "p-u-o-m-e-c-clientlogged-klient"),
        ("OfferOpened", "p-u-o-m-e-o-offeropened-klient"),
    ],
)
async def test_each_documented_type_goes_to_its_exchange(client, sink, event_type, exchange):
    """ClientLogged and OfferOpened route by the documented table."""
    body = b'{"type": "%s", "tenantKey": "klient", "eventId": "e-1"}' % event_type.encode()
    response = await client.post(URL, data=body, headers=GOOD_HEADERS)
    assert response.status == 200
    assert sink.published[0][1] == exchange


async def test_unknown_type_is_published_to_unrouted_not_dropped(client, sink):
    """A type the tenant does not know yet is kept in one-bridge.unrouted."""
    body = b'{"type": "BrandNewEvent", "eventId": "e-2"}'
    response = await client.post(URL, data=body, headers=GOOD_HEADERS)
    assert response.status == 200
    assert (await response.json())["status"] == "unrouted"
    assert sink.published[0][1] == UNROUTED_EXCHANGE


async def test_configured_exchange_overrides_the_documented_one(
    receiver_client, make_receiver, sink, metrics
):
    """An explicit `exchanges` entry wins over the documented table."""
    app = make_receiver(
        tenants={
            "klient": {
                "username": DEV_USER,
                "passwords": [DEV_PASSWORD],
                "exchanges": {"CartOpened": "carts.custom"},
            }
        },
    )
    client = await receiver_client(app)
    assert (await client.post(URL, data=EXAMPLE_BODY, headers=GOOD_HEADERS)).status == 200
    assert sink.published[0][1] == "carts.custom"


def _without(name: str) -> dict[str, str]:
    return {k: v for k, v in GOOD_HEADERS.items() if k != name}


REJECTIONS = [
    ("unknown tenant", "/one/other/events", GOOD_HEADERS, EXAMPLE_BODY, 404, "unknown_tenant"),
    ("no credentials", URL, _without("Authorization"), EXAMPLE_BODY, 401, "unauthorized"),
    (
        "wrong password",
        URL,
        {**GOOD_HEADERS, "Authorization": basic(password="nope")},
        EXAMPLE_BODY,
        401,
        "unauthorized",
    ),
    (
        "wrong user",
        URL,
        {**GOOD_HEADERS, "Authorization": basic(user="admin")},
        EXAMPLE_BODY,
        401,
        "unauthorized",
    ),
    (
        "garbled header",
        URL,
        {**GOOD_HEADERS, "Authorization": "Basic %%%"},
        EXAMPLE_BODY,
        401,
        "unauthorized",
    ),
    (
        "text content type",
        URL,
        {**GOOD_HEADERS, "Content-Type": "text/plain"},
        EXAMPLE_BODY,
        415,
        "unsupported_media_type",
    ),
    (
        "form content type",
        URL,
        {**GOOD_HEADERS, "Content-Type": "application/x-www-form-urlencoded"},
        EXAMPLE_BODY,
        415,
        "unsupported_media_type",
    ),
    ("not JSON", URL, GOOD_HEADERS, b"type=CartOpened", 400, "invalid_body"),
    ("JSON array", URL, GOOD_HEADERS, b"[]", 400, "invalid_body"),
    ("empty body", URL, GOOD_HEADERS, b"", 400, "invalid_body"),
    ("eventId missing", URL, GOOD_HEADERS, b'{"type": "CartOpened"}', 400, "invalid_body"),
    (
        "eventId a number",
        URL,
        GOOD_HEADERS,
        b'{"type": "CartOpened", "eventId": 7}',
        400,
        "invalid_body",
    ),
    (
        "type too long",
        URL,
        GOOD_HEADERS,
        b'{"type": "' + b"T" * 256 + b'", "eventId": "e"}',
        400,
        "invalid_body",
    ),
    (
        "tenant header differs",
        URL,
        {**GOOD_HEADERS, "one-tenant": "someone-else"},
        EXAMPLE_BODY,
        400,
        "tenant_mismatch",
    ),
    (
        "body over the limit",
        URL,
        GOOD_HEADERS,
        b'{"type": "x", "eventId": "e", "pad": "' + b"x" * 262_144 + b'"}',
        413,
        "too_large",
    ),
]


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "reason"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
async def test_bad_input_gets_a_precise_status_and_nothing_is_published(
    client, sink, metrics, path, headers, body, status, reason
):
    """Each rejection answers its own 4xx, names the reason, counts it, and publishes nothing."""
    response = await client.post(path, data=body, headers=headers)
    assert response.status == status
    assert (await response.json())["error"] == reason
    assert sink.published == []
    assert (
        metrics.registry.get_sample_value("onebridge_webhook_rejections_total", {"reason": reason})
        == 1
    )
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Basic ")


async def test_chunked_body_over_the_limit_is_413(client, sink):
    """A chunked body (no Content-Length) is measured as it streams in."""

    async def chunks():
        for _ in range(300):
            yield b"x" * 1024

    response = await client.post(URL, data=chunks(), headers=GOOD_HEADERS)
    assert response.status == 413
    assert sink.published == []


async def test_body_that_never_arrives_times_out_with_408(
    aiohttp_raw_server, make_receiver, sink, metrics
):
    """A Content-Length larger than what is sent does not hold a handler forever."""
    server = await aiohttp_raw_server(make_receiver(receiver={"body_timeout_seconds": 0.2}).handle)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /one/klient/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + basic().encode() + b'\r\nContent-Length: 500\r\n\r\n{"type"'
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/vnd.one+json", "APPLICATION/JSON"],
)
async def test_json_media_types_are_accepted(client, sink, content_type):
    """JSON with parameters, +json suffixes and any letter case are all JSON."""
    headers = {**GOOD_HEADERS, "Content-Type": content_type}
    assert (await client.post(URL, data=EXAMPLE_BODY, headers=headers)).status == 200


async def test_missing_one_tenant_header_is_accepted(client, sink):
    """The tenant header is checked when present; the path names the tenant."""
    response = await client.post(URL, data=EXAMPLE_BODY, headers=_without("one-tenant"))
    assert response.status == 200


async def test_previous_password_still_works_during_rotation(
    receiver_client, make_receiver, sink, metrics
):
    """Every password in the list is accepted; the first is the current one."""
    app = make_receiver(
        tenants={"klient": {"username": DEV_USER, "passwords": ["new-one", DEV_PASSWORD]}},
    )
    client = await receiver_client(app)
    for password in ("new-one", DEV_PASSWORD):
        headers = {**GOOD_HEADERS, "Authorization": basic(password=password)}
        assert (await client.post(URL, data=EXAMPLE_BODY, headers=headers)).status == 200


async def test_tenant_with_auth_none_needs_no_credentials(
    receiver_client, make_receiver, sink, metrics
):
    """auth = 'none' must be explicit, and then no Authorization header is needed."""
    client = await receiver_client(make_receiver(tenants={"open": {"auth": "none"}}))
    response = await client.post(
        "/one/open/events", data=EXAMPLE_BODY, headers={"Content-Type": "application/json"}
    )
    assert response.status == 200
    assert sink.published[0][1] == "p-u-o-m-e-c-cartopened-open"


async def test_unconfirmed_publish_is_spooled_and_answered_200(client, sink, spool):
    """When the broker does not confirm in time, the event is on disk before the 200."""
    sink.failure = "timeout"
    response = await client.post(URL, data=EXAMPLE_BODY, headers=GOOD_HEADERS)
    assert response.status == 200
    assert (await response.json())["status"] == "spooled"
    [record] = await spool.head(10)
    assert record.event.body == EXAMPLE_BODY
    assert record.exchange == "p-u-o-m-e-c-cartopened-klient"


async def test_disconnected_broker_spools_without_trying_to_publish(client, sink, spool):
    """No connection: straight to the spool, the sink is not even asked."""
    sink.is_connected = False
    response = await client.post(URL, data=EXAMPLE_BODY, headers=GOOD_HEADERS)
    assert (await response.json())["status"] == "spooled"
    assert not sink.entered.is_set()
    assert spool.stats().events == 1


async def test_events_behind_spooled_ones_for_the_same_exchange_are_spooled_too(
    client, sink, spool
):
    """Per-exchange order: while the spool holds a CartOpened, the next one queues behind it."""
    sink.failure = "timeout"
    await client.post(URL, data=callback("CartOpened", "first"), headers=GOOD_HEADERS)
    sink.failure = None
    second = await client.post(URL, data=callback("CartOpened", "second"), headers=GOOD_HEADERS)
    other = await client.post(URL, data=callback("OfferOpened", "other"), headers=GOOD_HEADERS)
    assert (await second.json())["status"] == "spooled"
    assert (await other.json())["status"] == "published"
    assert [r.event.event_id for r in await spool.head(10)] == ["first", "second"]


async def test_full_spool_is_503_never_200(client, sink, spool, metrics):
    """With the broker away and the spool at its bound, the sender is told to retry."""
    sink.is_connected = False
    for n in range(3):
        response = await client.post(
            URL, data=callback("CartOpened", f"e{n}"), headers=GOOD_HEADERS
        )
        assert response.status == 200
    response = await client.post(URL, data=callback("CartOpened", "e4"), headers=GOOD_HEADERS)
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert (await response.json())["error"] == "spool_full"
    assert spool.stats().events == 3


async def test_unwritable_spool_is_503_and_not_ready(receiver_client, make_receiver, sink, spool):
    """A spool that fails to write answers 503 and stops claiming it can accept."""
    app = make_receiver()
    client = await receiver_client(app)
    sink.is_connected = False
    await spool.close()  # every later append fails with SpoolError
    response = await client.post(URL, data=EXAMPLE_BODY, headers=GOOD_HEADERS)
    assert response.status == 503
    assert (await response.json())["error"] == "unavailable"
    assert not app.delivery.can_accept


def callback(event_type: str, event_id: str, **fields: str) -> bytes:
    document = {"type": event_type, "tenantKey": "klient", "eventId": event_id, **fields}
    return orjson.dumps(document)


async def test_same_event_id_twice_publishes_once(client, sink, metrics):
    """A repeated eventId inside the window gets 200 'duplicate' and no second publish."""
    body = callback("CartOpened", "twice", clientId="org:1")
    first = await client.post(URL, data=body, headers=GOOD_HEADERS)
    second = await client.post(URL, data=body, headers=GOOD_HEADERS)
    assert (first.status, second.status) == (200, 200)
    assert (await second.json())["status"] == "duplicate"
    assert len(sink.published) == 1
    assert metrics.registry.get_sample_value("onebridge_webhook_duplicates_total") == 1


async def test_parallel_duplicates_publish_once(client, sink):
    """Two copies in flight at once: the second waits for the first and is not published."""
    sink.gate = asyncio.Event()
    body = callback("ClientLogged", "parallel", clientId="org:2")
    first = asyncio.create_task(client.post(URL, data=body, headers=GOOD_HEADERS))
    await sink.entered.wait()
    second = asyncio.create_task(client.post(URL, data=body, headers=GOOD_HEADERS))
    sink.gate.set()
    statuses = sorted(
        [(await (await first).json())["status"], (await (await second).json())["status"]]
    )
    assert statuses == ["duplicate", "published"]
    assert len(sink.published) == 1


async def test_new_event_id_for_the_same_client_is_published(client, sink):
    """Only eventId decides: a later ClientLogged of the same client is a new event."""
    for event_id in ("login-1", "login-2"):
        body = callback("ClientLogged", event_id, clientId="org:same")
        await client.post(URL, data=body, headers=GOOD_HEADERS)
    assert [e.event_id for e, _ in sink.published] == ["login-1", "login-2"]


async def test_example_callbacks_are_never_swallowed_as_duplicates(client, sink):
    """The platform's example (tenantKey 'example', zero ids) may reuse its eventId."""
    for _ in range(3):
        response = await client.post(URL, data=EXAMPLE_BODY, headers=GOOD_HEADERS)
        assert (await response.json())["status"] == "published"
    assert len(sink.published) == 3


async def test_failed_first_attempt_does_not_make_the_retry_a_duplicate(
    receiver_client, make_receiver, sink, spool
):
    """If the first copy was not taken (503), the sender's retry is delivered."""
    client = await receiver_client(make_receiver())
    sink.is_connected = False
    await spool.close()
    body = callback("CartOpened", "retried")
    assert (await client.post(URL, data=body, headers=GOOD_HEADERS)).status == 503
    sink.is_connected = True
    response = await client.post(URL, data=body, headers=GOOD_HEADERS)
    assert (await response.json())["status"] == "published"


async def test_publishes_beyond_the_in_flight_bound_get_a_fast_503(
    receiver_client, make_receiver, sink, metrics
):
    """With the bound reached, a new request is refused at once rather than queued."""
    client = await receiver_client(make_receiver(broker={"max_in_flight": 1}))
    sink.gate = asyncio.Event()
    first = asyncio.create_task(client.post(URL, data=EXAMPLE_BODY, headers=GOOD_HEADERS))
    await sink.entered.wait()
    second = await client.post(URL, data=EXAMPLE_BODY, headers=GOOD_HEADERS)
    assert second.status == 503
    assert (await second.json())["error"] == "overloaded"
    sink.gate.set()
    assert (await first).status == 200


async def test_other_methods_and_paths_are_not_served(client, sink):
    """Only POST to the events path exists."""
    assert (await client.get(URL)).status == 405
    assert (await client.post("/one/klient", data=EXAMPLE_BODY, headers=GOOD_HEADERS)).status == 404
    assert sink.published == []


async def test_unknown_paths_and_methods_are_counted_like_any_rejection(client, metrics):
    """404 and 405 from the router get a reason in the rejection counter (and a log line)."""
    assert (await client.post("/nowhere", data=EXAMPLE_BODY, headers=GOOD_HEADERS)).status == 404
    response = await client.get(URL)
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    for reason in ("not_found", "method_not_allowed"):
        assert (
            metrics.registry.get_sample_value(
                "onebridge_webhook_rejections_total", {"reason": reason}
            )
            == 1
        )


async def test_two_authorization_headers_are_refused(client, sink):
    """Which one counts would be a guess: neither does."""
    headers = [
        ("Authorization", basic()),
        ("Authorization", basic(password="nope")),
        ("Content-Type", "application/json"),
    ]
    response = await client.post(URL, data=EXAMPLE_BODY, headers=headers)
    assert response.status == 401
    assert sink.published == []


async def raw_request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    first = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return first


@pytest.mark.parametrize(
    ("authorization", "status_line"),
    [(basic(), b"HTTP/1.1 100 Continue"), (basic(password="nope"), b"HTTP/1.1 401")],
)
async def test_expect_continue_is_answered_only_after_the_checks(
    aiohttp_raw_server, make_receiver, authorization, status_line
):
    """A sender waiting for 100 Continue learns about wrong credentials before the body."""
    server = await aiohttp_raw_server(make_receiver().handle)
    first = await raw_request(
        server.port,
        b"POST /one/klient/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + authorization.encode() + b"\r\nExpect: 100-continue\r\n"
        b"Content-Length: 267\r\n\r\n",
    )
    assert first.startswith(status_line)


@pytest.mark.parametrize(
    ("path", "expect", "status_line"),
    [
        (b"/one/klient/events", b"foo", b"HTTP/1.1 417"),
        (b"/one/klient/events", b"100-continue, foo", b"HTTP/1.1 417"),
        (b"/one/klient/events", b"100-continue\r\nExpect: foo", b"HTTP/1.1 417"),
        (b"/one/nobody/events", b"foo", b"HTTP/1.1 404"),
    ],
)
async def test_an_unknown_expectation_is_a_417_after_the_other_checks(
    aiohttp_raw_server, make_receiver, metrics, path, expect, status_line
):
    """Expect other than 100-continue: 417 with the JSON error, counted, in the table's order
    (an unknown tenant is still a 404)."""
    server = await aiohttp_raw_server(make_receiver().handle)
    first = await raw_request(
        server.port,
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + basic().encode() + b"\r\nExpect: " + expect + b"\r\n"
        b"Content-Length: 267\r\n\r\n",
    )
    assert first.startswith(status_line)
    if status_line.endswith(b"417"):
        sample = metrics.registry.get_sample_value
        assert sample("onebridge_webhook_rejections_total", {"reason": "expectation_failed"}) == 1


@pytest.mark.parametrize(
    "path", ["/one/klient%2Fevents", "/one/klient/events%2F", "/one/kl%ff/events"]
)
async def test_an_encoded_slash_is_no_separator(client, sink, path):
    """%2F belongs to its segment (RFC 3986): such a target is no callback URL, 404."""
    response = await client.post(path, data=EXAMPLE_BODY, headers=GOOD_HEADERS)
    assert response.status == 404
    assert sink.published == []


async def test_an_encoded_tenant_and_a_query_string_still_match(client, sink):
    """/one/kl%69ent/events?x=1 is klient's callback URL."""
    response = await client.post(
        "/one/kl%69ent/events?x=1", data=EXAMPLE_BODY, headers=GOOD_HEADERS
    )
    assert response.status == 200
    assert len(sink.published) == 1


async def test_any_differing_one_tenant_header_is_a_mismatch(aiohttp_raw_server, make_receiver):
    """Two one-tenant headers, the first right and the second wrong: 400, not only the first
    is compared."""
    server = await aiohttp_raw_server(make_receiver().handle)
    first = await raw_request(
        server.port,
        b"POST /one/klient/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + basic().encode() + b"\r\none-tenant: klient\r\n"
        b"one-tenant: other\r\nContent-Length: %d\r\n\r\n" % len(EXAMPLE_BODY) + EXAMPLE_BODY,
    )
    assert first.startswith(b"HTTP/1.1 400")


async def test_an_idle_keepalive_connection_is_closed_after_its_timeout(make_receiver):
    """After an answer, a connection that sends nothing more is closed by the server."""
    runner = GuardedServerRunner(
        make_receiver(receiver={"keepalive_timeout_seconds": 0.2}).server()
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 404")
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF: the server closed it
        assert b"404" not in rest and reader.at_eof()
        writer.close()
    finally:
        await runner.cleanup()


async def test_sender_hanging_up_mid_body_is_a_rejection_not_a_failure(make_receiver, metrics):
    """A half-sent body is the sender's doing: counted as incomplete_body, never 'failed'."""
    # The production runner: the test server would cancel the handler when the client leaves.
    runner = GuardedServerRunner(make_receiver().server())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    _, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    writer.write(
        b"POST /one/klient/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + basic().encode() + b'\r\nContent-Length: 500\r\n\r\n{"type"'
    )
    await writer.drain()

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    await wait_until(lambda: sample("onebridge_webhook_requests_in_flight") == 1)  # reading
    writer.close()
    await writer.wait_closed()
    await wait_until(
        lambda: sample("onebridge_webhook_rejections_total", reason="incomplete_body") == 1
    )
    assert sample("onebridge_webhook_requests_total", event_type="unknown", outcome="failed") == 0
    await runner.cleanup()


async def test_content_encoding_that_does_not_decode_is_a_400(client, sink):
    """gzip announced, not gzip sent: a plain 400, never a retryable 5xx."""
    headers = {**GOOD_HEADERS, "Content-Encoding": "gzip"}
    response = await client.post(URL, data=b"definitely not gzip", headers=headers)
    assert response.status == 400
    assert sink.published == []


async def test_not_ready_when_the_broker_is_away_and_the_spool_is_full(
    receiver_client, make_receiver
):
    """Readiness means 'an event arriving now would be taken'; a full spool cannot take it."""
    app = make_receiver()
    client = await receiver_client(app)
    delivery = app.delivery
    sink = delivery._sink
    sink.is_connected = False
    assert delivery.can_accept
    for n in range(3):
        body = callback("CartOpened", f"fill-{n}")
        assert (await client.post(URL, data=body, headers=GOOD_HEADERS)).status == 200
    assert not delivery.can_accept
    sink.is_connected = True
    assert delivery.can_accept
