"""Callbacks through the bridge into a real RabbitMQ: bytes, properties, routing, outages."""

from __future__ import annotations

import asyncio
import time
from base64 import b64encode
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aiohttp
import pytest
from conftest import CASES, DEV_PASSWORD, DEV_USER, make_config
from support.amqp import bound_queue, drain, durable_queue, take, unique, wait_until

from bridge.app import Bridge
from bridge.config import Config
from bridge.metrics import Metrics

pytestmark = pytest.mark.integration

EXAMPLE_BODY = (CASES / "documented-example-cartopened.body.json").read_bytes()
EXAMPLE_ID = "13200948-cf44-4853-9eee-88eb9284ea23"
AUTH = "Basic " + b64encode(f"{DEV_USER}:{DEV_PASSWORD}".encode()).decode()


def bridge_config(url: str, tenant: str = "klient", **sections: object) -> Config:
    return make_config(
        broker={"url": url, **sections.pop("broker", {})},  # type: ignore[dict-item]
        tenants={tenant: {"username": DEV_USER, "passwords": [DEV_PASSWORD]}},
        **sections,
    )


@asynccontextmanager
async def running(cfg: Config, metrics: Metrics | None = None) -> AsyncIterator[Bridge]:
    async with Bridge(cfg, metrics=metrics) as bridge:
        await asyncio.wait_for(bridge.publisher.wait_connected(), 30)
        yield bridge


async def post(bridge: Bridge, body: bytes, *, tenant: str = "klient") -> aiohttp.ClientResponse:
    headers = {"Authorization": AUTH, "Content-Type": "application/json", "one-tenant": tenant}
    url = f"http://127.0.0.1:{bridge.receiver_port}/one/{tenant}/events"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        await response.read()
        return response


def callback(event_type: str, event_id: str | None = None) -> bytes:
    return b'{"type": "%s", "tenantKey": "t", "clientId": "org:1", "eventId": "%s"}' % (
        event_type.encode(),
        (event_id or unique("ev")).encode(),
    )


async def test_documented_example_raw_http_arrives_with_identical_bytes(rabbitmq):
    """The case file's raw HTTP request ends up in a queue bound to the documented exchange."""
    request = (CASES / "documented-example-cartopened.http").read_bytes()
    async with (
        running(bridge_config(rabbitmq.url)) as bridge,
        bound_queue(rabbitmq.url, "p-u-o-m-e-c-cartopened-klient") as queue,
    ):
        before = time.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.receiver_port)
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        assert status_line.startswith(b"HTTP/1.1 200")
        [message] = await take(queue, 1)
    assert message.body == EXAMPLE_BODY
    assert message.message_id == EXAMPLE_ID
    assert message.delivery_mode == 2  # persistent
    assert message.content_type == "application/json"
    assert message.type == "CartOpened"
    assert message.app_id == "one-bridge"
    assert message.routing_key == "CartOpened"
    assert message.exchange == "p-u-o-m-e-c-cartopened-klient"
    assert message.headers["x-one-tenant"] == "klient"
    assert message.headers["x-one-event-type"] == "CartOpened"
    received_at = datetime.fromisoformat(message.headers["x-one-received-at"])
    assert received_at.tzinfo is not None
    assert before - 1 <= received_at.timestamp() <= time.time() + 1
    assert message.timestamp is not None
    assert message.timestamp.replace(tzinfo=UTC).timestamp() == pytest.approx(before, abs=2)


@pytest.mark.parametrize(
    ("event_type", "exchange"),
    [
        ("ClientLogged", "p-u-o-m-e-c-clientlogged-klient"),
        ("OfferOpened", "p-u-o-m-e-o-offeropened-klient"),
    ],
)
async def test_other_documented_types_arrive_on_their_exchanges(rabbitmq, event_type, exchange):
    """ClientLogged and OfferOpened go to their documented exchanges, bytes unchanged."""
    body = callback(event_type)
    async with (
        running(bridge_config(rabbitmq.url)) as bridge,
        bound_queue(rabbitmq.url, exchange) as queue,
    ):
        assert (await post(bridge, body)).status == 200
        [message] = await take(queue, 1)
    assert (message.body, message.type, message.routing_key) == (body, event_type, event_type)


async def test_unknown_type_lands_in_the_unrouted_queue(rabbitmq):
    """A type nobody configured is kept in one-bridge.unrouted, not dropped."""
    event_type = unique("NewType")
    body = callback(event_type)
    async with (
        running(bridge_config(rabbitmq.url)) as bridge,
        bound_queue(rabbitmq.url, "one-bridge.unrouted") as queue,
    ):
        response = await post(bridge, body)
        assert response.status == 200
        messages = await take(queue, 1)
    assert messages[0].body == body
    assert messages[0].routing_key == event_type


async def test_event_on_an_exchange_without_queues_is_kept_by_the_alternate_exchange(rabbitmq):
    """Every declared exchange has one-bridge.unrouted as alternate: no silent loss."""
    tenant = unique("lonely")
    body = callback("CartOpened")
    async with (
        running(bridge_config(rabbitmq.url, tenant)) as bridge,
        bound_queue(rabbitmq.url, "one-bridge.unrouted") as queue,
    ):
        assert (await post(bridge, body, tenant=tenant)).status == 200
        [message] = await take(queue, 1)
    assert message.body == body
    assert message.exchange == f"p-u-o-m-e-c-cartopened-{tenant}"


