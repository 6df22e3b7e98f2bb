"""aio-pika publisher: one robust connection, a confirm channel, topology, confirmed publishes."""

from __future__ import annotations

import asyncio
import functools
import math
import ssl
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import aio_pika
import aiormq.exceptions
import structlog
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    FieldValue,
)

from bridge.config import BrokerConfig
from bridge.errors import PublishError
from bridge.events import UNROUTED_EXCHANGE, WebhookEvent
from bridge.redact import redact_text, redact_url

APP_ID = "one-bridge"
# Backoff between attempts to make the very first connection (robust reconnects after it).
_FIRST_CONNECT_DELAYS_SECONDS = (0.5, 1, 2, 5)

log = structlog.get_logger("bridge.publisher")


def rfc3339(unix_seconds: float) -> str:
    """UTC with milliseconds, e.g. 2026-12-03T21:05:09.123Z; the same digits as datetime's."""
    # Split and round as datetime.fromtimestamp does, so the two never disagree.
    fraction, whole = math.modf(unix_seconds)
    micros = round(fraction * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return f"{_utc_second(int(whole))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _utc_second(unix_second: int) -> str:
    # Events arrive many per second: the date and time part is formatted once per second.
    return datetime.fromtimestamp(unix_second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def build_message(event: WebhookEvent) -> aio_pika.Message:
    """The AMQP message for an event: the body untouched, metadata in properties and headers."""
    headers: dict[str, FieldValue] = {
        "x-one-tenant": event.tenant,
        "x-one-event-type": event.event_type,
        "x-one-received-at": rfc3339(event.received_at),
    }
    if event.is_example:
        # The platform's example call (canary, "send test"): consumers may filter on this.
        headers["x-one-example"] = True
    return aio_pika.Message(
        body=event.body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event.event_id,
        type=event.event_type,
        app_id=APP_ID,
        timestamp=datetime.fromtimestamp(event.received_at, UTC),
        headers=headers,
    )


# While the broker stays away, say so again every this many attempts (about a minute).
_REPEAT_FAILURE_LOG_EVERY = 12


def log_connect_failure(exc: BaseException, url: str, attempt: int, delay: float) -> None:
    """First failure and then now and again; a refused topology is an error, not an outage."""
    if attempt % _REPEAT_FAILURE_LOG_EVERY:
        return
    error = redact_text(str(exc))[:200] or type(exc).__name__
    if isinstance(exc, PublishError | aiormq.exceptions.AMQPChannelError):
        # The broker answered but refused a declaration (e.g. a queue argument of the wrong
        # type): retrying will not help until the configuration changes.
        log.error("broker.topology_rejected", error=error, attempts=attempt + 1)
    else:
        log.warning(
            "broker.unreachable",
            url=redact_url(url),
            error=error,
            attempts=attempt + 1,
            retry_in_seconds=delay,
        )


def _cancel_was_requested() -> bool:
    """True when our own task is being cancelled, not a future of the library's."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def failure_reason(exc: BaseException) -> str:
    """Map a library exception to one of errors.PUBLISH_FAILURES."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiormq.exceptions.PublishError):
        return "returned"
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return "nacked"
    if isinstance(exc, aiormq.exceptions.AMQPChannelError):
        return "channel_error"
    return "disconnected"


class AmqpPublisher:
    """Publishes events with publisher confirms; knows nothing about HTTP."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        exchanges: Iterable[str],
        on_state_change: Callable[[bool], None] = lambda is_connected: None,
        on_publish: Callable[[str, str, float], None] = lambda event_type, result, secs: None,
    ) -> None:
        self._config = config
        self._initial_exchanges = tuple(exchanges)
        self._on_state_change = on_state_change
        self._on_publish = on_publish
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractRobustExchange] = {}
        self._declaring: dict[str, asyncio.Task[AbstractRobustExchange]] = {}
        self._ready = asyncio.Event()
        self._connect_task: asyncio.Task[None] | None = None
        self._is_closing = False

    @property
    def is_connected(self) -> bool:
        connection = self._connection
        return (
            self._ready.is_set()
            and connection is not None
            and connection.connected.is_set()
            and self._channel is not None
            and not self._channel.is_closed
        )

    @property
    def is_blocked(self) -> bool:
        """True while RabbitMQ has blocked the connection (connection.blocked: resource alarm)."""
        connection = self._connection
        transport = connection.transport if connection is not None else None
        if transport is None:
            return False
        # aiormq tracks connection.blocked in a private event and exposes no accessor for it.
        unblocked = getattr(transport.connection, "_Connection__connection_unblocked", None)
        return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()

    async def wait_connected(self) -> None:
        await self._ready.wait()

    async def start(self) -> None:
        """Connect in the background; the bridge runs (not ready) while the broker is away."""
        self._connect_task = asyncio.create_task(self._connect_forever(), name="broker-connect")

    async def close(self) -> None:
        self._is_closing = True
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
        self._ready.clear()

    async def publish(self, event: WebhookEvent, exchange_name: str, *, timeout: float) -> None:
        """Return once the broker confirmed the message; raise PublishError otherwise."""
        if not self.is_connected:
            self._on_publish(event.event_type, "disconnected", 0.0)
            raise PublishError("disconnected")
        if self.is_blocked:
            self._on_publish(event.event_type, "blocked", 0.0)
            raise PublishError("blocked")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # aio-pika's robust publish would otherwise wait for a reconnect without bound.
            async with asyncio.timeout(timeout):
                exchange = self._exchanges.get(exchange_name) or await self._declare(exchange_name)
                await exchange.publish(build_message(event), event.event_type, mandatory=True)
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            reason = failure_reason(exc)
            if reason == "channel_error":
                # The exchange may have been deleted under us: declare it again next time.
                self._exchanges.pop(exchange_name, None)
            self._on_publish(event.event_type, reason, loop.time() - started)
            raise PublishError(reason, redact_text(str(exc))[:200]) from exc
        except asyncio.CancelledError as exc:
            if _cancel_was_requested():
                raise
            # aiormq cancels the confirm futures of a connection that closed under them.
            self._on_publish(event.event_type, "disconnected", loop.time() - started)
            raise PublishError("disconnected", "connection closed before the confirm") from exc
        self._on_publish(event.event_type, "confirmed", loop.time() - started)

    async def _declare(self, name: str) -> AbstractRobustExchange:
        # Concurrent first publishes to a new exchange share one declare.
        task = self._declaring.get(name)
        if task is None:
            task = asyncio.create_task(self._declare_exchange(name))
            self._declaring[name] = task
            task.add_done_callback(lambda _: self._declaring.pop(name, None))
        return await asyncio.shield(task)

    async def _declare_exchange(self, name: str) -> AbstractRobustExchange:
        assert self._channel is not None
        if name == UNROUTED_EXCHANGE:
            exchange = await self._channel.declare_exchange(
                name, aio_pika.ExchangeType.FANOUT, durable=True
            )
        else:
            exchange = await self._channel.declare_exchange(
                name,
                self._config.exchange_type,
                durable=True,
                arguments={"alternate-exchange": UNROUTED_EXCHANGE},
            )
        self._exchanges[name] = exchange
        return exchange

    async def _declare_topology(self) -> None:
        """The unrouted sink first (every exchange names it as alternate), then the rest."""
        assert self._channel is not None
        unrouted = await self._declare_exchange(UNROUTED_EXCHANGE)
        queue = await self._channel.declare_queue(UNROUTED_EXCHANGE, durable=True)
        await queue.bind(unrouted, routing_key="#")
        for name in self._initial_exchanges:
            await self._declare_exchange(name)
        for spec in self._config.queues:
            arguments = {**spec.arguments, "x-queue-type": spec.queue_type}
            queue = await self._channel.declare_queue(spec.name, durable=True, arguments=arguments)
            for binding in spec.bindings:
                exchange = self._exchanges.get(binding.exchange) or await self._declare_exchange(
                    binding.exchange
                )
                await queue.bind(exchange, routing_key=binding.routing_key)

    async def _connect_forever(self) -> None:
        url = self._config.url.get_secret_value()
        attempt = 0
        while True:
            try:
                connection = await aio_pika.connect_robust(
                    url,
                    timeout=self._config.connect_timeout_seconds,
                    heartbeat=self._config.heartbeat_seconds,
                    reconnect_interval=self._config.reconnect_interval_seconds,
                    client_properties={"connection_name": APP_ID},
                    ssl_context=ssl.create_default_context() if url.startswith("amqps") else None,
                )
                self._connection = connection
                self._channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                await self._declare_topology()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = _FIRST_CONNECT_DELAYS_SECONDS[
                    min(attempt, len(_FIRST_CONNECT_DELAYS_SECONDS) - 1)
                ]
                log_connect_failure(exc, url, attempt, delay)
                attempt += 1
                if self._connection is not None:
                    await self._connection.close()
                    self._connection = None
                await asyncio.sleep(delay)
                continue
            break
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._ready.set()
        log.info("broker.connected", url=redact_url(url))
        self._on_state_change(True)

    def _on_connection_lost(self, _sender: object, exc: BaseException | None = None) -> None:
        if self._is_closing:
            return
        log.warning("broker.disconnected", error=redact_text(str(exc))[:200] if exc else None)
        self._on_state_change(False)

    def _on_reconnected(self, _sender: object) -> None:
        log.info("broker.connected", reconnected=True)
        self._on_state_change(True)
