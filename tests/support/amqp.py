"""Test helpers: a temporary queue bound to an exchange, and awaiting conditions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def bound_queue(
    url: str,
    *exchanges: str,
    routing_key: str = "#",
    exchange_type: str = "topic",
    name: str | None = None,
) -> AsyncIterator[AbstractQueue]:
    """A queue bound to each exchange (declared here if missing, as the bridge does).

    Without a name: exclusive, gone with this connection. With a name: durable, so it outlives
    a broker restart; `durable_queue()` reads it back afterwards.
    """
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        if name is None:
            # Not auto-delete, so a consumer may come and go.
            queue = await channel.declare_queue(unique("test"), exclusive=True)
        else:
            queue = await channel.declare_queue(name, durable=True)
        for name in exchanges:
            if name == "one-bridge.unrouted":
                exchange = await channel.declare_exchange(name, "fanout", durable=True)
            else:
                exchange = await channel.declare_exchange(
                    name,
                    exchange_type,
                    durable=True,
                    arguments={"alternate-exchange": "one-bridge.unrouted"},
                )
            await queue.bind(exchange, routing_key=routing_key)
        yield queue
    finally:
        await connection.close()


@asynccontextmanager
async def durable_queue(url: str, name: str) -> AsyncIterator[AbstractQueue]:
    """An existing durable queue on a fresh connection; deleted when the block ends."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(name)
        yield queue
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


async def take(
    queue: AbstractQueue, count: int, *, timeout: float = 10.0
) -> list[AbstractIncomingMessage]:
    """Exactly `count` messages, acknowledged, or TimeoutError."""
    messages: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout), queue.iterator() as iterator:
        async for message in iterator:
            await message.ack()
            messages.append(message)
            if len(messages) == count:
                break
    return messages


async def drain(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Everything in the queue right now."""
    messages = []
    while (message := await queue.get(fail=False)) is not None:
        await message.ack()
        messages.append(message)
    return messages


async def wait_until(condition: Callable[[], bool], *, timeout: float = 30.0) -> None:
    """Await a condition that has no event of its own to wait on (polled, bounded)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the condition has no event to await
            await asyncio.sleep(0.02)
