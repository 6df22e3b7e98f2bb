"""Deliver an accepted event: publish it under a deadline, or spool it durably; replay the spool.

Invariants:
- `accept()` returns only once the event is confirmed by the broker (PUBLISHED, UNROUTED) or
  committed to the spool (SPOOLED), or was already accepted inside the duplicate window
  (DUPLICATE). Every other ending raises a RejectedEvent, so the sender knows it was not taken.
- Per exchange, events leave in the order they were accepted while the spool holds anything for
  that exchange: new events for it go through the spool, behind the older ones. (Two direct
  publishes already in flight when the first fails can still swap: the failed one is spooled.)
- A spooled record is deleted only after the broker confirmed it (at-least-once: a crash between
  confirm and delete sends it again; consumers deduplicate on message_id).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Protocol

import structlog

from bridge.dedupe import RecentEvents
from bridge.errors import (
    Overloaded,
    PublishError,
    SpoolError,
    SpoolFull,
    SpoolFullRejected,
    Unavailable,
)
from bridge.events import UNROUTED_EXCHANGE, RoutingTable, WebhookEvent

log = structlog.get_logger("bridge.delivery")

# Publish failures that say nothing about the record itself: wait for the broker, then retry.
_TRANSIENT_FAILURES = frozenset({"disconnected", "timeout", "blocked"})
# Pause before retrying a batch the broker refused part of (nack: often a full queue).
_REFUSED_RETRY_SECONDS = 1.0
# Without a wake-up, the replayer still looks this often (a missed transition costs no more).
_REPLAY_POLL_SECONDS = 1.0
# A batch that only timed out is not sent again at once: a frozen broker that wakes up would
# confirm every copy. The pause doubles up to this bound and resets on the next confirm.
_TIMEOUT_BACKOFF_MAX_SECONDS = 30.0


class Sink(Protocol):
    """Where events go: a publisher that returns once the broker confirmed."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def is_blocked(self) -> bool: ...

    async def publish(self, event: WebhookEvent, exchange_name: str, *, timeout: float) -> None: ...


