"""Deliver an accepted event: pick its exchange, publish it under a deadline, bound the load.

Invariant: `accept()` returns only after the broker confirmed the event; every other ending
raises a RejectedEvent (Overloaded, Unavailable) so the sender knows it was not taken.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

import structlog

from bridge.errors import Overloaded, PublishError, Unavailable
from bridge.events import UNROUTED_EXCHANGE, RoutingTable, WebhookEvent

log = structlog.get_logger("bridge.delivery")


class Sink(Protocol):
    """Where events go: a publisher that returns once the broker confirmed."""

    @property
    def is_connected(self) -> bool: ...

    async def publish(self, event: WebhookEvent, exchange_name: str, *, timeout: float) -> None: ...


class Outcome(StrEnum):
    PUBLISHED = "published"
    UNROUTED = "unrouted"


class Delivery:
    def __init__(
        self,
        sink: Sink,
        routes: RoutingTable,
        *,
        publish_timeout_seconds: float,
        max_in_flight: int,
    ) -> None:
        self._sink = sink
        self._routes = routes
        self._timeout = publish_timeout_seconds
        self._max_in_flight = max_in_flight
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def can_accept(self) -> bool:
        return self._sink.is_connected

    async def accept(self, event: WebhookEvent) -> Outcome:
        exchange = self._routes.exchange_for(event.tenant, event.event_type)
        outcome = Outcome.PUBLISHED if exchange is not None else Outcome.UNROUTED
        # A fast 503 beats a growing pile of handlers waiting on the broker.
        if self._in_flight >= self._max_in_flight:
            raise Overloaded(f"{self._in_flight} publishes already in flight")
        self._in_flight += 1
        try:
            await self._sink.publish(event, exchange or UNROUTED_EXCHANGE, timeout=self._timeout)
        except PublishError as exc:
            raise Unavailable(f"broker did not confirm the event ({exc.reason})") from exc
        finally:
            self._in_flight -= 1
        return outcome
