"""Fast AMQP publisher: pre-built frames, one socket write per loop turn, confirms by tag range.

Same seam and guarantees as publisher.AmqpPublisher: `publish()` returns only after RabbitMQ
acked that message; a nack, a return, a closed channel or connection, a blocked connection
and the deadline raise PublishError. Messages are persistent and mandatory, on exchanges that
name `one-bridge.unrouted` as their alternate. Heartbeats are sent and checked, and after a lost
connection it reconnects and declares its topology again.

Why not aio-pika here: per message it takes a lock, enters async context managers and a
timeout, builds three frames with pamqp and writes them one by one. Here the method frame is
cached per (exchange, routing key), the content header is packed by hand, everything queued in
one loop turn leaves in one write, acks settle every message up to a tag at once, and one
periodic sweep enforces the deadlines of all messages in flight. pamqp still encodes and
decodes every other (rare) frame.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, cast

import structlog
from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.common import FieldTable
from pamqp.header import ContentHeader
from yarl import URL

from bridge.config import BrokerConfig
from bridge.errors import PublishError
from bridge.events import UNROUTED_EXCHANGE, WebhookEvent
from bridge.publisher import APP_ID, log_connect_failure, rfc3339
from bridge.redact import redact_text, redact_url

log = structlog.get_logger("bridge.fastpublisher")

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY, _FRAME_HEARTBEAT = 1, 2, 3, 8
_FRAME_END = 0xCE
_FRAME_OVERHEAD = 8  # type, channel, size ... end
_HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_ACK_PREFIX = b"\x00\x3c\x00\x50"  # Basic.Ack: class 60, method 80
_FRAME_MAX_BYTES = 131_072
_BASIC_CLASS = 60
# Basic property flags, in the order the properties follow them on the wire.
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE = 1 << 15, 1 << 13, 1 << 12
_MESSAGE_ID, _TIMESTAMP, _TYPE, _APP_ID = 1 << 7, 1 << 6, 1 << 5, 1 << 3
_FLAGS = _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _MESSAGE_ID | _TIMESTAMP | _TYPE | _APP_ID
_PERSISTENT = 2
_CAPABILITIES: FieldTable = {
    "publisher_confirms": True,
    "basic.nack": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
}
_FIRST_CONNECT_DELAYS_SECONDS = (0.5, 1, 2, 5)
_SWEEP_INTERVAL_SECONDS = 0.05


def _short(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise PublishError("channel_error", "an AMQP short string is longer than 255 bytes")
    return bytes((len(data),)) + data


def _long_string_field(name: str, value: str) -> bytes:
    data = value.encode()
    return _short(name) + b"S" + struct.pack(">I", len(data)) + data


_CONTENT_TYPE_FIELD = _short("application/json")
_APP_ID_FIELD = _short(APP_ID)
_EXAMPLE_FIELD = _short("x-one-example") + b"t\x01"


def header_payload(event: WebhookEvent) -> bytes:
    """The content header of an event's message, packed by hand (pamqp is the reference)."""
    # Keys in sorted order, as pamqp writes tables: the same bytes as the reference encoder.
    table = (
        _long_string_field("x-one-event-type", event.event_type)
        + (_EXAMPLE_FIELD if event.is_example else b"")
        + _long_string_field("x-one-received-at", rfc3339(event.received_at))
        + _long_string_field("x-one-tenant", event.tenant)
    )
    return b"".join(
        (
            struct.pack(">HHQH", _BASIC_CLASS, 0, len(event.body), _FLAGS),
            _CONTENT_TYPE_FIELD,
            struct.pack(">I", len(table)),
            table,
            bytes((_PERSISTENT,)),
            _short(event.event_id),
            struct.pack(">Q", int(event.received_at)),
            _short(event.event_type),
            _APP_ID_FIELD,
        )
    )


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def publish_method_frame(channel: int, exchange: str, routing_key: str) -> bytes:
    """Basic.Publish, mandatory: a message no queue and no alternate takes is returned."""
    payload = struct.pack(">HHH", _BASIC_CLASS, 40, 0) + _short(exchange) + _short(routing_key)
    return _frame(_FRAME_METHOD, channel, payload + b"\x01")