async def test_rejected_callbacks_publish_nothing(rabbitmq):
    """Bad input never reaches the exchange; the next good event is the first message."""
    tenant = unique("strict")
    async with (
        running(bridge_config(rabbitmq.url, tenant)) as bridge,
        bound_queue(rabbitmq.url, f"p-u-o-m-e-c-cartopened-{tenant}") as queue,
    ):
        url = f"http://127.0.0.1:{bridge.receiver_port}/one/{tenant}/events"
        good_headers = {"Authorization": AUTH, "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            for headers, body in [
                ({"Content-Type": "application/json"}, callback("CartOpened")),
                ({**good_headers, "Content-Type": "text/plain"}, callback("CartOpened")),
                (good_headers, b"{not json"),
                (good_headers, b'{"type": "CartOpened"}'),
                ({**good_headers, "one-tenant": "other"}, callback("CartOpened")),
            ]:
                async with session.post(url, data=body, headers=headers) as response:
                    assert 400 <= response.status < 500
        good = callback("CartOpened", "the-good-one")
        assert (await post(bridge, good, tenant=tenant)).status == 200
        [message] = await take(queue, 1)
        assert message.message_id == "the-good-one"
        assert await drain(queue) == []


async def test_configured_queue_is_declared_and_a_nacked_event_is_spooled_then_delivered(
    rabbitmq,
):
    """A [[broker.queues]] entry exists before any consumer, with its arguments: when its
    x-max-length with reject-publish makes the broker nack, the event is spooled (200), and it
    is delivered once the queue has room again."""
    tenant = unique("q")
    queue_name = unique("orders")
    exchange = f"p-u-o-m-e-c-clientlogged-{tenant}"
    queues = [
        {
            "name": queue_name,
            "queue_type": "classic",
            "arguments": {"x-max-length": 1, "x-overflow": "reject-publish"},
            "bindings": [{"exchange": exchange, "routing_key": "ClientLogged"}],
        }
    ]
    cfg = bridge_config(rabbitmq.url, tenant, broker={"queues": queues})
    async with running(cfg) as bridge:
        first = await post(bridge, callback("ClientLogged", "kept"), tenant=tenant)
        assert (await first.json())["status"] == "published"
        refused = await post(bridge, callback("ClientLogged", "over"), tenant=tenant)
        assert (await refused.json())["status"] == "spooled"
        async with durable_queue(rabbitmq.url, queue_name) as queue:
            [kept] = await take(queue, 1)
            [over] = await take(queue, 1)
        assert (kept.message_id, over.message_id) == ("kept", "over")
        await wait_until(lambda: bridge.spool.stats().events == 0)


async def test_broker_outage_spools_and_replays_in_order_without_restart(rabbitmq):
    """Broker stopped: callbacks are spooled and answered 200 (this replaced the main job's 503);
    broker back: the spool is replayed in order, then new events go straight through."""
    tenant = unique("outage")
    exchange = f"p-u-o-m-e-c-cartopened-{tenant}"
    cfg = bridge_config(rabbitmq.url, tenant, broker={"publish_timeout_seconds": 2})
    metrics = Metrics()
    queue_name = unique("outage-queue")
    async with bound_queue(rabbitmq.url, exchange, name=queue_name):
        pass  # durable: it survives the restart below
    async with running(cfg, metrics) as bridge:
        await asyncio.to_thread(rabbitmq.stop_app)
        try:
            await wait_until(lambda: not bridge.publisher.is_connected)
            assert bridge.is_ready()  # the spool takes events
            for n in range(5):
                response = await post(bridge, callback("CartOpened", f"down-{n}"), tenant=tenant)
                assert (await response.json())["status"] == "spooled"
            assert bridge.spool.stats().events == 5
        finally:
            await asyncio.to_thread(rabbitmq.start_app)
        await wait_until(lambda: bridge.spool.stats().events == 0)
        response = await post(bridge, callback("CartOpened", "after"), tenant=tenant)
        assert (await response.json())["status"] == "published"
    async with durable_queue(rabbitmq.url, queue_name) as queue:
        messages = await take(queue, 6)
    assert [m.message_id for m in messages] == [f"down-{n}" for n in range(5)] + ["after"]
    assert metrics.registry.get_sample_value("onebridge_spool_replayed_total") == 5


async def test_bridge_started_without_a_broker_spools_then_delivers_when_it_appears(rabbitmq):
    """RabbitMQ unreachable at start: ready thanks to the spool, events spooled; once the broker
    is reachable they are replayed and new ones go straight through."""
    from urllib.parse import urlsplit

    from support.tcp_proxy import TcpProxy

    target = urlsplit(rabbitmq.url)
    tenant = unique("late")
    async with (
        TcpProxy(target.hostname, target.port) as proxy,
        bound_queue(rabbitmq.url, f"p-u-o-m-e-c-cartopened-{tenant}") as queue,
    ):
        proxy.cut()
        cfg = bridge_config(
            f"amqp://guest:guest@{proxy.host}:{proxy.port}/",
            tenant,
            broker={"connect_timeout_seconds": 1},
        )
        async with Bridge(cfg) as bridge:
            assert bridge.is_ready()
            assert not bridge.publisher.is_connected
            early = await post(bridge, callback("CartOpened", "early"), tenant=tenant)
            assert (await early.json())["status"] == "spooled"
            proxy.restore()
            await asyncio.wait_for(bridge.publisher.wait_connected(), 30)
            await wait_until(lambda: bridge.spool.stats().events == 0)
            late = await post(bridge, callback("CartOpened", "late"), tenant=tenant)
            assert (await late.json())["status"] == "published"
            messages = await take(queue, 2)
    assert [m.message_id for m in messages] == ["early", "late"]
