"""The control module end to end: the sandbox platform, a real RabbitMQ and the bridge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from conftest import DEV_PASSWORD, DEV_USER, make_config
from support.amqp import bound_queue, take, unique, wait_until
from support.process import free_port

from bridge.app import Bridge
from bridge.config import Config
from bridge.metrics import Metrics
from bridge.sandbox import SANDBOX_STATE, SandboxState, build_sandbox_app

pytestmark = pytest.mark.integration

API_KEY = "test-api-key"
PREFIX = "one-bridge:"


@pytest.fixture
async def sandbox(aiohttp_server) -> Any:
    server = await aiohttp_server(build_sandbox_app(default_api_key=API_KEY))
    return server


def state_of(server: Any) -> SandboxState:
    return server.app[SANDBOX_STATE]


def control_config(
    amqp_url: str,
    server: Any,
    tenant: str,
    *,
    passwords: list[str] | None = None,
    lock_name: str | None = None,
    spool_dir: str | None = None,
    **control: Any,
) -> Config:
    port = free_port()
    return make_config(
        broker={"url": amqp_url},
        **({"spool": {"dir": spool_dir}} if spool_dir else {}),
        receiver={"port": port},
        tenants={
            tenant: {
                "username": DEV_USER,
                "passwords": passwords or [DEV_PASSWORD],
                "api_key": API_KEY,
            }
        },
        control={
            "base_url": str(server.make_url("")),
            "callback_base_url": f"http://127.0.0.1:{port}",
            "name_prefix": PREFIX,
            "interval_seconds": 3600,
            "canary_interval_seconds": 0,
            "canary_timeout_seconds": 5,
            "lock_name": lock_name or unique("lock"),
            **control,
        },
    )


@asynccontextmanager
async def running(cfg: Config, metrics: Metrics | None = None) -> AsyncIterator[Bridge]:
    async with Bridge(cfg, metrics=metrics) as bridge:
        await asyncio.wait_for(bridge.publisher.wait_connected(), 30)
        yield bridge


async def first_pass(bridge: Bridge, passes: int = 1) -> None:
    assert bridge.reconciler is not None
    reconciler = bridge.reconciler
    await wait_until(lambda: reconciler.passes >= passes)


def owned(state: SandboxState, tenant: str) -> list[dict[str, Any]]:
    return [w for w in state.webhooks(tenant) if str(w["name"]).startswith(PREFIX)]


async def test_empty_platform_is_registered_and_its_callbacks_reach_rabbitmq(rabbitmq, sandbox):
    """One pass registers every type; the platform's callbacks then arrive in RabbitMQ."""
    tenant = unique("t").replace("-", "")
    state = state_of(sandbox)
    cfg = control_config(rabbitmq.url, sandbox, tenant)
    exchanges = [
        f"p-u-o-m-e-c-cartopened-{tenant}",
        f"p-u-o-m-e-c-clientlogged-{tenant}",
        f"p-u-o-m-e-o-offeropened-{tenant}",
    ]
    # Bound before the bridge starts, so the canary's examples after the first pass land too.
    async with bound_queue(rabbitmq.url, *exchanges) as queue, running(cfg) as bridge:
        await first_pass(bridge)
        registered = owned(state, tenant)
        assert sorted(w["webhookType"]["name"] for w in registered) == [
            "CartOpened",
            "ClientLogged",
            "OfferOpened",
        ]
        for webhook in registered:
            assert webhook["status"] == "ACTIVE"
            assert webhook["callbackUrl"] == f"{cfg.control.callback_base_url}/one/{tenant}/events"
            assert webhook["callbackAuthentication"] == {
                "type": "HTTP_BASIC",
                "username": DEV_USER,
                "password": DEV_PASSWORD,
            }
        deliveries = []
        for event_type in ("CartOpened", "ClientLogged", "OfferOpened"):
            deliveries += await state.fire(tenant, event_type, count=2)
        assert [d.status for d in deliveries] == [200] * 6
        # The canary's three example callbacks share the exchanges, marked as examples.
        messages = await take(queue, 9)
    real = [m for m in messages if not (m.headers or {}).get("x-one-example")]
    assert {m.message_id for m in real} == {d.event_id for d in deliveries}
    assert len(messages) - len(real) == 3


async def test_drift_made_at_the_platform_is_repaired_and_then_nothing_is_planned(
    rabbitmq, sandbox
):
    """A human's edits (status, URL, password) are undone at the next pass; the one after
    that plans nothing; a foreign webhook is never touched."""
    tenant = unique("d").replace("-", "")
    state = state_of(sandbox)
    foreign = {
        "name": "New sale",
        "status": "ACTIVE",
        "webhookType": {"name": "CartOpened", "exchangeName": f"p-u-o-m-e-c-cartopened-{tenant}"},
        "callbackUrl": "https://someone-else.example/hook",
        "callbackAuthentication": {"type": "HTTP_BASIC", "username": "admin", "password": "admin"},
    }
    foreign_id = state.put_webhook(tenant, foreign)
    cfg = control_config(rabbitmq.url, sandbox, tenant)
    async with running(cfg) as bridge:
        await first_pass(bridge)
        cart = next(w for w in owned(state, tenant) if w["webhookType"]["name"] == "CartOpened")
        state.edit_webhook(
            tenant,
            str(cart["id"]),
            {
                "status": "INACTIVE",
                "callbackUrl": "https://moved.example/one",
                "callbackAuthentication": {"password": "typo"},
            },
        )
        assert bridge.reconciler is not None
        bridge.reconciler.trigger()
        await first_pass(bridge, passes=2)
        repaired = state.webhook(tenant, str(cart["id"]))
        assert repaired is not None
        assert repaired["status"] == "ACTIVE"
        assert repaired["callbackUrl"] == f"{cfg.control.callback_base_url}/one/{tenant}/events"
        assert repaired["callbackAuthentication"]["password"] == DEV_PASSWORD
        again = await bridge.reconciler.reconcile_once(dry_run=True)
        assert again.is_ok and again.plans[tenant].is_empty
    assert state.webhook(tenant, foreign_id) == {**foreign, "id": foreign_id}


