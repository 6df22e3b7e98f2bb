"""One suite, two publishers: the fast one and aio-pika's must behave the same on a real broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from conftest import make_config
from support.amqp import bound_queue, take, unique, wait_until

from bridge.errors import PublishError
from bridge.events import UNROUTED_EXCHANGE, WebhookEvent
from bridge.fastpublisher import FastPublisher
from bridge.publisher import AmqpPublisher

pytestmark = pytest.mark.integration

PUBLISHERS = {"fast": FastPublisher, "aio-pika": AmqpPublisher}


def event(event_id: str, body: bytes = b'{"type": "CartOpened"}', **kw: Any) -> WebhookEvent:
    return WebhookEvent("klient", "CartOpened", event_id, body, 1700000000.5, **kw)


@pytest.fixture(params=sorted(PUBLISHERS))
async def publisher(request, rabbitmq) -> AsyncIterator[Any]:
    cfg = make_config(broker={"url": rabbitmq.url, "heartbeat_seconds": 5})
    results: list[str] = []
    publisher = PUBLISHERS[request.param](
        cfg.broker, exchanges=(), on_publish=lambda t, result, s: results.append(result)
    )
    publisher.results = results  # what on_publish reported, for the metric assertions
    await publisher.start()
    await asyncio.wait_for(publisher.wait_connected(), 30)
    yield publisher
    await publisher.close()


async def test_confirmed_publish_carries_body_and_properties(publisher, rabbitmq):
    """Body untouched; persistent; message_id, type, app_id, headers; routing key = type."""
    exchange = unique("contract")
    async with bound_queue(rabbitmq.url, exchange) as queue:
        await publisher.publish(event("e-1", is_example=True), exchange, timeout=5)
        [message] = await take(queue, 1)
    assert message.body == b'{"type": "CartOpened"}'
    assert (message.message_id, message.type, message.app_id) == ("e-1", "CartOpened", "one-bridge")
    assert message.delivery_mode == 2 and message.content_type == "application/json"
    assert message.routing_key == "CartOpened"
    assert message.headers["x-one-tenant"] == "klient"
    assert message.headers["x-one-example"] is True
    assert message.headers["x-one-received-at"] == "2023-11-14T22:13:20.500Z"
    assert publisher.results == ["confirmed"]


async def test_body_larger_than_a_frame_arrives_whole(publisher, rabbitmq):
    """Bodies over frame_max are split into several body frames."""
    exchange = unique("large")
    body = b'{"pad": "' + b"x" * 300_000 + b'"}'
    async with bound_queue(rabbitmq.url, exchange) as queue:
        await publisher.publish(event("big", body), exchange, timeout=10)
        [message] = await take(queue, 1)
    assert message.body == body


async def test_many_concurrent_publishes_are_each_confirmed_once(publisher, rabbitmq):
    """Confirms settled by tag ranges still answer every caller exactly once, in order."""
    exchange = unique("many")
    async with bound_queue(rabbitmq.url, exchange) as queue:
        await asyncio.gather(
            *(publisher.publish(event(f"m-{n}"), exchange, timeout=10) for n in range(500))
        )
        messages = await take(queue, 500)
    assert [m.message_id for m in messages] == [f"m-{n}" for n in range(500)]
    assert publisher.results == ["confirmed"] * 500


async def test_unroutable_message_goes_to_the_alternate_exchange(publisher, rabbitmq):
    """An exchange without queues hands its messages to one-bridge.unrouted."""
    exchange = unique("nobody")
    async with bound_queue(rabbitmq.url, UNROUTED_EXCHANGE) as queue:
        await publisher.publish(event("lonely"), exchange, timeout=5)
        [message] = await take(queue, 1)
    assert message.exchange == exchange


async def test_nack_from_a_full_queue_raises_nacked(publisher, rabbitmq):
    """x-max-length with reject-publish makes the broker nack: PublishError('nacked')."""
    exchange, queue_name = unique("full"), unique("full-q")
    connection = await aio_pika.connect(rabbitmq.url)
    async with connection:
        channel = await connection.channel()
        target = await channel.declare_exchange(
            exchange, "topic", durable=True, arguments={"alternate-exchange": UNROUTED_EXCHANGE}
        )
        queue = await channel.declare_queue(
            queue_name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await queue.bind(target, "#")
        await publisher.publish(event("first"), exchange, timeout=5)
        with pytest.raises(PublishError) as refused:
            await publisher.publish(event("second"), exchange, timeout=5)
        await queue.delete(if_unused=False, if_empty=False)
    assert refused.value.reason == "nacked"


async def test_deleted_exchange_fails_then_recovers(publisher, rabbitmq):
    """Publishing to an exchange deleted under us fails (never a false confirm); the next
    publish after recovery declares it again and succeeds."""
    exchange = unique("deleted")
    await publisher.publish(event("before"), exchange, timeout=5)
    connection = await aio_pika.connect(rabbitmq.url)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(exchange)
    outcomes = []
    for n in range(20):
        try:
            await publisher.publish(event(f"after-{n}"), exchange, timeout=5)
        except PublishError as exc:
            outcomes.append(exc.reason)
            await wait_until(lambda: publisher.is_connected)
        else:
            outcomes.append("confirmed")
            break
    assert outcomes[-1] == "confirmed"
    assert set(outcomes[:-1]) <= {"channel_error", "disconnected"}


async def test_broker_restart_disconnects_then_reconnects(publisher, rabbitmq):
    """is_connected follows the broker; publishing while down raises at once; back: works."""
    exchange = unique("restart")
    await asyncio.to_thread(rabbitmq.stop_app)
    try:
        await wait_until(lambda: not publisher.is_connected)
        with pytest.raises(PublishError) as down:
            await publisher.publish(event("down"), exchange, timeout=5)
        assert down.value.reason == "disconnected"
    finally:
        await asyncio.to_thread(rabbitmq.start_app)
    await wait_until(lambda: publisher.is_connected, timeout=60)
    async with bound_queue(rabbitmq.url, exchange) as queue:
        await publisher.publish(event("back"), exchange, timeout=5)
        [message] = await take(queue, 1)
    assert message.message_id == "back"


async def test_blocked_connection_is_reported_and_refused(publisher, rabbitmq):
    """A memory alarm blocks publishers: is_blocked, and publish refuses instead of waiting."""
    exchange = unique("blocked")
    await publisher.publish(event("warm"), exchange, timeout=5)  # declared before the alarm
    await asyncio.to_thread(rabbitmq.ctl, "set_vm_memory_high_watermark", "0.0000001")
    try:
        # The broker says connection.blocked in answer to the next publish.
        with pytest.raises(PublishError):
            await publisher.publish(event("trigger"), exchange, timeout=2)
        await wait_until(lambda: publisher.is_blocked)
        with pytest.raises(PublishError) as refused:
            await publisher.publish(event("refused"), exchange, timeout=5)
        assert refused.value.reason == "blocked"
    finally:
        await asyncio.to_thread(rabbitmq.ctl, "set_vm_memory_high_watermark", "0.4")
    await wait_until(lambda: not publisher.is_blocked, timeout=30)


@pytest.mark.parametrize("name", sorted(PUBLISHERS))
async def test_amqps_publishes_are_confirmed_and_verify_the_broker(
    name, rabbitmq, monkeypatch, tmp_path
):
    """Over TLS (amqps://) the broker's certificate is checked against the trust store
    (SSL_CERT_FILE names a private CA): trusted, the publish is confirmed; not, no connection."""
    tls_url = rabbitmq.tls_url
    monkeypatch.setenv("SSL_CERT_FILE", str(rabbitmq.tls_cert_file))
    cfg = make_config(broker={"url": tls_url})
    publisher = PUBLISHERS[name](cfg.broker, exchanges=())
    await publisher.start()
    try:
        await asyncio.wait_for(publisher.wait_connected(), 30)
        exchange = unique("tls")
        async with bound_queue(rabbitmq.url, exchange) as queue:
            await publisher.publish(event("over-tls"), exchange, timeout=10)
            [message] = await take(queue, 1)
        assert message.message_id == "over-tls"
    finally:
        await publisher.close()

    # A trust store without that certificate: the handshake fails, nothing connects.
    empty_store = tmp_path / "empty.pem"
    empty_store.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty_store))
    untrusting = PUBLISHERS[name](cfg.broker, exchanges=())
    await untrusting.start()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(untrusting.wait_connected(), 3)
        with pytest.raises(PublishError):
            await untrusting.publish(event("refused"), unique("tls"), timeout=1)
    finally:
        await untrusting.close()