class _Pending:
    __slots__ = ("deadline", "event_id", "event_type", "future", "started")

    def __init__(
        self, future: asyncio.Future[None], event: WebhookEvent, started: float, deadline: float
    ) -> None:
        self.future = future
        self.event_id = event.event_id
        self.event_type = event.event_type
        self.started = started
        self.deadline = deadline


class _Link(asyncio.Protocol):
    """One connection to RabbitMQ with one confirm channel; discarded when it is lost."""

    def __init__(self, publisher: FastPublisher) -> None:
        self._publisher = publisher
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._in = bytearray()
        self._out = bytearray()
        self._flush_scheduled = False
        self.channel = 0
        self.is_channel_open = False
        self.is_blocked = False
        self.frame_max = _FRAME_MAX_BYTES
        self.heartbeat_seconds = 0
        self.last_received = self._loop.time()
        self.last_sent = self._loop.time()
        self.next_tag = 1
        self.pending: OrderedDict[int, _Pending] = OrderedDict()
        self.declared: set[str] = set()
        self._method_frames: dict[tuple[str, str], bytes] = {}
        self._waiters: list[tuple[int, tuple[type[Frame], ...], asyncio.Future[Frame]]] = []
        # A Basic.Return is followed by its header and body; the header names the message.
        self._returned_ids: set[str] = set()
        self._expect_return_header = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are transports.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_received = self._loop.time()
        self._in += data
        try:
            self._parse()
        except Exception as exc:  # a frame we cannot read: this connection is unusable
            log.error("broker.protocol_error", error=redact_text(str(exc))[:200])
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_channel_open = False
        self._fail_everything("disconnected")
        if not self.closed.done():
            self.closed.set_result(None)

    # --- writing ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._out += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes(self._out))
            self.last_sent = self._loop.time()
        self._out.clear()

    def send_method(self, channel: int, method: Frame) -> None:
        self.write(frame.marshal(method, channel))

    async def rpc(self, channel: int, method: Frame, *replies: type[Frame]) -> Frame:
        waiter: asyncio.Future[Frame] = self._loop.create_future()
        self._waiters.append((channel, replies, waiter))
        self.send_method(channel, method)
        return await waiter

    async def expect(self, *replies: type[Frame]) -> Frame:
        waiter: asyncio.Future[Frame] = self._loop.create_future()
        self._waiters.append((0, replies, waiter))
        return await waiter

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- publishing ---------------------------------------------------------------------------

    def publish(
        self, event: WebhookEvent, exchange: str, started: float, deadline: float
    ) -> asyncio.Future[None]:
        key = (exchange, event.event_type)
        method = self._method_frames.get(key)
        if method is None:
            method = self._method_frames[key] = publish_method_frame(
                self.channel, exchange, event.event_type
            )
        body = event.body
        out = self._out
        out += method
        out += _frame(_FRAME_HEADER, self.channel, header_payload(event))
        chunk = self.frame_max - _FRAME_OVERHEAD
        for start in range(0, len(body), chunk):
            out += _frame(_FRAME_BODY, self.channel, body[start : start + chunk])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        future: asyncio.Future[None] = self._loop.create_future()
        self.pending[self.next_tag] = _Pending(future, event, started, deadline)
        self.next_tag += 1
        return future

    def sweep(self, now: float) -> None:
        """Fail what is past its deadline; keep the heartbeat both ways."""
        pending = self.pending
        while pending:
            tag, entry = next(iter(pending.items()))
            if entry.deadline > now:
                break
            del pending[tag]
            self._publisher._settled(entry, "timeout")
        if self.heartbeat_seconds:
            if now - self.last_sent >= self.heartbeat_seconds / 2:
                self.write(_HEARTBEAT_FRAME)
            if now - self.last_received > self.heartbeat_seconds * 2:
                # A silent link: the peer may be gone without a FIN. Reconnect.
                log.warning("broker.heartbeat_missed", seconds=self.heartbeat_seconds * 2)
                self.abort()

    # --- reading ------------------------------------------------------------------------------

    def _parse(self) -> None:
        data = self._in
        position, size = 0, len(data)
        while size - position >= 7:
            frame_type, channel, length = struct.unpack_from(">BHI", data, position)
            end = position + 7 + length
            if end >= size:
                break
            if data[end] != _FRAME_END:
                raise ValueError("frame does not end with 0xCE")
            if (
                frame_type == _FRAME_METHOD
                and length == 13
                and data[position + 7 : position + 11] == _ACK_PREFIX
            ):
                (tag,) = struct.unpack_from(">Q", data, position + 11)
                self._settle(tag, bool(data[position + 19] & 1), None)
            elif frame_type != _FRAME_HEARTBEAT:
                _, _, value = frame.unmarshal(bytes(data[position : end + 1]))
                self._on_frame(channel, value)
            position = end + 1
        del data[:position]

    def _on_frame(self, channel: int, value: Any) -> None:
        if isinstance(value, commands.Basic.Nack):
            self._settle(value.delivery_tag, value.multiple, "nacked")
        elif isinstance(value, commands.Basic.Return):
            self._expect_return_header = True
        elif isinstance(value, ContentHeader):
            if self._expect_return_header and value.properties.message_id:
                self._returned_ids.add(value.properties.message_id)
            self._expect_return_header = False
        elif isinstance(value, ContentBody):
            pass  # the returned message's body: we keep the original
        elif isinstance(value, commands.Connection.Blocked):
            self._set_blocked(True, value.reason)
        elif isinstance(value, commands.Connection.Unblocked):
            self._set_blocked(False, "")
        elif isinstance(value, commands.Channel.Close):
            self.send_method(channel, commands.Channel.CloseOk())
            self._channel_closed(channel, value)
        elif isinstance(value, commands.Connection.Close):
            self.send_method(0, commands.Connection.CloseOk())
            self._fail_waiters(ConnectionError(f"connection closed: {value.reply_text}"))
            self._flush()
            self.abort()
        else:
            self._answer_waiter(channel, value)

    def _answer_waiter(self, channel: int, value: Frame) -> None:
        for index, (wanted_channel, replies, waiter) in enumerate(self._waiters):
            if wanted_channel == channel and isinstance(value, replies):
                del self._waiters[index]
                if not waiter.done():
                    waiter.set_result(value)
                return

    def _settle(self, tag: int, multiple: bool, failure: str | None) -> None:
        pending = self.pending
        settled: list[_Pending] = []
        if multiple:
            while pending:
                first = next(iter(pending))
                if first > tag:
                    break
                settled.append(pending.pop(first))
        else:
            entry = pending.pop(tag, None)
            if entry is not None:
                settled.append(entry)
        returned = self._returned_ids
        for entry in settled:
            result = failure
            if result is None and returned and entry.event_id in returned:
                returned.discard(entry.event_id)
                result = "returned"
            self._publisher._settled(entry, result)

    def _set_blocked(self, is_blocked: bool, reason: str) -> None:
        self.is_blocked = is_blocked
        if is_blocked:
            log.warning("broker.blocked", reason=reason)
        else:
            log.info("broker.unblocked")

    def _channel_closed(self, channel: int, close: commands.Channel.Close) -> None:
        log.warning(
            "broker.channel_closed", reply_code=close.reply_code, reply_text=close.reply_text
        )
        self.is_channel_open = False
        self._fail_waiters(
            PublishError("channel_error", f"{close.reply_code} {close.reply_text}"), channel
        )
        self._fail_pending("channel_error")
        self._publisher._channel_lost(self)

    def _fail_everything(self, reason: str) -> None:
        self._fail_waiters(ConnectionError("connection lost"))
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        pending, self.pending = self.pending, OrderedDict()
        for entry in pending.values():
            self._publisher._settled(entry, reason)

    def _fail_waiters(self, exc: BaseException, channel: int | None = None) -> None:
        keep = []
        for waiter_channel, replies, waiter in self._waiters:
            if channel is not None and waiter_channel != channel:
                keep.append((waiter_channel, replies, waiter))
            elif not waiter.done():
                waiter.set_exception(exc)
        self._waiters = keep


