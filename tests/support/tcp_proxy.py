"""Asyncio TCP proxy for fault tests: cut, freeze and restore the path to a real server."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from types import TracebackType

_CHUNK_BYTES = 64 * 1024


class PathState(enum.Enum):
    OPEN = "open"
    CUT = "cut"  # connections closed, new ones closed on arrival
    FROZEN = "frozen"  # connections kept, not one byte forwarded, like a dead network path


class TcpProxy:
    """Listens on a free loopback port and forwards each connection to `target_host:target_port`."""

    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = listen_host
        self.port = 0
        self.state = PathState.OPEN
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Set while OPEN; pumps and new upstream connects wait on it, which is what freezes them.
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def connection_count(self) -> int:
        """Client connections currently held open by the proxy."""
        return len(self._links)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def cut(self) -> None:
        """Close every current connection and close new ones on arrival, until restore()."""
        self.state = PathState.CUT
        self._flowing.clear()
        for link in list(self._links):
            link.abort()

    def freeze(self) -> None:
        """Keep connections open but forward nothing either way, until restore()."""
        self.state = PathState.FROZEN
        self._flowing.clear()

    def restore(self) -> None:
        """Forward again; bytes held back by freeze() are delivered."""
        self.state = PathState.OPEN
        self._flowing.set()

    async def close(self) -> None:
        """Stop listening, drop every connection and wait for the proxy's tasks to end."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state is PathState.CUT:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._serve(link, reader)
        except (OSError, asyncio.IncompleteReadError):
            pass  # a reset on either side just ends this connection
        finally:
            link.abort()
            self._links.discard(link)
            self._tasks.discard(task)

    async def _serve(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        # A frozen path never completes the upstream connect; a cut one drops the client.
        await self._wait_flowing(link)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self.target_host, self.target_port
        )
        link.upstream = upstream_writer
        if link.aborted.is_set():  # cut while connecting
            upstream_writer.transport.abort()
            return
        pumps = [
            asyncio.create_task(self._pump(link, client_reader, upstream_writer)),
            asyncio.create_task(self._pump(link, upstream_reader, link.client)),
        ]
        try:
            # When one side closes or fails, the connection is over for both.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.abort()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while chunk := await reader.read(_CHUNK_BYTES):
            # Held here while frozen; the socket buffers then fill and the sender stalls.
            await self._wait_flowing(link)
            writer.write(chunk)
            await writer.drain()

    async def _wait_flowing(self, link: _Link) -> None:
        if not self._flowing.is_set():
            # Wake on restore() or on cut(): a cut must end held connections at once.
            waits = {
                asyncio.ensure_future(self._flowing.wait()),
                asyncio.ensure_future(link.aborted.wait()),
            }
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        if link.aborted.is_set():
            raise ConnectionAbortedError("cut by the proxy")


class _Link:
    """One client connection and, once connected, its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.aborted = asyncio.Event()

    def abort(self) -> None:
        # abort(), not close(): pending data is dropped, the peer sees the path just die.
        self.aborted.set()
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(RuntimeError):  # loop already closed at teardown
                    writer.transport.abort()
