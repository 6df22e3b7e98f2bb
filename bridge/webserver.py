"""aiohttp runner that guards the HTTP layer below our handlers.

- Error answers of its own (malformed HTTP) echo nothing the client sent: aiohttp's 400 body
  quotes the offending line, which may be an Authorization header. Ours is the status phrase.
- One warning line per malformed request, naming the error class only, instead of a traceback.
- A connection must finish a request's headers within `header_timeout_seconds` (slowloris).
- At most `max_connections` at once; beyond, new connections are closed at once, so a flood
  cannot exhaust file descriptors.

aiohttp builds its protocol handler itself; the server's class is the only seam to put ours in,
and the handler's request counter and current request are read to tell a stalled header.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = structlog.get_logger("bridge.http")


class _Guard:
    """Limits shared by every connection of one server."""

    def __init__(
        self,
        *,
        header_timeout_seconds: float,
        max_connections: int,
        on_refused: Callable[[str], None],
    ) -> None:
        self.header_timeout_seconds = header_timeout_seconds
        self.max_connections = max_connections
        self.on_refused = on_refused
        self.connections = 0
        self.is_saturated = False
        # One sweep over the open connections, not one timer per request, enforces the
        # header timeout: arming it is then a store of a deadline.
        self._watched: set[_GuardedRequestHandler] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_seconds = min(1.0, header_timeout_seconds / 4)

    def watch(self, handler: _GuardedRequestHandler) -> None:
        self._watched.add(handler)
        if self._sweep is None:
            self._schedule_sweep()

    def unwatch(self, handler: _GuardedRequestHandler) -> None:
        self._watched.discard(handler)

    def _schedule_sweep(self) -> None:
        self._sweep = asyncio.get_running_loop().call_later(self._sweep_seconds, self._run_sweep)

    def _run_sweep(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for handler in list(self._watched):
            handler.check_header_deadline(now)
        if self._watched:  # idle servers keep no timer
            self._schedule_sweep()

    def admit(self) -> bool:
        if self.connections >= self.max_connections:
            if not self.is_saturated:
                self.is_saturated = True
                log.warning("http.connections_saturated", max_connections=self.max_connections)
            self.on_refused("too_many_connections")
            return False
        if self.is_saturated:
            self.is_saturated = False
            log.info("http.connections_available")
        self.connections += 1
        return True


class _GuardedRequestHandler(RequestHandler):
    _guard: _Guard
    _is_admitted = False
    _header_deadline: float | None = None
    _requests_seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard = self._manager.guard  # type: ignore[union-attr]
        if not self._guard.admit():
            transport.close()
            return
        self._is_admitted = True
        self._arm_header_deadline()
        self._guard.watch(self)

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self._current_request is None:
            self._arm_header_deadline()  # the first bytes of the next request on this connection
        super().data_received(data)
        if self._request_count != self._requests_seen:
            self._requests_seen = self._request_count
            self._header_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._header_deadline = None
        if self._is_admitted:
            self._is_admitted = False
            self._guard.connections -= 1
            self._guard.unwatch(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status < 500:
            # The parser's message quotes raw request bytes: name the kind, nothing more.
            log.warning("http.malformed_request", status=status, error=type(exc).__name__)
            self._guard.on_refused("malformed_request")
            message = f"{status} {HTTPStatus(status).phrase}"
        else:
            log.error("http.handler_crashed", status=status, exc_info=exc)
        return super().handle_error(request, status, exc, message)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """Already logged, redacted, by handle_error."""

    def _arm_header_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        self._header_deadline = loop.time() + self._guard.header_timeout_seconds

    def check_header_deadline(self, now: float) -> None:
        if self._header_deadline is None or now < self._header_deadline:
            return
        self._header_deadline = None
        if self._current_request is None and self._request_count == self._requests_seen:
            log.warning("http.header_timeout", seconds=self._guard.header_timeout_seconds)
            self._guard.on_refused("header_timeout")
            if self.transport is not None:
                self.transport.close()


class _GuardedServer(web.Server):
    guard: _Guard

    def __call__(self) -> RequestHandler:
        return _GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


def _guard(server: web.Server, guard: _Guard) -> web.Server:
    server.__class__ = _GuardedServer
    server.guard = guard  # type: ignore[attr-defined]
    return server


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections are served by _GuardedRequestHandler."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout_seconds: float = 10.0,
        max_connections: int = 4096,
        on_refused: Callable[[str], None] = lambda reason: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._guard = _Guard(
            header_timeout_seconds=header_timeout_seconds,
            max_connections=max_connections,
            on_refused=on_refused,
        )

    async def _make_server(self) -> web.Server:
        return _guard(await super()._make_server(), self._guard)


class GuardedServerRunner(web.ServerRunner):
    """The same guard for aiohttp's low-level server (a handler without an application)."""

    def __init__(
        self,
        server: web.Server,
        *,
        header_timeout_seconds: float = 10.0,
        max_connections: int = 4096,
        on_refused: Callable[[str], None] = lambda reason: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(server, **kwargs)
        self._guard = _Guard(
            header_timeout_seconds=header_timeout_seconds,
            max_connections=max_connections,
            on_refused=on_refused,
        )

    async def _make_server(self) -> web.Server:
        return _guard(await super()._make_server(), self._guard)
