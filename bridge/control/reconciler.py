"""Reconciler: keep each tenant's webhook registrations equal to what the config asks for.

A pass per tenant: types -> routing table -> list -> plan -> apply, each action on its own (one
failure does not stop the others; every action is idempotent, so the next pass finishes the
job). Runs once the receiver listens, then every interval with jitter, and on trigger().
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import aiohttp
import structlog

from bridge.config import Config, TenantConfig
from bridge.control import canary
from bridge.control.client import OneClient
from bridge.control.models import CallbackAuth, Webhook, WebhookType
from bridge.control.plan import Plan, desired_webhooks, is_owned, plan_changes
from bridge.errors import ConfigError, PlatformAuthError, PlatformError
from bridge.events import RoutingTable, documented_exchanges

log = structlog.get_logger("bridge.control.reconciler")

# After a failed pass: 5 s, 10 s, 20 s ... at most this long; a refused API key waits longest.
_BACKOFF_FIRST_SECONDS = 5.0
_BACKOFF_MAX_SECONDS = 300.0
_JITTER_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class TenantTarget:
    """What one tenant's registrations must look like, and the client to make them so."""

    tenant: str
    client: OneClient
    callback_url: str
    callback_auth: CallbackAuth
    types: tuple[str, ...]  # empty: every type the platform lists


@dataclass(slots=True)
class PassResult:
    plans: dict[str, Plan] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "tenant: what failed" (no secrets)
    is_auth_refused: bool = False  # the platform refused an API key: a human must act

    @property
    def is_ok(self) -> bool:
        return not self.failures

    def add_failure(self, what: str, exc: PlatformError) -> None:
        self.failures.append(f"{what}: {exc}")
        self.is_auth_refused |= isinstance(exc, PlatformAuthError)


class Hooks:
    """Where the reconciler reports (metrics); the defaults do nothing."""

    def run(self, result: str) -> None: ...

    def action(self, action: str, result: str) -> None: ...

    def canary(self, result: canary.CanaryResult) -> None: ...


def callback_url(callback_base_url: str, tenant: str) -> str:
    return f"{callback_base_url.rstrip('/')}/one/{tenant}/events"


def callback_auth(tenant: TenantConfig) -> CallbackAuth:
    """What the platform must send: the receiver's own credentials, its current password."""
    if tenant.auth == "none":
        return CallbackAuth("NONE")
    return CallbackAuth("HTTP_BASIC", tenant.username, tenant.password_values()[0])


def targets_from_config(
    config: Config,
    session: aiohttp.ClientSession,
    *,
    on_request: Callable[[str, str, float], None] | None = None,
) -> list[TenantTarget]:
    """One target per configured tenant; needs [control] base_url and callback_base_url."""
    control = config.control
    if control.base_url is None or control.callback_base_url is None:
        raise ConfigError("control.base_url and control.callback_base_url are not set")
    return [
        TenantTarget(
            tenant=key,
            client=OneClient(
                session,
                control.base_url,
                key,
                tenant.api_key.get_secret_value() if tenant.api_key else "",
                timeout_seconds=control.timeout_seconds,
                on_request=on_request,
            ),
            callback_url=callback_url(control.callback_base_url, key),
            callback_auth=callback_auth(tenant),
            types=tenant.types,
        )
        for key, tenant in config.tenants.items()
    ]


async def platform_types(target: TenantTarget, routes: RoutingTable) -> list[WebhookType]:
    """The tenant's types from /types (feeding the routing table), else the documented table."""
    try:
        types = await target.client.types()
    except PlatformError as exc:
        log.warning("platform.types_unavailable", tenant=target.tenant, error=str(exc))
        types = [WebhookType(n, e) for n, e in documented_exchanges(target.tenant).items()]
    else:
        routes.set_platform_exchanges(target.tenant, {t.name: t.exchange_name for t in types})
    if target.types:
        wanted = set(target.types)
        types = [t for t in types if t.name in wanted]
    return types


async def plan_tenant(target: TenantTarget, routes: RoutingTable, *, name_prefix: str) -> Plan:
    types = await platform_types(target, routes)
    desired = desired_webhooks(
        types,
        name_prefix=name_prefix,
        callback_url=target.callback_url,
        callback_auth=target.callback_auth,
    )
    actual = await target.client.list_webhooks(search=_search_term(name_prefix))
    return plan_changes(desired, actual, name_prefix=name_prefix)


async def apply_plan(target: TenantTarget, plan: Plan, result: PassResult, hooks: Hooks) -> None:
    """Carry out a plan, each action on its own; failures are added to `result`."""
    client = target.client
    actions: list[tuple[str, str, Callable[[], Awaitable[object]]]] = [
        *(("create", w.webhook_type.name, partial(client.create, w)) for w in plan.create),
        *(
            ("update", u.desired.webhook_type.name, partial(client.update, u.desired))
            for u in plan.update
        ),
        *(("delete", w.webhook_type.name, partial(client.delete, w.id or "")) for w in plan.delete),
    ]
    for action, event_type, call in actions:
        try:
            await call()
        except PlatformError as exc:
            hooks.action(action, "failure")
            result.add_failure(f"{target.tenant}: {action} {event_type}", exc)
            log.warning(
                "reconcile.action_failed",
                tenant=target.tenant,
                action=action,
                event_type=event_type,
                error=str(exc),
            )
        else:
            hooks.action(action, "success")
            log.info(
                "reconcile.action_applied",
                tenant=target.tenant,
                action=action,
                event_type=event_type,
            )


