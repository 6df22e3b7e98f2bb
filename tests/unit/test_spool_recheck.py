"""Readiness after a spool write failure comes back by itself once writes succeed again."""

from __future__ import annotations

import pytest

from bridge.dedupe import RecentEvents
from bridge.delivery import Delivery
from bridge.errors import SpoolError, Unavailable
from bridge.events import RoutingTable, WebhookEvent, documented_exchanges


class DisconnectedSink:
    is_connected = False
    is_blocked = False


class DiskSpool:
    """Every write fails while `is_broken`."""

    def __init__(self) -> None:
        self.is_broken = False
        self.appended: list[str] = []

    async def append(self, exchange: str, event: WebhookEvent) -> int:
        if self.is_broken:
            raise SpoolError("spool append failed: disk full")
        self.appended.append(event.event_id)
        return len(self.appended)

    async def probe(self) -> None:
        if self.is_broken:
            raise SpoolError("spool probe failed: disk full")

    def exchanges_pending(self) -> frozenset[str]:
        return frozenset()

    def is_full(self) -> bool:
        return False


async def test_recheck_restores_readiness_only_once_a_write_succeeds():
    spool = DiskSpool()
    delivery = Delivery(
        DisconnectedSink(),  # type: ignore[arg-type]
        spool,  # type: ignore[arg-type]
        RoutingTable({"klient": documented_exchanges("klient")}),
        RecentEvents(window_seconds=60, max_events=100),
        publish_timeout_seconds=1,
        max_in_flight=10,
    )
    spool.is_broken = True
    with pytest.raises(Unavailable):
        await delivery.accept(WebhookEvent("klient", "CartOpened", "e1", b"{}", 1.0))
    assert not delivery.can_accept

    await delivery.recheck_spool()
    assert not delivery.can_accept  # still broken: the probe failed too

    spool.is_broken = False
    await delivery.recheck_spool()
    assert delivery.can_accept
    assert spool.appended == []  # the probe wrote no event