class SpooledRecord(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def exchange(self) -> str: ...

    @property
    def event(self) -> WebhookEvent: ...


class Spool(Protocol):
    """The durable outbox (spool.SqliteSpool)."""

    async def append(self, exchange: str, event: WebhookEvent) -> int: ...

    async def head(self, limit: int) -> Sequence[SpooledRecord]: ...

    async def probe(self) -> None: ...

    async def delete(self, seqs: Sequence[int]) -> None: ...

    async def dead_letter(self, seq: int, reason: str) -> None: ...

    def exchanges_pending(self) -> frozenset[str]: ...

    def is_full(self) -> bool: ...


class Outcome(StrEnum):
    PUBLISHED = "published"
    UNROUTED = "unrouted"
    SPOOLED = "spooled"
    DUPLICATE = "duplicate"


class Delivery:
    def __init__(
        self,
        sink: Sink,
        spool: Spool,
        routes: RoutingTable,
        recent: RecentEvents,
        *,
        publish_timeout_seconds: float,
        max_in_flight: int,
        on_spooled: Callable[[], None] = lambda: None,
    ) -> None:
        self._sink = sink
        self._spool = spool
        self._routes = routes
        self._recent = recent
        self._timeout = publish_timeout_seconds
        self._max_in_flight = max_in_flight
        self._on_spooled = on_spooled
        self._in_flight = 0
        # Accepts under way per (tenant, eventId): a parallel duplicate waits for the first.
        self._accepting: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self.is_spool_writable = True

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def can_accept(self) -> bool:
        """Readiness: an event arriving now would be published or spooled."""
        if self._sink.is_connected and not self._sink.is_blocked:
            return True
        return self.is_spool_writable and not self._spool.is_full()

    async def accept(self, event: WebhookEvent) -> Outcome:
        if event.is_example or not self._recent.is_enabled:
            return await self._deliver(event)
        key = (event.tenant, event.event_id)
        if self._recent.contains(*key):
            return Outcome.DUPLICATE
        earlier = self._accepting.get(key)
        if earlier is not None and await asyncio.shield(earlier):
            return Outcome.DUPLICATE
        attempt: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._accepting[key] = attempt
        try:
            outcome = await self._deliver(event)
        except BaseException:
            attempt.set_result(False)
            raise
        finally:
            if self._accepting.get(key) is attempt:
                del self._accepting[key]
        self._recent.add(*key)
        attempt.set_result(True)
        return outcome

    async def _deliver(self, event: WebhookEvent) -> Outcome:
        exchange = self._routes.exchange_for(event.tenant, event.event_type)
        target = exchange or UNROUTED_EXCHANGE
        if self._must_spool(target):
            return await self._append(target, event)
        # A fast 503 beats a growing pile of handlers waiting on the broker.
        if self._in_flight >= self._max_in_flight:
            raise Overloaded(f"{self._in_flight} publishes already in flight")
        self._in_flight += 1
        try:
            await self._sink.publish(event, target, timeout=self._timeout)
        except PublishError as exc:
            log.warning("publish.failed", reason=exc.reason, event_id=event.event_id)
            return await self._append(target, event)
        finally:
            self._in_flight -= 1
        return Outcome.PUBLISHED if exchange is not None else Outcome.UNROUTED

    def _must_spool(self, exchange: str) -> bool:
        # Behind older spooled events for the same exchange, or straight away when a publish
        # cannot succeed now (a blocked connection would only make the sender wait).
        return (
            not self._sink.is_connected
            or self._sink.is_blocked
            or exchange in self._spool.exchanges_pending()
        )

    async def _append(self, exchange: str, event: WebhookEvent) -> Outcome:
        try:
            await self._spool.append(exchange, event)
        except SpoolFull as exc:
            raise SpoolFullRejected("spool is full; retry later") from exc
        except SpoolError as exc:
            self._set_spool_writable(False, exc)
            raise Unavailable("broker unavailable and spool not writable") from exc
        self._set_spool_writable(True)
        self._on_spooled()
        return Outcome.SPOOLED

    async def recheck_spool(self) -> None:
        """While the spool is marked unwritable, try a write: once the disk has room again,
        readiness comes back without waiting for a callback (a not-ready bridge gets none)."""
        if self.is_spool_writable:
            return
        try:
            await self._spool.probe()
        except SpoolError:
            return
        self._set_spool_writable(True)

    def _set_spool_writable(self, is_writable: bool, exc: BaseException | None = None) -> None:
        if is_writable == self.is_spool_writable:
            return
        self.is_spool_writable = is_writable
        if is_writable:
            log.info("spool.writable")
        else:
            log.error("spool.unwritable", error=str(exc))


class Replayer:
    """Publishes spooled events in FIFO order once the broker takes them; deletes on confirm."""

    def __init__(
        self,
        spool: Spool,
        sink: Sink,
        *,
        publish_timeout_seconds: float,
        batch_size: int,
        max_attempts: int,
        on_replayed: Callable[[int], None] = lambda count: None,
        on_dead_letter: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._spool = spool
        self._sink = sink
        self._timeout = publish_timeout_seconds
        self._batch_size = batch_size
        self._max_attempts = max_attempts
        self._on_replayed = on_replayed
        self._on_dead_letter = on_dead_letter
        self._wakeup = asyncio.Event()
        self._should_exit = False
        self._task: asyncio.Task[None] | None = None
        # Refusals per record, in memory: a restart gives every record a fresh count.
        self._refusals: Counter[int] = Counter()
        self._timeout_backoff_seconds = 0.0

    def wake(self) -> None:
        self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="spool-replayer")

    async def stop(self) -> None:
        """Finish the batch under way, then return; unconfirmed records stay spooled."""
        self._should_exit = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def drain(self) -> int:
        """Replay until the spool is empty or the broker stops taking events; returns the count."""
        replayed = 0
        while not self._should_exit and self._sink.is_connected:
            batch = await self._spool.head(self._batch_size)
            if not batch:
                break
            confirmed, progressed = await self._replay_batch(batch)
            replayed += confirmed
            if not progressed:
                break
        return replayed

    async def _run(self) -> None:
        while not self._should_exit:
            try:
                async with asyncio.timeout(_REPLAY_POLL_SECONDS):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                if await self.drain():
                    log.info("spool.drained")
            except Exception:
                # The spool or a bug: log it and keep the task alive, records stay spooled.
                log.exception("spool.replay_failed")
                await asyncio.sleep(_REFUSED_RETRY_SECONDS)

    async def _replay_batch(self, batch: Sequence[SpooledRecord]) -> tuple[int, bool]:
        """Publish a batch in order; delete what was confirmed. Returns (confirmed, progressed)."""
        results = await asyncio.gather(
            *(self._publish(record) for record in batch), return_exceptions=True
        )
        confirmed = [r.seq for r, result in zip(batch, results, strict=True) if result is None]
        await self._spool.delete(confirmed)
        for seq in confirmed:
            self._refusals.pop(seq, None)
        if confirmed:
            self._on_replayed(len(confirmed))
        refused = False
        for record, result in zip(batch, results, strict=True):
            if isinstance(result, PublishError) and result.reason not in _TRANSIENT_FAILURES:
                refused = True
                await self._count_refusal(record, result.reason)
            elif isinstance(result, Exception) and not isinstance(result, PublishError):
                raise result
            # A bare CancelledError (a library future cancelled under us) is only unconfirmed:
            # the record stays spooled for the next round; re-raising it would end this task.
        if refused and not confirmed:
            await asyncio.sleep(_REFUSED_RETRY_SECONDS)
        if confirmed:
            self._timeout_backoff_seconds = 0.0
        elif any(isinstance(r, PublishError) and r.reason == "timeout" for r in results):
            self._timeout_backoff_seconds = min(
                max(self._timeout_backoff_seconds * 2, _REPLAY_POLL_SECONDS),
                _TIMEOUT_BACKOFF_MAX_SECONDS,
            )
            await self._pause(self._timeout_backoff_seconds)
        return len(confirmed), bool(confirmed) or refused

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake for stop()."""
        try:
            async with asyncio.timeout(seconds):
                while not self._should_exit:
                    await self._wakeup.wait()
                    self._wakeup.clear()
        except TimeoutError:
            pass

    async def _publish(self, record: SpooledRecord) -> None:
        await self._sink.publish(record.event, record.exchange, timeout=self._timeout)

    async def _count_refusal(self, record: SpooledRecord, reason: str) -> None:
        # A nack is most often a full queue (x-overflow reject-publish): retried, never set aside.
        if reason == "nacked":
            return
        self._refusals[record.seq] += 1
        if self._refusals[record.seq] >= self._max_attempts:
            self._refusals.pop(record.seq, None)
            await self._spool.dead_letter(record.seq, reason)
            self._on_dead_letter(reason)
            log.error(
                "spool.record_dead_lettered",
                seq=record.seq,
                event_id=record.event.event_id,
                exchange=record.exchange,
                reason=reason,
            )
