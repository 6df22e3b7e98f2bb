"""Loss audit for fault tests: what the bridge answered 2xx must be found in RabbitMQ.

Before the load: `AuditQueues.prepare()` binds durable named queues to the tenant's exchanges (so
they outlive a broker restart). During the fault: `Load` posts callbacks with unique eventIds from
concurrent workers and records every answer. After: `audit()` reads the queues back and compares;
`AuditReport` names what was lost and counts duplicates instead of hiding them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from base64 import b64encode
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel
from conftest import DEV_PASSWORD, DEV_USER
from support.amqp import bound_queue, unique

AUTH = "Basic " + b64encode(f"{DEV_USER}:{DEV_PASSWORD}".encode()).decode()
UNROUTED = "one-bridge.unrouted"
# The documented types and the exchange each goes to for a tenant (README, "default table").
EXCHANGE_PATTERNS = {
    "CartOpened": "p-u-o-m-e-c-cartopened-{tenant}",
    "ClientLogged": "p-u-o-m-e-c-clientlogged-{tenant}",
    "OfferOpened": "p-u-o-m-e-o-offeropened-{tenant}",
}
# A request the bridge leaves unanswered this long is counted as "no answer", not awaited forever.
REQUEST_TIMEOUT_SECONDS = 30.0


def exchanges_of(tenant: str) -> list[str]:
    return [pattern.format(tenant=tenant) for pattern in EXCHANGE_PATTERNS.values()]


def callback_body(event_type: str, event_id: str) -> bytes:
    return b'{"type": "%s", "tenantKey": "t", "clientId": "org:1", "eventId": "%s"}' % (
        event_type.encode(),
        event_id.encode(),
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """What one callback got: HTTP status (None: no answer), body status, timing."""

    event_id: str
    status: int | None
    outcome: str | None  # "published", "spooled", "duplicate", or the error reason
    started_at: float  # time.monotonic()
    seconds: float
    retry_after: str | None = None
    wall_started_at: float = 0.0  # time.time(), to compare with the bridge's log timestamps

    @property
    def is_accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


async def post_callback(
    session: aiohttp.ClientSession, url: str, event_type: str, event_id: str
) -> Answer:
    """One callback; a connection failure or a timeout is an Answer with status None."""
    started, wall_started = time.monotonic(), time.time()
    try:
        async with session.post(
            url,
            data=callback_body(event_type, event_id),
            headers={"Authorization": AUTH, "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
        ) as response:
            payload = await response.json(content_type=None)
            outcome = payload.get("status") or payload.get("error")
            return Answer(
                event_id,
                response.status,
                outcome,
                started,
                time.monotonic() - started,
                response.headers.get("Retry-After"),
                wall_started,
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Answer(
            event_id,
            None,
            type(exc).__name__,
            started,
            time.monotonic() - started,
            wall_started_at=wall_started,
        )


class Load:
    """Posts callbacks with unique eventIds from `workers` concurrent senders, paced at `rate`
    per second in total, until stop() or `limit` callbacks. Every answer is recorded."""

    def __init__(
        self,
        url: str,
        *,
        workers: int = 12,
        rate: float = 150.0,
        limit: int = 5000,
        event_types: Iterable[str] = tuple(EXCHANGE_PATTERNS),
        prefix: str | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix or unique("ev")
        self.answers: list[Answer] = []
        self._workers = workers
        self._interval = 1.0 / rate
        self._limit = limit
        self._types = itertools.cycle(tuple(event_types))
        self._numbers = itertools.count()
        self._sent = 0
        self._should_stop = False
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._started_at = 0.0

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def in_flight(self) -> int:
        """Callbacks sent and not answered yet."""
        return self._sent - len(self.answers)

    @property
    def accepted(self) -> list[Answer]:
        return [a for a in self.answers if a.is_accepted]

    def in_flight_at(self, wall_time: float) -> int:
        """Callbacks sent before `wall_time` (time.time()) and answered after it (call it once
        the load has stopped: every callback has its answer by then)."""
        return sum(
            1
            for a in self.answers
            if a.wall_started_at <= wall_time <= a.wall_started_at + a.seconds
        )

    def accepted_after(self, moment: float) -> int:
        return sum(1 for a in self.answers if a.is_accepted and a.started_at >= moment)

    def answered_after(self, moment: float) -> int:
        return sum(1 for a in self.answers if a.started_at >= moment)

    async def start(self) -> Load:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._workers))
        self._started_at = time.monotonic()
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]
        return self

    def halt(self) -> None:
        """Send no new callbacks; the ones in flight go on (stop() awaits them)."""
        self._should_stop = True

    async def stop(self) -> None:
        """No new callbacks; returns once every one sent has its answer (or its failure)."""
        self.halt()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            if self._session is not None:
                await self._session.close()

    async def __aenter__(self) -> Load:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _work(self) -> None:
        assert self._session is not None
        while not self._should_stop:
            number = next(self._numbers)
            if number >= self._limit:
                return
            # Pacing the load (a steady rate across the fault), not waiting for anything.
            slot = self._started_at + number * self._interval
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._should_stop:
                return
            self._sent += 1
            answer = await post_callback(
                self._session, self.url, next(self._types), f"{self.prefix}-{number}"
            )
            self.answers.append(answer)


class AuditQueues:
    """Durable named queues bound to the audited exchanges; prepared before the load."""

    def __init__(self, amqp_url: str, tenant: str, *, include_unrouted: bool = False) -> None:
        self.amqp_url = amqp_url
        self.main = unique(f"audit-{tenant}")
        # The alternate exchange keeps what reaches an exchange no queue is bound to (e.g. after
        # the exchange was deleted and declared again, without our binding).
        self.unrouted = unique(f"audit-unrouted-{tenant}") if include_unrouted else None
        self.exchanges = exchanges_of(tenant)

    async def prepare(self) -> AuditQueues:
        async with bound_queue(self.amqp_url, *self.exchanges, name=self.main):
            pass
        if self.unrouted is not None:
            async with bound_queue(self.amqp_url, UNROUTED, name=self.unrouted):
                pass
        return self

    async def read(
        self, expected: set[str], *, prefix: str, timeout: float = 5.0
    ) -> dict[str, Counter[str]]:
        """Every message of this load in each queue, by message_id; waits (bounded) while some
        expected eventId is still missing, then deletes the queues."""
        names = [n for n in (self.main, self.unrouted) if n is not None]
        found: dict[str, Counter[str]] = {name: Counter() for name in names}
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            deadline = time.monotonic() + timeout
            while True:
                for name in names:
                    found[name].update(await _take_all(channel, name, prefix))
                seen = set().union(*found.values())
                if expected <= seen or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)  # polled, bounded: a late replay may still land
            for name in names:
                await channel.queue_delete(name)
        finally:
            await connection.close()
        return found


async def _take_all(channel: AbstractChannel, name: str, prefix: str) -> Counter[str]:
    queue = await channel.get_queue(name)
    ids: Counter[str] = Counter()
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        if message.message_id and message.message_id.startswith(f"{prefix}-"):
            ids[message.message_id] += 1
    return ids


@dataclass
class AuditReport:
    scenario: str
    sent: int
    statuses: Counter[str]  # "200 published", "503 unavailable", "none ClientOSError", ...
    accepted: set[str]
    received: Counter[str]
    via_unrouted: int
    in_flight_at_fault: int | None
    seconds: float
    spool_left: float | None = None  # events the bridge still held when the queue was read
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def lost(self) -> set[str]:
        return self.accepted - set(self.received)

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.received.values())

    @property
    def delivered_unconfirmed(self) -> int:
        """Delivered though the sender got no 2xx (a 503 or no answer): allowed, at-least-once."""
        return len(set(self.received) - self.accepted)

    @property
    def spooled(self) -> int:
        return sum(n for status, n in self.statuses.items() if status.endswith(" spooled"))

    @property
    def refused(self) -> Counter[str]:
        """Every answer that was not a 2xx, by status and reason (or "none" and the error)."""
        return Counter(
            {status: n for status, n in self.statuses.items() if not status.startswith("2")}
        )

    def line(self) -> str:
        extra = "".join(f" {key}={value}" for key, value in self.extra.items())
        return (
            f"[{self.scenario}] sent={self.sent} accepted={len(self.accepted)}"
            f" spooled={self.spooled} lost={len(self.lost)} duplicates={self.duplicates}"
            f" delivered_unconfirmed={self.delivered_unconfirmed} via_unrouted={self.via_unrouted}"
            f" in_flight_at_fault={self.in_flight_at_fault} spool_left={self.spool_left}"
            f" seconds={self.seconds:.1f}"
            f" statuses={dict(sorted(self.statuses.items()))}{extra}"
        )

    def assert_nothing_lost(self) -> None:
        lost = sorted(self.lost)
        assert not lost, f"{len(lost)} accepted events missing, e.g. {lost[:5]}; {self.line()}"
        assert not self.spool_left, f"the spool never drained: {self.line()}"


def status_counts(answers: Iterable[Answer]) -> Counter[str]:
    return Counter(f"{a.status or 'none'} {a.outcome}" for a in answers)


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


async def audit(
    queues: AuditQueues,
    answers: list[Answer],
    *,
    prefix: str,
    scenario: str,
    started_at: float,
    in_flight_at_fault: int | None = None,
    spool_left: float | None = None,
    **extra: object,
) -> AuditReport:
    """Compare the answers with what the queues hold; prints the one-line summary."""
    accepted = {a.event_id for a in answers if a.is_accepted}
    found = await queues.read(accepted, prefix=prefix)
    received: Counter[str] = Counter()
    for counts in found.values():
        received.update(counts)
    report = AuditReport(
        scenario=scenario,
        sent=len(answers),
        statuses=status_counts(answers),
        accepted=accepted,
        received=received,
        via_unrouted=sum(found[queues.unrouted].values()) if queues.unrouted else 0,
        in_flight_at_fault=in_flight_at_fault,
        seconds=time.monotonic() - started_at,
        spool_left=spool_left,
        extra=dict(extra),
    )
    print(report.line())
    return report
