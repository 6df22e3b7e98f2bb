"""The guarded HTTP layer: plain 400s, slow headers cut off, a cap on connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bridge.webserver import GuardedAppRunner


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[str]]]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/x", ok)
    refused: list[str] = []
    runner = GuardedAppRunner(
        app, header_timeout_seconds=0.3, max_connections=2, on_refused=refused.append
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(runner.addresses[0][1]), refused
    await runner.cleanup()


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return answer


async def test_malformed_request_gets_the_status_phrase_only(server):
    """The offending line (here with credentials) is not echoed back; the refusal is counted."""
    port, refused = server
    answer = await exchange(
        port, b"POST /x HTTP/1.1\r\nAuthorization: Basic c2VjcmV0OnB3\x00\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.0 400")
    assert b"c2VjcmV0OnB3" not in answer
    assert answer.endswith(b"400 Bad Request")
    assert refused == ["malformed_request"]


async def test_connection_that_never_finishes_its_headers_is_closed(server):
    """Slow headers: after header_timeout_seconds the server hangs up."""
    port, refused = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\n")  # and then nothing
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert refused == ["header_timeout"]


async def test_connection_that_sends_nothing_is_closed(server):
    """An idle new connection gets the same bound."""
    port, refused = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert refused == ["header_timeout"]


async def test_connections_beyond_the_cap_are_closed_at_once(server):
    """With two open, a third is closed without an answer; requests on the two still work."""
    port, refused = server
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert refused == ["too_many_connections"]
    first_reader, first_writer = held[0]
    first_writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert (await first_reader.readline()).startswith(b"HTTP/1.1 200")
    for _, held_writer in held:
        held_writer.close()


async def test_keepalive_requests_each_get_the_full_header_budget(server):
    """Two requests in a row on one connection, each well inside the header bound."""
    port, refused = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        while (await reader.readline()) != b"\r\n":
            pass
        await reader.readexactly(2)
    writer.close()
    assert refused == []
