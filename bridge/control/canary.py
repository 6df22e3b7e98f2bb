"""Canary: ask the platform for an example callback and check that our receiver really got it."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import orjson

from bridge.control.client import OneClient
from bridge.control.models import Webhook
from bridge.errors import PlatformError

# Example eventIds and rejections remembered: the callback may land before example() returns.
_REMEMBERED = 256


class ExampleWatch:
    """What the receiver saw of example callbacks, for canaries to look up."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._rejections: deque[tuple[float, str, str]] = deque(maxlen=_REMEMBERED)

    def saw(self, event_id: str) -> None:
        self._seen[event_id] = time.monotonic()
        while len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)
        waiter = self._waiting.pop(event_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def rejected(self, tenant: str, reason: str) -> None:
        self._rejections.append((time.monotonic(), tenant, reason))

    async def wait_for(self, event_id: str, timeout_seconds: float) -> bool:
        if event_id in self._seen:
            return True
        waiter = self._waiting.setdefault(event_id, asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(timeout_seconds):
                await asyncio.shield(waiter)
        except TimeoutError:
            return False
        finally:
            self._waiting.pop(event_id, None)
        return True

    def rejections_since(self, since: float, tenant: str) -> list[str]:
        return [reason for at, who, reason in self._rejections if at >= since and who == tenant]


@dataclass(frozen=True, slots=True)
class CanaryResult:
    tenant: str
    event_type: str
    is_ok: bool
    reason: str  # "ok" or why not, for logs and the CLI (bounded, no secrets)
    latency_seconds: float | None


async def check(
    client: OneClient,
    tenant: str,
    webhook: Webhook,
    watch: ExampleWatch,
    *,
    timeout_seconds: float,
) -> CanaryResult:
    """One example callback through the platform to our receiver, end to end."""
    event_type = webhook.webhook_type.name
    started = time.monotonic()
    try:
        result = await client.example(
            webhook.webhook_type, webhook.callback_url, webhook.callback_auth
        )
    except PlatformError as exc:
        return CanaryResult(tenant, event_type, False, f"example call failed: {exc}", None)
    event_id = _event_id(result.request_body)
    if event_id is None:
        return CanaryResult(tenant, event_type, False, "example answer has no eventId", None)
    if await watch.wait_for(event_id, timeout_seconds):
        return CanaryResult(tenant, event_type, True, "ok", time.monotonic() - started)
    rejections = watch.rejections_since(started, tenant)
    if rejections:
        reason = (
            f"the receiver rejected the platform's callback: {', '.join(sorted(set(rejections)))}"
        )
        if "unauthorized" in rejections:
            reason += " (the registered credentials differ from the receiver's)"
    else:
        reason = (
            f"no callback arrived within {timeout_seconds:g} s"
            f" (is {webhook.callback_url} reachable from the platform?)"
        )
    return CanaryResult(tenant, event_type, False, reason, None)


def _event_id(request_body: str) -> str | None:
    try:
        document = orjson.loads(request_body)
    except orjson.JSONDecodeError:
        return None
    event_id = document.get("eventId") if isinstance(document, dict) else None
    return event_id if isinstance(event_id, str) else None
