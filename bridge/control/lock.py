"""One active reconciler across replicas: whoever owns an exclusive RabbitMQ queue holds the lock.

RabbitMQ lets exactly one connection own an exclusive queue and deletes it when that connection
dies, so a crashed holder frees the lock by itself; the others stand by and retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
import aiormq.exceptions
import structlog
from aio_pika.abc import AbstractConnection

from bridge.redact import redact_text

QUEUE_PREFIX = "one-bridge.reconciler."

log = structlog.get_logger("bridge.control.lock")


class RabbitLock:
    def __init__(
        self,
        url: str,
        name: str,
        *,
        retry_seconds: float = 5.0,
        on_change: Callable[[bool], None] = lambda is_held: None,
    ) -> None:
        self._url = url
        self.queue_name = QUEUE_PREFIX + name
        self._retry_seconds = retry_seconds
        self._on_change = on_change
        self._connection: AbstractConnection | None = None
        self._held = asyncio.Event()
        self._released = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_held(self) -> bool:
        return self._held.is_set()

    async def wait_held(self) -> None:
        await self._held.wait()

    async def try_acquire(self) -> bool:
        """One attempt: True when this process now holds the lock."""
        try:
            connection = await aio_pika.connect(
                self._url, client_properties={"connection_name": "one-bridge reconciler lock"}
            )
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            log.debug("lock.unreachable", error=redact_text(str(exc))[:200])
            return False
        try:
            channel = await connection.channel()
            await channel.declare_queue(self.queue_name, exclusive=True)
        except aiormq.exceptions.ChannelLockedResource:
            await connection.close()
            return False
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._set(True)
        connection.close_callbacks.add(self._on_connection_closed)
        return True

    async def start(self) -> None:
        """Hold the lock whenever possible, in the background, until close()."""
        self._task = asyncio.create_task(self._keep_trying(), name="reconciler-lock")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        self._set(False)

    async def _keep_trying(self) -> None:
        while True:
            if self.is_held:
                await self._released.wait()
            elif not await self.try_acquire():
                await asyncio.sleep(self._retry_seconds)

    def _on_connection_closed(self, _sender: object, _exc: BaseException | None = None) -> None:
        self._connection = None
        self._set(False)

    def _set(self, is_held: bool) -> None:
        if is_held == self.is_held:
            return
        if is_held:
            self._released.clear()
            self._held.set()
            log.info("lock.acquired", queue=self.queue_name)
        else:
            self._held.clear()
            self._released.set()
            log.info("lock.released", queue=self.queue_name)
        self._on_change(is_held)
