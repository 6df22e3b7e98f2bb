"""ONe management API client: auth headers, timeouts, retries with backoff, paging, PlatformError.

Invariants:
- The API key, callback passwords and Authorization values never reach an exception, a log line
  or a repr: error bodies go through `redact_text`, then every secret this client knows (the key,
  passwords it sent) is scrubbed literally, then the excerpt is bounded.
- Retries happen on network errors, timeouts, 429 and 5xx only, never on other 4xx. `create`
  (the one call that is not idempotent) is retried only when the platform cannot have acted on
  it: the connection was never made, or 429. The reconciler's next list is the safe retry.
- Redirects are not followed: a redirect would carry the ApiAuth header to wherever it points.
- The caller owns the aiohttp session; the documented-table fallback for types is the caller's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

import aiohttp
import orjson
import structlog
from yarl import URL

from bridge.control.models import (
    CallbackAuth,
    ExampleResult,
    JsonObject,
    Webhook,
    WebhookPage,
    WebhookType,
    created_id_from_json,
    example_request_json,
    webhook_types_from_json,
)
from bridge.errors import PlatformAuthError, PlatformError
from bridge.redact import MASK, redact_text

API_PREFIX = "/api/v1/webhooks/integrations/auth-required"
MIN_SEARCH_CHARS = 3
DEFAULT_MAX_PAGES = 1000
# Enough of an error body to diagnose; bodies longer than this are not worth redacting in full.
_MAX_ERROR_BODY_CHARS = 65536

OnRequest = Callable[[str, str, float], None]
Sleep = Callable[[float], Awaitable[None]]
_T = TypeVar("_T")

log = structlog.get_logger("bridge.control.client")


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes


def status_class(status: int | None) -> str:
    """Metric label for one request: 2xx, 4xx, 5xx, or error (no answer, or 1xx/3xx)."""
    if status is None:
        return "error"
    label = f"{status // 100}xx"
    return label if label in ("2xx", "4xx", "5xx") else "error"


def _is_retryable_status(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form and nonsense are ignored (plain backoff)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return seconds


class OneClient:
    """Thin async client for the ONe webhook management API of one tenant."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        tenant: str,
        api_key: str,
        *,
        timeout_seconds: float = 10,
        max_attempts: int = 4,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 10,
        on_request: OnRequest | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if backoff_base_seconds < 0 or backoff_max_seconds < 0:
            raise ValueError("backoff seconds must not be negative")
        parsed = URL(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("base_url must be an absolute http:// or https:// URL")
        self._session = session
        self._base_url = base_url.rstrip("/") + API_PREFIX
        self._tenant = tenant
        self._api_key = api_key
        self._timeout_seconds = timeout_seconds
        self._max_attempts = max_attempts
        self._backoff_base_seconds = backoff_base_seconds
        self._backoff_max_seconds = backoff_max_seconds
        self._on_request = on_request
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"OneClient(base_url={self._base_url!r}, tenant={self._tenant!r})"

    # --- public calls -------------------------------------------------------------------------

    async def list_page(
        self, page_number: int = 1, page_size: int = 50, search: str | None = None
    ) -> WebhookPage:
        """One page of webhooks (`GET /webhooks`); pages start at 1."""
        if page_number < 1:
            raise ValueError("page_number starts at 1")
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        params = {"pageNumber": str(page_number), "pageSize": str(page_size)}
        if search is not None:
            if len(search) < MIN_SEARCH_CHARS:
                raise ValueError(f"search needs at least {MIN_SEARCH_CHARS} characters")
            params["search"] = search
        answer = await self._request("list", "GET", "/webhooks", params=params)
        return self._parse("list", answer, WebhookPage.from_json)

    async def iter_webhooks(
        self, page_size: int = 50, search: str | None = None, *, max_pages: int = DEFAULT_MAX_PAGES
    ) -> AsyncIterator[Webhook]:
        """Every webhook, following `nextPage` until null.

        Raises PlatformError when the platform keeps paging past `max_pages` or sends a
        `nextPage` that does not move forward (both would otherwise loop forever).
        """
        page_number = 1
        for _ in range(max_pages):
            page = await self.list_page(page_number, page_size, search)
            for webhook in page.items:
                yield webhook
            if page.next_page is None:
                return
            if page.next_page <= page_number:
                raise PlatformError(
                    "list", None, detail=f"nextPage {page.next_page} after page {page_number}"
                )
            page_number = page.next_page
        raise PlatformError("list", None, detail=f"still paging after {max_pages} pages")

    async def list_webhooks(
        self, page_size: int = 50, search: str | None = None, *, max_pages: int = DEFAULT_MAX_PAGES
    ) -> list[Webhook]:
        """Every webhook, in platform order; an id seen twice (pages shifting) is kept once."""
        seen: set[str] = set()
        webhooks: list[Webhook] = []
        async for webhook in self.iter_webhooks(page_size, search, max_pages=max_pages):
            if webhook.id is not None:
                if webhook.id in seen:
                    continue
                seen.add(webhook.id)
            webhooks.append(webhook)
        return webhooks

    async def create(self, webhook: Webhook) -> str:
        """Register a webhook (`POST /webhooks`, body without id); returns the new id."""
        answer = await self._request(
            "create",
            "POST",
            "/webhooks",
            json=webhook.to_json(include_id=False),
            is_idempotent=False,
        )
        return self._parse("create", answer, created_id_from_json)

    async def update(self, webhook: Webhook) -> None:
        """Replace a webhook (`PUT /webhooks`, whole webhook with its id in the body)."""
        if not webhook.id:
            raise ValueError("update needs the webhook's id")
        await self._request("update", "PUT", "/webhooks", json=webhook.to_json())

    async def get(self, webhook_id: str) -> Webhook:
        """One webhook by id (`GET /webhooks/{webhookId}`)."""
        answer = await self._request("get", "GET", self._webhook_path(webhook_id))
        return self._parse("get", answer, Webhook.from_json)

    async def delete(self, webhook_id: str) -> None:
        """Remove a webhook (`DELETE /webhooks/{webhookId}`); any 2xx is success.

        A 404 raises PlatformError(status=404): already gone, or a retried delete whose first
        attempt landed. The caller decides whether that counts as done.
        """
        await self._request("delete", "DELETE", self._webhook_path(webhook_id))

    async def example(
        self, webhook_type: WebhookType, callback_url: str, callback_auth: CallbackAuth
    ) -> ExampleResult:
        """Ask the platform to send an example callback (`POST /webhooks/example`)."""
        body = example_request_json(webhook_type, callback_url, callback_auth)
        answer = await self._request("example", "POST", "/webhooks/example", json=body)
        return self._parse("example", answer, ExampleResult.from_json)

    async def types(self) -> list[WebhookType]:
        """The tenant's webhook types (`GET /webhooks/types`, or `/webhooks/type` on 404)."""
        try:
            answer = await self._request(
                "types", "GET", "/webhooks/types", quiet_statuses=frozenset({404})
            )
        except PlatformError as exc:
            if exc.status != 404:
                raise
            log.info("platform.types_fallback", path="/webhooks/type")
            answer = await self._request("types", "GET", "/webhooks/type")
        return self._parse("types", answer, webhook_types_from_json)

    # --- the one request path -----------------------------------------------------------------

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        json: JsonObject | None = None,
        params: dict[str, str] | None = None,
        is_idempotent: bool = True,
        quiet_statuses: frozenset[int] = frozenset(),
    ) -> _Answer:
        """Send one API call with retries; return the 2xx answer or raise PlatformError."""
        headers = {"one-tenant": self._tenant, "ApiAuth": self._api_key, "accept": "*/*"}
        data: bytes | None = None
        secrets = [self._api_key]
        if json is not None:
            data = orjson.dumps(json)
            headers["Content-Type"] = "application/json"
            secrets.extend(_passwords_in(json))
        url = self._base_url + path

        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                async with asyncio.timeout(self._timeout_seconds):
                    async with self._session.request(
                        method,
                        url,
                        headers=headers,
                        params=params,
                        data=data,
                        allow_redirects=False,
                    ) as response:
                        body = await response.read()
                        status = response.status
                        retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._record(operation, None, started)
                # ClientConnectorError: the request never left, safe to repeat even for create.
                may_retry = is_idempotent or isinstance(exc, aiohttp.ClientConnectorError)
                error = _describe(exc, secrets)
                if may_retry and attempt < self._max_attempts:
                    await self._back_off(operation, None, attempt, None, error=error)
                    continue
                log.warning(
                    "platform.request_failed",
                    operation=operation,
                    status=None,
                    attempts=attempt,
                    error=error,
                )
                # Not chained: aiohttp exceptions may carry the request's headers (the key).
                raise PlatformError(operation, None, detail=error) from None

            self._record(operation, status, started)
            if 200 <= status <= 299:
                return _Answer(status, body)
            may_retry = _is_retryable_status(status) and (is_idempotent or status == 429)
            if may_retry and attempt < self._max_attempts:
                await self._back_off(operation, status, attempt, _retry_after_seconds(retry_after))
                continue
            excerpt = _excerpt(body, secrets)
            error_class = PlatformAuthError if status in (401, 403) else PlatformError
            if status not in quiet_statuses:
                log_method = log.error if error_class is PlatformAuthError else log.warning
                log_method(
                    "platform.request_failed",
                    operation=operation,
                    status=status,
                    attempts=attempt,
                    body_excerpt=excerpt,
                )
            raise error_class(operation, status, excerpt)

    async def _back_off(
        self,
        operation: str,
        status: int | None,
        attempt: int,
        retry_after_seconds: float | None,
        *,
        error: str | None = None,
    ) -> None:
        """Sleep before the next attempt: Retry-After when given, else full jitter; both capped."""
        if retry_after_seconds is not None:
            delay = min(retry_after_seconds, self._backoff_max_seconds)
        else:
            ceiling = min(
                self._backoff_max_seconds, self._backoff_base_seconds * 2 ** (attempt - 1)
            )
            delay = random.uniform(0, ceiling)
        # Detail: the request's final failure is the warning worth reading.
        log.debug(
            "platform.request_retrying",
            operation=operation,
            status=status,
            attempt=attempt,
            delay_seconds=round(delay, 3),
            **({"error": error} if error is not None else {}),
        )
        await self._sleep(delay)

    def _record(self, operation: str, status: int | None, started: float) -> None:
        if self._on_request is not None:
            self._on_request(operation, status_class(status), time.monotonic() - started)

    def _parse(self, operation: str, answer: _Answer, parse: Callable[[object], _T]) -> _T:
        """Parse a 2xx answer; a body that is not what the contract says is a PlatformError."""
        try:
            return parse(orjson.loads(answer.body))
        except orjson.JSONDecodeError:
            detail = "answer is not valid JSON"
        except ValueError as exc:  # our models' messages name the field, never its value
            detail = f"unexpected answer: {exc}"
        raise PlatformError(
            operation, answer.status, _excerpt(answer.body, [self._api_key]), detail=detail
        )

    @staticmethod
    def _webhook_path(webhook_id: str) -> str:
        if not webhook_id:
            raise ValueError("webhook_id must not be empty")
        return "/webhooks/" + quote(webhook_id, safe="")


def _passwords_in(document: object) -> Iterable[str]:
    """Every non-empty `password` value in a request body, to scrub from error excerpts."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "password" and isinstance(value, str) and value:
                yield value
            else:
                yield from _passwords_in(value)
    elif isinstance(document, list):
        for item in document:
            yield from _passwords_in(item)


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """redact_text for the shapes it knows, then every known secret literally."""
    text = redact_text(text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _excerpt(body: bytes, secrets: Iterable[str]) -> str:
    """A redacted, bounded, single-line excerpt of an answer body."""
    text = body[:_MAX_ERROR_BODY_CHARS].decode("utf-8", errors="replace")
    text = " ".join(_scrub(text, secrets).split())
    limit = PlatformError.MAX_EXCERPT_CHARS
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(exc: BaseException, secrets: Iterable[str]) -> str:
    """A network failure as safe text: the class name and its (scrubbed, bounded) message."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "TimeoutError: no answer in time"
    text = " ".join(_scrub(str(exc), secrets).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
