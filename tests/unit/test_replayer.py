"""The replayer against fakes: order, deletion after confirm, backoff after timeouts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bridge.delivery import Replayer
from bridge.errors import PublishError
from bridge.events import WebhookEvent


@dataclass(frozen=True)
class Record:
    seq: int
    exchange: str
    event: WebhookEvent


class FakeSpool:
    def __init__(self, count: int) -> None:
        self.records = [
            Record(n, "ex", WebhookEvent("t", "CartOpened", f"e{n}", b"{}", 1.0))
            for n in range(count)
        ]
        self.dead: list[tuple[int, str]] = []

    async def head(self, limit: int) -> list[Record]:
        return self.records[:limit]

    async def delete(self, seqs) -> None:
        self.records = [r for r in self.records if r.seq not in set(seqs)]

    async def dead_letter(self, seq: int, reason: str) -> None:
        self.dead.append((seq, reason))
        await self.delete([seq])


class FakeSink:
    is_connected = True
    is_blocked = False

    def __init__(self, failure: str | None = None) -> None:
        self.failure = failure
        self.published: list[str] = []

    async def publish(self, event: WebhookEvent, exchange_name: str, *, timeout: float) -> None:
        self.published.append(event.event_id)
        if self.failure:
            raise PublishError(self.failure)


def replayer(spool: FakeSpool, sink: FakeSink) -> Replayer:
    return Replayer(spool, sink, publish_timeout_seconds=1, batch_size=2, max_attempts=3)


async def test_drain_publishes_in_order_and_deletes_what_was_confirmed():
    """FIFO, batch by batch, and the spool is empty afterwards."""
    spool, sink = FakeSpool(5), FakeSink()
    assert await replayer(spool, sink).drain() == 5
    assert sink.published == ["e0", "e1", "e2", "e3", "e4"]
    assert spool.records == []


async def test_a_record_refused_for_good_is_dead_lettered_and_the_rest_flow():
    """A channel error tied to one record, max_attempts times: moved aside."""
    spool, sink = FakeSpool(1), FakeSink("channel_error")
    subject = replayer(spool, sink)
    for _ in range(3):
        await subject.drain()
    assert spool.dead == [(0, "channel_error")]


async def test_timed_out_batches_back_off_instead_of_resending_at_once():
    """A frozen broker: the same batch is not republished every deadline without pause."""
    spool, sink = FakeSpool(2), FakeSink("timeout")
    subject = replayer(spool, sink)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await subject.drain()
    await subject.drain()
    assert loop.time() - started >= 1 + 2  # two pauses: 1 s, then 2 s
    assert len(sink.published) == 4  # two attempts of the batch of two, not more
    assert len(spool.records) == 2


class CancelledOnceSink(FakeSink):
    """The first publish ends the way a library future cancelled by a lost connection does."""

    async def publish(self, event: WebhookEvent, exchange_name: str, *, timeout: float) -> None:
        self.published.append(event.event_id)
        if len(self.published) == 1:
            raise asyncio.CancelledError


async def test_a_publish_cancelled_under_the_replayer_is_retried_not_raised():
    """The cancelled record stays spooled and goes out in the next batch; nothing escapes that
    would end the replayer's task."""
    spool, sink = FakeSpool(2), CancelledOnceSink()
    assert await replayer(spool, sink).drain() == 2
    assert sink.published == ["e0", "e1", "e0"]
    assert spool.records == []