class FastPublisher:
    """The publisher behind delivery.Sink for `[broker] publisher = "fast"`."""

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
        self._link: _Link | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._is_closing = False

    @property
    def is_connected(self) -> bool:
        link = self._link
        return link is not None and link.is_channel_open and self._ready.is_set()

    @property
    def is_blocked(self) -> bool:
        link = self._link
        return link is not None and link.is_blocked

    async def wait_connected(self) -> None:
        await self._ready.wait()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep_connected(), name="broker-connect")
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="confirm-sweeper")

    async def close(self) -> None:
        self._is_closing = True
        for task in (self._task, self._sweeper):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._sweeper) if t is not None), return_exceptions=True
        )
        link, self._link = self._link, None
        self._ready.clear()
        if link is not None and link.transport is not None:
            link.send_method(
                0,
                commands.Connection.Close(
                    reply_code=200, reply_text="bye", class_id=0, method_id=0
                ),
            )
            link._flush()
            link.transport.close()
            await asyncio.wait({link.closed}, timeout=2)

    async def publish(self, event: WebhookEvent, exchange_name: str, *, timeout: float) -> None:
        """Return once the broker confirmed the message; raise PublishError otherwise."""
        link = self._link
        if link is None or not link.is_channel_open or not self._ready.is_set():
            self._on_publish(event.event_type, "disconnected", 0.0)
            raise PublishError("disconnected")
        if link.is_blocked:
            self._on_publish(event.event_type, "blocked", 0.0)
            raise PublishError("blocked")
        loop = asyncio.get_running_loop()
        started = loop.time()
        if exchange_name not in link.declared:
            try:
                await asyncio.wait_for(self._declare_exchange(link, exchange_name), timeout)
            except (TimeoutError, ConnectionError) as exc:
                reason = "timeout" if isinstance(exc, TimeoutError) else "disconnected"
                self._on_publish(event.event_type, reason, loop.time() - started)
                raise PublishError(reason) from None
            except PublishError as exc:
                self._on_publish(event.event_type, exc.reason, loop.time() - started)
                raise
        await link.publish(event, exchange_name, started, started + timeout)

    # --- called by the link --------------------------------------------------------------------

    def _settled(self, entry: _Pending, failure: str | None) -> None:
        seconds = asyncio.get_running_loop().time() - entry.started
        self._on_publish(entry.event_type, failure or "confirmed", seconds)
        if entry.future.done():
            return  # the caller went away (cancelled); the outcome is counted all the same
        if failure is None:
            entry.future.set_result(None)
        else:
            entry.future.set_exception(PublishError(failure))

    def _channel_lost(self, link: _Link) -> None:
        if link is self._link and not self._is_closing:
            # Reopen on a fresh channel; until then is_connected is False and events spool.
            asyncio.get_running_loop().create_task(self._reopen_channel(link))

    # --- connection management -----------------------------------------------------------------

    async def _keep_connected(self) -> None:
        url = self._config.url.get_secret_value()
        attempt = 0
        while True:
            try:
                link = await asyncio.wait_for(
                    self._connect(url), self._config.connect_timeout_seconds
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delays = _FIRST_CONNECT_DELAYS_SECONDS
                delay = delays[min(attempt, len(delays) - 1)]
                log_connect_failure(exc, url, attempt, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self._link = link
            self._ready.set()
            log.info("broker.connected", url=redact_url(url))
            self._on_state_change(True)
            await asyncio.shield(link.closed)
            self._ready.clear()
            if not self._is_closing:
                log.warning("broker.disconnected")
                self._on_state_change(False)
            await asyncio.sleep(self._config.reconnect_interval_seconds)

    async def _connect(self, url_text: str) -> _Link:
        url = URL(url_text)
        assert url.host is not None  # config validation requires one
        is_tls = url.scheme == "amqps"
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(
            lambda: _Link(self),
            url.host,
            url.port or (5671 if is_tls else 5672),
            ssl=ssl.create_default_context() if is_tls else None,
        )
        try:
            await self._handshake(link, url)
            await self._open_channel(link, 1)
            await self._declare_topology(link)
        except BaseException:
            link.abort()
            raise
        return link

    async def _handshake(self, link: _Link, url: URL) -> None:
        link.write(PROTOCOL_HEADER)
        await link.expect(commands.Connection.Start)
        credentials = f"\0{url.user or 'guest'}\0{url.password or 'guest'}"
        properties: FieldTable = {
            "product": APP_ID,
            "connection_name": APP_ID,
            "capabilities": _CAPABILITIES,
        }
        tune = await link.rpc(
            0,
            commands.Connection.StartOk(client_properties=properties, response=credentials),
            commands.Connection.Tune,
        )
        assert isinstance(tune, commands.Connection.Tune)
        wanted = self._config.heartbeat_seconds
        heartbeat = min(wanted, tune.heartbeat) if wanted and tune.heartbeat else wanted
        link.heartbeat_seconds = heartbeat
        link.frame_max = min(tune.frame_max or _FRAME_MAX_BYTES, _FRAME_MAX_BYTES)
        link.send_method(
            0,
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=link.frame_max, heartbeat=heartbeat
            ),
        )
        virtual_host = url.path[1:] if len(url.path) > 1 else "/"
        await link.rpc(
            0, commands.Connection.Open(virtual_host=virtual_host), commands.Connection.OpenOk
        )

    async def _open_channel(self, link: _Link, channel: int) -> None:
        await link.rpc(channel, commands.Channel.Open(), commands.Channel.OpenOk)
        await link.rpc(channel, commands.Confirm.Select(), commands.Confirm.SelectOk)
        link.channel = channel
        link.next_tag = 1
        link.declared.clear()
        link._method_frames.clear()
        link.is_channel_open = True

    async def _reopen_channel(self, link: _Link) -> None:
        self._ready.clear()
        self._on_state_change(False)
        try:
            await self._open_channel(link, link.channel + 1)
            await self._declare_topology(link)
        except Exception as exc:
            log.error("broker.channel_reopen_failed", error=redact_text(str(exc))[:200])
            link.abort()  # the reconnect loop takes over
            return
        self._ready.set()
        self._on_state_change(True)

    async def _declare_topology(self, link: _Link) -> None:
        """The unrouted sink first (every exchange names it as alternate), then the rest."""
        channel = link.channel
        await self._declare_exchange(link, UNROUTED_EXCHANGE)
        await link.rpc(
            channel,
            commands.Queue.Declare(queue=UNROUTED_EXCHANGE, durable=True),
            commands.Queue.DeclareOk,
        )
        await link.rpc(
            channel,
            commands.Queue.Bind(
                queue=UNROUTED_EXCHANGE, exchange=UNROUTED_EXCHANGE, routing_key="#"
            ),
            commands.Queue.BindOk,
        )
        for name in self._initial_exchanges:
            await self._declare_exchange(link, name)
        for spec in self._config.queues:
            arguments: FieldTable = {**spec.arguments, "x-queue-type": spec.queue_type}
            await link.rpc(
                channel,
                commands.Queue.Declare(queue=spec.name, durable=True, arguments=arguments),
                commands.Queue.DeclareOk,
            )
            for binding in spec.bindings:
                await self._declare_exchange(link, binding.exchange)
                await link.rpc(
                    channel,
                    commands.Queue.Bind(
                        queue=spec.name, exchange=binding.exchange, routing_key=binding.routing_key
                    ),
                    commands.Queue.BindOk,
                )

    async def _declare_exchange(self, link: _Link, name: str) -> None:
        if name == UNROUTED_EXCHANGE:
            declare = commands.Exchange.Declare(exchange=name, exchange_type="fanout", durable=True)
        else:
            declare = commands.Exchange.Declare(
                exchange=name,
                exchange_type=self._config.exchange_type,
                durable=True,
                arguments={"alternate-exchange": UNROUTED_EXCHANGE},
            )
        await link.rpc(link.channel, declare, commands.Exchange.DeclareOk)
        link.declared.add(name)

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_SECONDS)
            link = self._link
            if link is not None:
                link.sweep(loop.time())