async def test_canary_passes_through_the_receiver_and_names_a_wrong_password(rabbitmq, sandbox):
    """After the first pass the canary's example callbacks arrive; with a wrong registered
    password it fails and says the credentials differ."""
    tenant = unique("c").replace("-", "")
    state = state_of(sandbox)
    metrics = Metrics()
    cfg = control_config(rabbitmq.url, sandbox, tenant)
    async with running(cfg, metrics) as bridge:
        await first_pass(bridge)
        assert bridge.reconciler is not None
        await wait_until(
            lambda: (
                metrics.registry.get_sample_value(
                    "onebridge_canary_runs_total",
                    {"event_type": "OfferOpened", "result": "success"},
                )
                == 1
            )
        )
        for event_type in ("CartOpened", "ClientLogged", "OfferOpened"):
            assert (
                metrics.registry.get_sample_value("onebridge_canary_ok", {"event_type": event_type})
                == 1
            )
        for webhook in owned(state, tenant):
            state.edit_webhook(
                tenant,
                str(webhook["id"]),
                {"callbackAuthentication": {"password": "not-the-right-one"}},
            )
        results = await bridge.reconciler.run_canaries()
    assert [r.is_ok for r in results] == [False, False, False]
    assert all("unauthorized" in r.reason and "credentials differ" in r.reason for r in results)
    assert "not-the-right-one" not in repr(results)


async def test_rotated_password_is_registered_while_the_old_one_still_works(rabbitmq, sandbox):
    """A new first password updates the platform; the receiver takes old and new meanwhile."""
    tenant = unique("r").replace("-", "")
    state = state_of(sandbox)
    async with running(control_config(rabbitmq.url, sandbox, tenant, passwords=["old-pw"])) as b:
        await first_pass(b)
    assert {w["callbackAuthentication"]["password"] for w in owned(state, tenant)} == {"old-pw"}
    rotated = control_config(rabbitmq.url, sandbox, tenant, passwords=["new-pw", "old-pw"])
    async with running(rotated) as bridge:
        await first_pass(bridge)
        assert {w["callbackAuthentication"]["password"] for w in owned(state, tenant)} == {"new-pw"}
        # The platform may still send the old password for a while: both are accepted.
        for webhook in owned(state, tenant):
            state.edit_webhook(
                tenant, str(webhook["id"]), {"callbackAuthentication": {"password": "old-pw"}}
            )
        deliveries = await state.fire(tenant, "CartOpened")
        assert [d.status for d in deliveries] == [200]


async def test_only_one_of_two_bridges_reconciles_and_the_other_takes_over(
    rabbitmq, sandbox, tmp_path
):
    """The reconciler lock: one active writer; when it goes, the standby takes over."""
    tenant = unique("l").replace("-", "")
    lock_name = unique("shared")
    first_metrics, second_metrics = Metrics(), Metrics()

    def leader(metrics: Metrics) -> float | None:
        return metrics.registry.get_sample_value("onebridge_reconciler_leader")

    first_cfg = control_config(
        rabbitmq.url, sandbox, tenant, lock_name=lock_name, spool_dir=str(tmp_path / "first")
    )
    second_cfg = control_config(
        rabbitmq.url, sandbox, tenant, lock_name=lock_name, spool_dir=str(tmp_path / "second")
    )
    async with AsyncExitStack() as first_stack, AsyncExitStack() as second_stack:
        first = await first_stack.enter_async_context(running(first_cfg, first_metrics))
        second = await second_stack.enter_async_context(running(second_cfg, second_metrics))
        await wait_until(
            lambda: (leader(first_metrics), leader(second_metrics)) in {(1, 0), (0, 1)}
        )
        if leader(first_metrics) == 1:
            active, standby, active_stack, standby_metrics = (
                first,
                second,
                first_stack,
                second_metrics,
            )
        else:
            active, standby, active_stack, standby_metrics = (
                second,
                first,
                second_stack,
                first_metrics,
            )
        assert active.reconciler is not None and standby.reconciler is not None
        await first_pass(active)
        assert standby.reconciler.passes == 0
        await active_stack.aclose()  # the active bridge goes away: its lock goes with it
        await wait_until(lambda: leader(standby_metrics) == 1, timeout=30)
        await first_pass(standby)
    assert len(owned(state_of(sandbox), tenant)) == 3
