"""The fault-test TCP proxy forwards, cuts, freezes and restores a path to an echo server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from support.tcp_proxy import PathState, TcpProxy

T = TypeVar("T")
# Upper bound for things that must happen; a hang fails fast instead of at pytest's timeout.
DEADLINE_SECONDS = 5.0
# How long "nothing arrives" is watched for. Proves no negative for certain, but a proxy that
# forwards while frozen does so within microseconds on loopback.
QUIET_SECONDS = 0.2

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class EchoServer:
    """Echoes every byte back; hands each server-side writer to the test, counts disconnects."""

    def __init__(self) -> None:
        self.port = 0
        self.received = bytearray()
        self.accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
        self.disconnected: asyncio.Queue[None] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.accepted.put_nowait(writer)
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.disconnected.put_nowait(None)


async def within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, DEADLINE_SECONDS)


async def stays_quiet(reader: asyncio.StreamReader) -> bool:
    """True when not one byte (nor EOF) arrives on `reader` for QUIET_SECONDS."""
    try:
        await asyncio.wait_for(reader.read(1), QUIET_SECONDS)
    except TimeoutError:
        return True
    return False


async def is_closed(reader: asyncio.StreamReader) -> bool:
    """True when the peer closed or reset the connection (after any bytes still in flight)."""
    try:
        return await within(reader.read()) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[TcpProxy]:
    async with TcpProxy("127.0.0.1", echo.port) as proxy:
        yield proxy


@pytest.fixture
async def connect(proxy: TcpProxy) -> AsyncIterator[Callable[[], Awaitable[Connection]]]:
    """Opens client connections to the proxy and closes them at teardown."""
    writers: list[asyncio.StreamWriter] = []

    async def open_one() -> Connection:
        reader, writer = await within(asyncio.open_connection(proxy.host, proxy.port))
        writers.append(writer)
        return reader, writer

    yield open_one
    for writer in writers:
        writer.close()


async def round_trip(connection: Connection, payload: bytes) -> bytes:
    reader, writer = connection
    writer.write(payload)
    await writer.drain()
    return await within(reader.readexactly(len(payload)))


async def test_proxy_forwards_bytes_both_ways(
    connect: Callable[[], Awaitable[Connection]],
) -> None:
    """Bytes sent through the proxy reach the server and its answer comes back."""
    connection = await connect()

    assert await round_trip(connection, b"ping") == b"ping"


async def test_cut_closes_connections_and_new_ones_until_restored(
    proxy: TcpProxy, echo: EchoServer, connect: Callable[[], Awaitable[Connection]]
) -> None:
    """cut() drops both sides of open connections, drops new ones; restore() heals the path."""
    reader, _ = first = await connect()
    assert await round_trip(first, b"before") == b"before"

    proxy.cut()

    assert await is_closed(reader)
    await within(echo.disconnected.get())
    late_reader, _ = await connect()
    assert await is_closed(late_reader)
    assert proxy.state is PathState.CUT

    proxy.restore()

    assert await round_trip(await connect(), b"after") == b"after"


async def test_freeze_holds_bytes_both_ways_until_restored(
    proxy: TcpProxy, echo: EchoServer, connect: Callable[[], Awaitable[Connection]]
) -> None:
    """freeze() keeps the connection open but forwards nothing; restore() delivers what waited."""
    reader, writer = connection = await connect()
    assert await round_trip(connection, b"a") == b"a"
    server_side = await within(echo.accepted.get())

    proxy.freeze()
    writer.write(b"held")
    await writer.drain()
    server_side.write(b"down")
    await server_side.drain()

    assert await stays_quiet(reader)
    assert bytes(echo.received) == b"a"
    assert proxy.connection_count == 1

    proxy.restore()

    # The server's push was waiting at the proxy; the echo of "held" can only follow it.
    assert await within(reader.readexactly(8)) == b"downheld"


async def test_connection_opened_while_frozen_connects_upstream_after_restore(
    proxy: TcpProxy, echo: EchoServer, connect: Callable[[], Awaitable[Connection]]
) -> None:
    """A connection made through a frozen path gets no answer until restore()."""
    proxy.freeze()
    reader, writer = await connect()
    writer.write(b"hello")
    await writer.drain()

    assert await stays_quiet(reader)
    assert echo.accepted.empty()

    proxy.restore()

    assert await within(reader.readexactly(5)) == b"hello"


async def test_close_drops_connections_and_stops_listening(
    proxy: TcpProxy, connect: Callable[[], Awaitable[Connection]]
) -> None:
    """close() ends every connection and the port no longer accepts."""
    reader, _ = connection = await connect()
    assert await round_trip(connection, b"x") == b"x"

    await within(proxy.close())

    assert await is_closed(reader)
    assert proxy.connection_count == 0
    with pytest.raises(OSError):
        await within(asyncio.open_connection(proxy.host, proxy.port))
