"""HTTP receiver for ONe callbacks: request in, one status out. Knows nothing about AMQP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson
import structlog
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError

from bridge.auth import check_credentials
from bridge.config import ReceiverConfig, TenantConfig
from bridge.delivery import Delivery, Outcome
from bridge.errors import (
    BodyTimeout,
    BodyTooLarge,
    ExpectationFailed,
    IncompleteBody,
    InvalidBody,
    MethodNotAllowed,
    NotFound,
    RejectedEvent,
    TenantMismatch,
    Unauthorized,
    Unavailable,
    UnknownTenant,
    UnsupportedMediaType,
)
from bridge.events import parse_event
from bridge.metrics import Metrics, event_type_label


@dataclass(frozen=True, slots=True)
class ReceiverHooks:
    """Who else wants to know: the canary watches example callbacks and rejections."""

    on_example: Callable[[str], None] = lambda event_id: None
    on_rejected: Callable[[str, str], None] = lambda tenant, reason: None


PATH_PREFIX = "/one/"
PATH_SUFFIX = "/events"
RETRY_AFTER_SECONDS = "5"
# Safe, but worth a look: unknown types, and events waiting on disk for the broker.
_DEGRADED_OUTCOMES = frozenset({Outcome.UNROUTED, Outcome.SPOOLED})
_WWW_AUTHENTICATE = 'Basic realm="one-bridge", charset="UTF-8"'

log = structlog.get_logger("bridge.receiver")


def is_json_media_type(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


def rejection_headers(exc: RejectedEvent) -> dict[str, str]:
    if exc.status == 401:
        return {"WWW-Authenticate": _WWW_AUTHENTICATE}
    if exc.status == 503:
        return {"Retry-After": RETRY_AFTER_SECONDS}
    return {}


def tenant_in_path(target: str) -> str | None:
    """The {tenant} of /one/{tenant}/events (query ignored), or None for any other target.

    Matched on the target as sent: a percent-encoded slash (%2F) is part of a segment, not a
    separator, so /one/klient%2Fevents is no callback URL. The tenant itself is decoded.
    """
    path = target.partition("?")[0]
    if not path.startswith("/"):
        # Absolute form (RFC 9112 3.2.2), http://host/one/...: the path follows the authority.
        scheme, separator, rest = path.partition("://")
        path = "/" + rest.partition("/")[2] if separator and "/" not in scheme else ""
    if not (path.startswith(PATH_PREFIX) and path.endswith(PATH_SUFFIX)):
        return None
    tenant = path[len(PATH_PREFIX) : -len(PATH_SUFFIX)]
    if "%" in tenant:
        try:
            tenant = unquote(tenant, errors="strict")
        except UnicodeDecodeError:
            return None
    return tenant if tenant and "/" not in tenant else None


class Receiver:
    """Serves POST /one/{tenant}/events on aiohttp's low-level server: one path, one method, so
    the application router and middleware chain would only add cost to every callback."""

    def __init__(
        self,
        *,
        delivery: Delivery,
        tenants: Mapping[str, TenantConfig],
        settings: ReceiverConfig,
        metrics: Metrics,
        hooks: ReceiverHooks | None = None,
    ) -> None:
        self.delivery = delivery
        self.tenants = tenants
        self.settings = settings
        self.metrics = metrics
        self.hooks = hooks or ReceiverHooks()
        # Callbacks being handled; a plain int the gauge reads at scrape time.
        self.in_flight = 0
        metrics.webhook_in_flight.set_function(lambda: self.in_flight)

    def server(self, **kwargs: Any) -> web.Server:
        return web.Server(
            self.handle, keepalive_timeout=self.settings.keepalive_timeout_seconds, **kwargs
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        tenant_key = tenant_in_path(request.raw_path)
        if tenant_key is None:
            return self._reject(NotFound("no such path"), request, "", None, None, 0, _now())
        if request.method != "POST":
            exc = MethodNotAllowed("only POST is served here")
            response = self._reject(exc, request, "", None, None, 0, _now())
            response.headers["Allow"] = "POST"
            return response
        if "Expect" in request.headers and request.version == HttpVersion11:
            refusal = await self._check_before_continue(request, tenant_key)
            if refusal is not None:
                return refusal
        # The callback itself is handled here rather than in a helper coroutine: one coroutine
        # level less on every request.
        metrics = self.metrics
        started = _now()
        event_type: str | None = None
        event_id: str | None = None
        body_bytes = 0
        self.in_flight += 1
        try:
            self._authenticate(request, tenant_key)
            _check_headers(request, self.settings)
            if request.content.is_eof():
                # The usual case: the whole body came with the headers; no timer, no await.
                body = _read_buffered(request.content, self.settings.max_body_bytes)
            else:
                body = await _read_body(request, self.settings)
            body_bytes = len(body)
            event = parse_event(body, tenant=tenant_key, received_at=time.time())
            event_type, event_id = event.event_type, event.event_id
            if any(value != tenant_key for value in request.headers.getall("one-tenant", ())):
                raise TenantMismatch("one-tenant header differs from the tenant in the path")
            outcome = await self.delivery.accept(event)
        except RejectedEvent as exc:
            return self._reject(exc, request, tenant_key, event_type, event_id, body_bytes, started)
        except Exception:
            # A bug of ours, not bad input: answer retryably and keep the daemon alive.
            log.exception(
                "webhook.failed",
                tenant=tenant_key,
                event_type=event_type,
                event_id=event_id,
            )
            metrics.webhook_requests.labels(event_type_label(event_type), "failed").inc()
            metrics.webhook_duration.labels("failed").observe(_now() - started)
            return web.json_response(
                {"status": "failed"}, status=503, headers={"Retry-After": RETRY_AFTER_SECONDS}
            )
        finally:
            self.in_flight -= 1

        seconds = _now() - started
        metrics.record_handled(
            event.event_type, outcome.value, seconds, body_bytes, event.received_at
        )
        fields = dict(
            tenant=tenant_key,
            event_type=event.event_type,
            event_id=event.event_id,
            outcome=outcome.value,
            status=200,
            body_bytes=body_bytes,
            duration_ms=round(seconds * 1000, 2),
        )
        if outcome is Outcome.DUPLICATE:
            metrics.duplicates.inc()
        if event.is_example:
            self.hooks.on_example(event.event_id)
        if outcome in _DEGRADED_OUTCOMES:
            log.warning("webhook.handled", **fields)
        else:
            log.info("webhook.handled", **fields)
        return web.Response(
            body=orjson.dumps({"status": outcome.value, "eventId": event.event_id}),
            content_type="application/json",
        )

    async def _check_before_continue(
        self, request: web.BaseRequest, tenant_key: str
    ) -> web.StreamResponse | None:
        """Expect: 100-continue: say "continue" only to a request we would read. (HTTP/1.0
        senders' Expect is ignored, as RFC 9110 asks.)"""
        started = _now()
        try:
            self._authenticate(request, tenant_key)
            _check_headers(request, self.settings)
            if any(value.lower() != "100-continue" for value in request.headers.getall("Expect")):
                raise ExpectationFailed("only Expect: 100-continue is understood")
        except RejectedEvent as exc:
            return self._reject(exc, request, tenant_key, None, None, 0, started)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own: the response proper has not started
        return None

    def _authenticate(self, request: web.BaseRequest, tenant_key: str) -> None:
        tenant = self.tenants.get(tenant_key)
        if tenant is None:
            raise UnknownTenant("tenant is not configured")
        if tenant.auth == "basic":
            assert tenant.username is not None
            authorizations = request.headers.getall("Authorization", [])
            if len(authorizations) > 1:
                raise Unauthorized("several Authorization headers")
            if not check_credentials(
                authorizations[0] if authorizations else None,
                username=tenant.username,
                passwords=tenant.password_values(),
            ):
                raise Unauthorized("missing or wrong credentials")

    def _reject(
        self,
        exc: RejectedEvent,
        request: web.BaseRequest,
        tenant_key: str,
        event_type: str | None,
        event_id: str | None,
        body_bytes: int,
        started: float,
    ) -> web.Response:
        metrics = self.metrics
        seconds = _now() - started
        self.hooks.on_rejected(tenant_key, exc.reason)
        outcome = "failed" if isinstance(exc, Unavailable) else "rejected"
        metrics.webhook_requests.labels(event_type_label(event_type), outcome).inc()
        metrics.webhook_rejections.labels(exc.reason).inc()
        metrics.webhook_duration.labels(outcome).observe(seconds)
        fields = dict(
            tenant=tenant_key,
            reason=exc.reason,
            status=exc.status,
            detail=exc.detail,
            body_bytes=body_bytes,
            duration_ms=round(seconds * 1000, 2),
            peer=request.remote,
        )
        if event_type is not None:
            fields.update(event_type=event_type, event_id=event_id)
        if outcome == "failed":
            log.error("webhook.failed", **fields)
        else:
            log.warning("webhook.rejected", **fields)
        return web.Response(
            status=exc.status,
            body=orjson.dumps({"error": exc.reason, "detail": exc.detail}),
            content_type="application/json",
            headers=rejection_headers(exc),
        )


_now = time.perf_counter


def _check_headers(request: web.BaseRequest, settings: ReceiverConfig) -> None:
    if not is_json_media_type(request.content_type):
        raise UnsupportedMediaType("Content-Type must be application/json")
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body is larger than {limit} bytes")


async def _read_body(request: web.BaseRequest, settings: ReceiverConfig) -> bytes:
    """A body still arriving, bounded in size (chunked too) and time (lying Content-Length)."""
    limit = settings.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(settings.body_timeout_seconds):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout("body did not arrive in time") from None
    except (HttpProcessingError, RequestPayloadError):
        # E.g. Content-Encoding: gzip on a body that is not gzip.
        raise InvalidBody("body could not be decoded") from None
    except ConnectionError:
        raise IncompleteBody("the sender closed the connection mid-body") from None
    return b"".join(chunks)


def _read_buffered(content: StreamReader, limit: int) -> bytes:
    try:
        body = content.read_nowait()
    except (HttpProcessingError, RequestPayloadError):
        raise InvalidBody("body could not be decoded") from None
    if len(body) > limit:
        raise BodyTooLarge(f"body is larger than {limit} bytes")
    return body
