"""The callback sender against a tiny in-test receiver that records every request."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge import sender
from bridge.sender import SendOptions

PLANTED_PASSWORD = "planted-s3cret-Pa55word"
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    header_names: tuple[str, ...]
    body: bytes


@dataclass
class Receiver:
    """Records requests; answers `status_for(n)` for the n-th request (0-based)."""

    status_for: Callable[[int], int] = lambda n: 200
    release: asyncio.Event | None = None  # when set, handlers wait for it before answering
    requests: list[Recorded] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        index = len(self.requests)
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                headers=dict(request.headers),
                header_names=tuple(name.lower() for name in request.headers),
                body=body,
            )
        )
        if self.release is not None:
            await self.release.wait()
        return web.Response(status=self.status_for(index), text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def bodies(self) -> list[dict[str, str]]:
        return [json.loads(recorded.body) for recorded in self.requests]


async def start(aiohttp_server: ServerFactory, receiver: Receiver) -> str:
    server = await aiohttp_server(receiver.app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting is refused, no race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_callbacks_carry_the_platforms_headers_path_and_auth(
    aiohttp_server: ServerFactory,
) -> None:
    """Every request is a POST to /one/{tenant}/events with exactly the platform's headers."""
    receiver = Receiver()
    url = await start(aiohttp_server, receiver)
    options = SendOptions(url=url, tenant="acme", user="one", password="dev-password", count=6)

    report = await sender.send_callbacks(options)

    assert (report.accepted, report.failed) == (6, 0)
    assert len(receiver.requests) == 6
    for recorded, payload in zip(receiver.requests, receiver.bodies(), strict=True):
        assert recorded.method == "POST"
        assert recorded.path == "/one/acme/events"
        assert sorted(recorded.header_names) == sorted(
            ["host", "accept", "authorization", "one-tenant", "content-type", "content-length"]
        )
        assert recorded.headers["Accept"] == (
            "application/json, application/cbor, application/*+json"
        )
        assert recorded.headers["Authorization"] == "Basic b25lOmRldi1wYXNzd29yZA=="
        assert recorded.headers["one-tenant"] == "acme"
        assert recorded.headers["Content-Type"] == "application/json"
        assert recorded.headers["Content-Length"] == str(len(recorded.body))
        assert payload["tenantKey"] == "acme"


async def test_without_password_no_authorization_header_is_sent(
    aiohttp_server: ServerFactory,
) -> None:
    """No password, no Authorization header."""
    receiver = Receiver()
    url = await start(aiohttp_server, receiver)

    await sender.send_callbacks(SendOptions(url=url, count=2))

    assert all("authorization" not in r.header_names for r in receiver.requests)


async def test_event_ids_are_unique(aiohttp_server: ServerFactory) -> None:
    """Each callback has its own eventId."""
    receiver = Receiver()
    url = await start(aiohttp_server, receiver)

    await sender.send_callbacks(SendOptions(url=url, count=30, concurrency=5))

    event_ids = [payload["eventId"] for payload in receiver.bodies()]
    assert len(event_ids) == 30
    assert len(set(event_ids)) == 30


async def test_types_are_sent_round_robin(aiohttp_server: ServerFactory) -> None:
    """With one worker the types follow the given order, cycling."""
    receiver = Receiver()
    url = await start(aiohttp_server, receiver)
    types = ("OfferOpened", "CartOpened", "SomethingNew")

    await sender.send_callbacks(SendOptions(url=url, count=7, concurrency=1, types=types))

    assert [payload["type"] for payload in receiver.bodies()] == [
        "OfferOpened", "CartOpened", "SomethingNew",
        "OfferOpened", "CartOpened", "SomethingNew",
        "OfferOpened",
    ]  # fmt: skip


async def test_types_are_evenly_spread_with_several_workers(aiohttp_server: ServerFactory) -> None:
    """With several workers each type is still sent count / len(types) times."""
    receiver = Receiver()
    url = await start(aiohttp_server, receiver)

    await sender.send_callbacks(SendOptions(url=url, count=12, concurrency=4))

    sent = [payload["type"] for payload in receiver.bodies()]
    assert {name: sent.count(name) for name in set(sent)} == dict.fromkeys(sender.DEFAULT_TYPES, 4)


async def test_non_2xx_answers_count_as_failures_by_status(aiohttp_server: ServerFactory) -> None:
    """Every fourth request gets 503: those fail, the rest are accepted, counted per status."""
    receiver = Receiver(status_for=lambda n: 503 if n % 4 == 0 else (202 if n % 4 == 1 else 200))
    url = await start(aiohttp_server, receiver)

    report = await sender.send_callbacks(SendOptions(url=url, count=12, concurrency=3))

    assert (report.accepted, report.failed) == (9, 3)
    assert report.by_status == {"200": 6, "202": 3, "503": 3}
    assert len(report.latencies) == 12
    assert all(latency >= 0 for latency in report.latencies)
    assert sender.exit_code(report) == 1


async def test_all_accepted_gives_exit_code_zero(aiohttp_server: ServerFactory) -> None:
    """A clean run reports success."""
    receiver = Receiver()
    url = await start(aiohttp_server, receiver)

    report = await sender.send_callbacks(SendOptions(url=url, count=3))

    assert report.by_status == {"200": 3}
    assert sender.exit_code(report) == 0


async def test_connection_refused_is_counted_not_raised(refusing_url: str) -> None:
    """A receiver that is not there yields failures in the report, not an exception."""
    report = await sender.send_callbacks(SendOptions(url=refusing_url, count=5, concurrency=2))

    assert (report.accepted, report.failed) == (0, 5)
    assert report.by_status == {"connection_refused": 5}
    assert report.latencies == []
    assert sender.exit_code(report) == 1


async def test_slow_answers_are_counted_as_timeouts(aiohttp_server: ServerFactory) -> None:
    """A receiver that does not answer within the timeout yields `timeout` failures."""
    release = asyncio.Event()
    receiver = Receiver(release=release)
    url = await start(aiohttp_server, receiver)
    try:
        report = await sender.send_callbacks(
            SendOptions(url=url, count=2, concurrency=2, timeout_seconds=0.2)
        )
    finally:
        release.set()

    assert report.by_status == {"timeout": 2}
    assert report.failed == 2


async def test_rate_bounds_the_duration_from_below(aiohttp_server: ServerFactory) -> None:
    """20 requests at 100/s are scheduled over 0.19 s, so the run cannot be shorter."""
    receiver = Receiver()
    url = await start(aiohttp_server, receiver)

    report = await sender.send_callbacks(SendOptions(url=url, count=20, rate=100.0))

    assert report.accepted == 20
    assert report.elapsed_seconds >= 0.185  # 19 intervals of 10 ms, minus clock slack


@pytest.mark.parametrize("as_json", [False, True])
async def test_report_of_an_authenticated_run_never_shows_the_password(
    aiohttp_server: ServerFactory, as_json: bool
) -> None:
    """After a real run with a planted password, the rendered report holds no form of it."""
    receiver = Receiver(status_for=lambda n: 401 if n == 0 else 200)
    url = await start(aiohttp_server, receiver)
    options = SendOptions(url=url, user="one", password=PLANTED_PASSWORD, count=3)

    text = sender.render_report(await sender.send_callbacks(options), as_json=as_json)

    token = base64.b64encode(f"one:{PLANTED_PASSWORD}".encode()).decode()
    assert receiver.requests[0].headers["Authorization"] == f"Basic {token}"
    assert PLANTED_PASSWORD not in text
    assert token not in text
    assert "Authorization" not in text
