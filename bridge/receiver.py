"""HTTP receiver for ONe callbacks: request in, one status out. Knows nothing about AMQP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

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


DELIVERY = web.AppKey("delivery", Delivery)
HOOKS = web.AppKey("hooks", ReceiverHooks)
METRICS = web.AppKey("metrics", Metrics)
TENANTS = web.AppKey("tenants", Mapping[str, TenantConfig])
SETTINGS = web.AppKey("settings", ReceiverConfig)

RETRY_AFTER_SECONDS = "5"
# Safe, but worth a look: unknown types, and events waiting on disk for the broker.
_DEGRADED_OUTCOMES = frozenset({Outcome.UNROUTED, Outcome.SPOOLED})
_WWW_AUTHENTICATE = 'Basic realm="one-bridge", charset="UTF-8"'
# Free text from the request (path tenant, type) is cut to this length in logs.
_LOGGED_TEXT_CHARS = 64

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


def build_app(
    *,
    delivery: Delivery,
    tenants: Mapping[str, TenantConfig],
    settings: ReceiverConfig,
    metrics: Metrics,
    hooks: ReceiverHooks | None = None,
) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[_unknown_routes_are_answered]
    )
    app[HOOKS] = hooks or ReceiverHooks()
    app[DELIVERY] = delivery
    app[TENANTS] = tenants
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app.router.add_post(
        "/one/{tenant}/events", handle_callback, expect_handler=_check_before_continue
    )
    return app


@web.middleware
async def _unknown_routes_are_answered(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Paths and methods we do not serve get the same log line and metric as any rejection."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _reject(NotFound("no such path"), request, "", None, None, 0, time.perf_counter())
    except web.HTTPMethodNotAllowed:
        exc = MethodNotAllowed("only POST is served here")
        response = _reject(exc, request, "", None, None, 0, time.perf_counter())
        response.headers["Allow"] = "POST"
        return response


async def _check_before_continue(request: web.Request) -> web.StreamResponse | None:
    """Expect: 100-continue: say "continue" only to a request we would read."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="unknown Expect")
    started = time.perf_counter()
    tenant_key = request.match_info["tenant"]
    try:
        _authenticate(request, tenant_key)
        _check_headers(request, request.app[SETTINGS])
    except RejectedEvent as exc:
        return _reject(exc, request, tenant_key, None, None, 0, started)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's own: the response proper has not started
    return None


async def handle_callback(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    started = time.perf_counter()
    tenant_key = request.match_info["tenant"]
    event_type: str | None = None
    event_id: str | None = None
    body_bytes = 0
    metrics.webhook_in_flight.inc()
    try:
        _authenticate(request, tenant_key)
        body = await _read_body(request, request.app[SETTINGS])
        body_bytes = len(body)
        event = parse_event(body, tenant=tenant_key, received_at=time.time())
        event_type, event_id = event.event_type, event.event_id
        header_tenant = request.headers.get("one-tenant")
        if header_tenant is not None and header_tenant != tenant_key:
            raise TenantMismatch("one-tenant header differs from the tenant in the path")
        outcome = await request.app[DELIVERY].accept(event)
    except RejectedEvent as exc:
        return _reject(exc, request, tenant_key, event_type, event_id, body_bytes, started)
    except Exception:
        # A bug of ours, not bad input: answer retryably and keep the daemon alive.
        log.exception(
            "webhook.failed",
            tenant=tenant_key[:_LOGGED_TEXT_CHARS],
            event_type=event_type,
            event_id=event_id,
        )
        metrics.webhook_requests.labels(event_type_label(event_type), "failed").inc()
        metrics.webhook_duration.labels("failed").observe(time.perf_counter() - started)
        return web.json_response(
            {"status": "failed"}, status=503, headers={"Retry-After": RETRY_AFTER_SECONDS}
        )
    finally:
        metrics.webhook_in_flight.dec()

    seconds = time.perf_counter() - started
    metrics.record_handled(event.event_type, outcome.value, seconds, body_bytes, event.received_at)
    fields = dict(
        tenant=tenant_key,
        event_type=event.event_type[:_LOGGED_TEXT_CHARS],
        event_id=event.event_id,
        outcome=outcome.value,
        status=200,
        body_bytes=body_bytes,
        duration_ms=round(seconds * 1000, 2),
    )
    if outcome is Outcome.DUPLICATE:
        metrics.duplicates.inc()
    if event.is_example:
        request.app[HOOKS].on_example(event.event_id)
    if outcome in _DEGRADED_OUTCOMES:
        log.warning("webhook.handled", **fields)
    else:
        log.info("webhook.handled", **fields)
    return web.Response(
        body=orjson.dumps({"status": outcome.value, "eventId": event.event_id}),
        content_type="application/json",
    )


def _authenticate(request: web.Request, tenant_key: str) -> None:
    tenant = request.app[TENANTS].get(tenant_key)
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


def _check_headers(request: web.Request, settings: ReceiverConfig) -> None:
    if not is_json_media_type(request.content_type):
        raise UnsupportedMediaType("Content-Type must be application/json")
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body is larger than {limit} bytes")


async def _read_body(request: web.Request, settings: ReceiverConfig) -> bytes:
    """The whole body, bounded in size (chunked or not) and in time (lying Content-Length)."""
    _check_headers(request, settings)
    limit = settings.max_body_bytes
    content = request.content
    if content.is_eof():
        # The usual case: the whole body came with the headers; no timer, no await.
        body = _read_buffered(content)
        if len(body) > limit:
            raise BodyTooLarge(f"body is larger than {limit} bytes")
        return body
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


def _read_buffered(content: StreamReader) -> bytes:
    try:
        return content.read_nowait()
    except (HttpProcessingError, RequestPayloadError):
        raise InvalidBody("body could not be decoded") from None


def _reject(
    exc: RejectedEvent,
    request: web.Request,
    tenant_key: str,
    event_type: str | None,
    event_id: str | None,
    body_bytes: int,
    started: float,
) -> web.Response:
    metrics = request.app[METRICS]
    seconds = time.perf_counter() - started
    request.app[HOOKS].on_rejected(tenant_key, exc.reason)
    outcome = "failed" if isinstance(exc, Unavailable) else "rejected"
    metrics.webhook_requests.labels(event_type_label(event_type), outcome).inc()
    metrics.webhook_rejections.labels(exc.reason).inc()
    metrics.webhook_duration.labels(outcome).observe(seconds)
    fields = dict(
        tenant=tenant_key[:_LOGGED_TEXT_CHARS],
        reason=exc.reason,
        status=exc.status,
        detail=exc.detail,
        body_bytes=body_bytes,
        duration_ms=round(seconds * 1000, 2),
        peer=request.remote,
    )
    if event_type is not None:
        fields.update(event_type=event_type[:_LOGGED_TEXT_CHARS], event_id=event_id)
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
