"""aiohttp runner whose own error answers (malformed HTTP) echo nothing the client sent.

aiohttp answers a request it cannot parse with a 400 whose body quotes the offending line,
which may be an Authorization header, and logs it with a traceback. Ours answers with the
status phrase alone and logs one warning naming only the error class.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = structlog.get_logger("bridge.http")


class _QuietRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status < 500:
            message = f"{status} {HTTPStatus(status).phrase}"
        return super().handle_error(request, status, exc, message)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        # The message of a parser error quotes raw request bytes: name the kind, nothing more.
        log.warning(
            "http.malformed_request",
            error=type(exc).__name__ if isinstance(exc, BaseException) else None,
        )


class _QuietServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class QuietAppRunner(web.AppRunner):
    """An AppRunner whose connections are served by _QuietRequestHandler."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds the Server itself; its class is the only seam for the protocol handler.
        server.__class__ = _QuietServer
        return server