def _search_term(name_prefix: str) -> str | None:
    # The platform filters by name with 3+ characters: narrow the listing to our own webhooks.
    term = name_prefix.strip()
    return term if len(term) >= 3 else None


class Reconciler:
    def __init__(
        self,
        targets: Sequence[TenantTarget],
        routes: RoutingTable,
        *,
        name_prefix: str,
        interval_seconds: float,
        watch: canary.ExampleWatch | None = None,
        canary_interval_seconds: float = 0.0,
        canary_timeout_seconds: float = 15.0,
        hooks: Hooks | None = None,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self._targets = tuple(targets)
        self._routes = routes
        self._name_prefix = name_prefix
        self._interval_seconds = interval_seconds
        self._watch = watch
        self._canary_interval_seconds = canary_interval_seconds
        self._canary_timeout_seconds = canary_timeout_seconds
        self._hooks = hooks or Hooks()
        self._may_write = may_write
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._is_failing = False
        self._failures_in_a_row = 0
        self._last_canary = 0.0
        self.passes = 0

    def trigger(self) -> None:
        """Run a pass now instead of at the next interval."""
        self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def reconcile_once(self, *, dry_run: bool = False) -> PassResult:
        """One pass over every tenant; with dry_run, plans only."""
        result = PassResult()
        for target in self._targets:
            try:
                plan = await plan_tenant(target, self._routes, name_prefix=self._name_prefix)
            except PlatformError as exc:
                result.add_failure(target.tenant, exc)
                continue
            result.plans[target.tenant] = plan
            if not (dry_run or plan.is_empty):
                await apply_plan(target, plan, result, self._hooks)
        return result

    async def run_canaries(self) -> list[canary.CanaryResult]:
        """An example callback per owned registration; each result is logged and reported."""
        assert self._watch is not None
        results = []
        for target in self._targets:
            owned = await _owned(target, self._name_prefix)
            for webhook in owned:
                outcome = await canary.check(
                    target.client,
                    target.tenant,
                    webhook,
                    self._watch,
                    timeout_seconds=self._canary_timeout_seconds,
                )
                self._hooks.canary(outcome)
                (log.info if outcome.is_ok else log.error)(
                    "canary.finished",
                    tenant=outcome.tenant,
                    event_type=outcome.event_type,
                    ok=outcome.is_ok,
                    reason=outcome.reason,
                    latency_ms=None
                    if outcome.latency_seconds is None
                    else round(outcome.latency_seconds * 1000, 1),
                )
                results.append(outcome)
        self._last_canary = time.monotonic()
        return results

    async def _run(self) -> None:
        delay = 0.0
        while True:
            await self._wait(delay)
            if not self._may_write():
                delay = self._interval_seconds
                continue
            try:
                delay = await self._pass()
            except Exception:
                # A bug, not the platform: log it, keep the daemon alive, try again later.
                log.exception("reconcile.crashed")
                delay = _BACKOFF_MAX_SECONDS

    async def _pass(self) -> float:
        started = time.monotonic()
        result = await self.reconcile_once()
        self.passes += 1
        changed = any(not plan.is_empty for plan in result.plans.values())
        totals = {
            k: sum(p.counts()[k] for p in result.plans.values())
            for k in ("create", "update", "delete", "unchanged")
        }
        log.info(
            "reconcile.finished",
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            ok=result.is_ok,
            **totals,
        )
        if not result.is_ok:
            self._hooks.run("failure")
            return self._failing(result)
        self._hooks.run("success")
        if self._is_failing:
            self._is_failing = False
            self._failures_in_a_row = 0
            log.info("reconcile.recovered")
        if self._watch is not None and (changed or self._canary_due()):
            await self.run_canaries()
        return self._interval_seconds

    def _failing(self, result: PassResult) -> float:
        self._failures_in_a_row = getattr(self, "_failures_in_a_row", 0) + 1
        if not self._is_failing:
            self._is_failing = True
            log.error("reconcile.failing", failures=result.failures[:10])
        delay = min(
            _BACKOFF_FIRST_SECONDS * 2 ** (self._failures_in_a_row - 1), _BACKOFF_MAX_SECONDS
        )
        return (
            min(delay, self._interval_seconds)
            if not self._auth_refused(result)
            else (_BACKOFF_MAX_SECONDS)
        )

    @staticmethod
    def _auth_refused(result: PassResult) -> bool:
        return any("status 401" in f or "status 403" in f for f in result.failures)

    def _canary_due(self) -> bool:
        interval = self._canary_interval_seconds
        return interval > 0 and time.monotonic() - self._last_canary >= interval

    async def _wait(self, delay: float) -> None:
        if delay <= 0:
            return
        jittered = delay * random.uniform(1 - _JITTER_FRACTION, 1 + _JITTER_FRACTION)
        try:
            async with asyncio.timeout(jittered):
                await self._wakeup.wait()
        except TimeoutError:
            pass
        self._wakeup.clear()


async def _owned(target: TenantTarget, name_prefix: str) -> list[Webhook]:
    webhooks = await target.client.list_webhooks(search=_search_term(name_prefix))
    return [w for w in webhooks if is_owned(w, name_prefix) and w.status == "ACTIVE"]
