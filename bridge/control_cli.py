"""The `webhooks`, `sync` and `canary` commands: the control module from the command line.

Passwords and API keys never reach the output: webhooks are shown with their password masked.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import aio_pika
import aiohttp
import orjson

from bridge.config import Config
from bridge.control.models import CallbackAuth, Webhook
from bridge.control.plan import Plan, desired_webhooks, is_owned
from bridge.control.reconciler import (
    PassResult,
    Reconciler,
    TenantTarget,
    platform_types,
    targets_from_config,
)
from bridge.events import UNROUTED_EXCHANGE, RoutingTable
from bridge.redact import MASK

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PENDING = 0, 1, 2, 3

LoadConfig = Callable[[argparse.Namespace], Config]


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    add_config_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    webhooks = commands.add_parser("webhooks", help="the platform's webhook registrations")
    actions = webhooks.add_subparsers(dest="webhooks_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every webhook of the tenant (ours marked)")
    get = actions.add_parser("get", help="one webhook")
    get.add_argument("webhook_id")
    create = actions.add_parser("create", help="register our callback for an event type")
    create.add_argument("--type", required=True, dest="event_type")
    update = actions.add_parser("update", help="change a webhook's status or URL")
    update.add_argument("webhook_id")
    update.add_argument("--status", choices=("ACTIVE", "INACTIVE"))
    update.add_argument("--url", help="new callback URL")
    delete = actions.add_parser("delete", help="remove a webhook")
    delete.add_argument("webhook_id")
    types = actions.add_parser("types", help="the event types the platform offers")
    example = actions.add_parser("example", help="ask the platform for an example callback")
    example.add_argument("--type", required=True, dest="event_type")
    handlers = {
        listing: _list,
        get: _get,
        create: _create,
        update: _update,
        delete: _delete,
        types: _types,
        example: _example,
    }
    for parser, handler in handlers.items():
        _common_flags(parser, add_config_flags)
        parser.set_defaults(handler=handler, needs_control=True)

    sync = commands.add_parser(
        "sync", help="make the platform's registrations match the config (once)"
    )
    sync.add_argument(
        "--dry-run", action="store_true", help="show the plan only (exit 3: changes pending)"
    )
    _common_flags(sync, add_config_flags, tenant=False)
    sync.set_defaults(handler=_sync, needs_control=True)

    canary = commands.add_parser(
        "canary", help="example callback per registration, through a running bridge to RabbitMQ"
    )
    canary.add_argument("--timeout", type=float, default=15.0, help="seconds per check")
    _common_flags(canary, add_config_flags, tenant=False)
    canary.set_defaults(handler=_canary, needs_control=True)


def _common_flags(
    parser: argparse.ArgumentParser,
    add_config_flags: Callable[[argparse.ArgumentParser], None],
    *,
    tenant: bool = True,
) -> None:
    add_config_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    if tenant:
        parser.add_argument("--tenant", help="tenant key (default: the only configured one)")


def run(args: argparse.Namespace, config: Config) -> int:
    result: int = asyncio.run(args.handler(args, config))
    return result


# --- webhooks -----------------------------------------------------------------------------------


async def _with_target(
    args: argparse.Namespace, config: Config, call: Callable[[TenantTarget], Awaitable[int]]
) -> int:
    async with aiohttp.ClientSession() as session:
        targets = {t.tenant: t for t in targets_from_config(config, session)}
        key = args.tenant or (next(iter(targets)) if len(targets) == 1 else None)
        if key not in targets:
            choices = ", ".join(sorted(targets)) or "none configured"
            print(f"one-bridge: choose a tenant with --tenant ({choices})", file=sys.stderr)
            return EXIT_USAGE
        return await call(targets[key])


async def _list(args: argparse.Namespace, config: Config) -> int:
    async def call(target: TenantTarget) -> int:
        webhooks = await target.client.list_webhooks()
        _print_webhooks(webhooks, config.control.name_prefix, as_json=args.json)
        return EXIT_OK

    return await _with_target(args, config, call)


async def _get(args: argparse.Namespace, config: Config) -> int:
    async def call(target: TenantTarget) -> int:
        webhook = await target.client.get(args.webhook_id)
        _print_webhooks([webhook], config.control.name_prefix, as_json=args.json)
        return EXIT_OK

    return await _with_target(args, config, call)


async def _create(args: argparse.Namespace, config: Config) -> int:
    async def call(target: TenantTarget) -> int:
        types = await platform_types(target, RoutingTable({}))
        chosen = [t for t in types if t.name == args.event_type]
        if not chosen:
            offered = ", ".join(t.name for t in types)
            print(f"one-bridge: unknown type {args.event_type!r} ({offered})", file=sys.stderr)
            return EXIT_USAGE
        [webhook] = desired_webhooks(
            chosen,
            name_prefix=config.control.name_prefix,
            callback_url=target.callback_url,
            callback_auth=target.callback_auth,
        )
        webhook_id = await target.client.create(webhook)
        _say({"created": webhook_id}, f"created {webhook_id}", as_json=args.json)
        return EXIT_OK

    return await _with_target(args, config, call)


async def _update(args: argparse.Namespace, config: Config) -> int:
    async def call(target: TenantTarget) -> int:
        webhook = await target.client.get(args.webhook_id)
        changed = replace(
            webhook,
            status=args.status or webhook.status,
            callback_url=args.url or webhook.callback_url,
        )
        await target.client.update(changed)
        _say({"updated": args.webhook_id}, f"updated {args.webhook_id}", as_json=args.json)
        return EXIT_OK

    return await _with_target(args, config, call)


async def _delete(args: argparse.Namespace, config: Config) -> int:
    async def call(target: TenantTarget) -> int:
        await target.client.delete(args.webhook_id)
        _say({"deleted": args.webhook_id}, f"deleted {args.webhook_id}", as_json=args.json)
        return EXIT_OK

    return await _with_target(args, config, call)


async def _types(args: argparse.Namespace, config: Config) -> int:
    async def call(target: TenantTarget) -> int:
        types = await target.client.types()
        rows = [{"name": t.name, "exchangeName": t.exchange_name} for t in types]
        _print_rows(rows, ("name", "exchangeName"), as_json=args.json)
        return EXIT_OK

    return await _with_target(args, config, call)


async def _example(args: argparse.Namespace, config: Config) -> int:
    async def call(target: TenantTarget) -> int:
        types = await platform_types(target, RoutingTable({}))
        chosen = next((t for t in types if t.name == args.event_type), None)
        if chosen is None:
            print(f"one-bridge: unknown type {args.event_type!r}", file=sys.stderr)
            return EXIT_USAGE
        result = await target.client.example(chosen, target.callback_url, target.callback_auth)
        headers = {
            name: [MASK] if name.lower() == "authorization" else values
            for name, values in result.request_headers.items()
        }
        answer = {"requestHeaders": headers, "requestBody": result.request_body}
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK

    return await _with_target(args, config, call)


# --- sync ---------------------------------------------------------------------------------------


async def _sync(args: argparse.Namespace, config: Config) -> int:
    from bridge.control.lock import RabbitLock

    lock = None
    if not args.dry_run:
        # The same lock a running bridge holds: never two writers at the platform at once.
        lock = RabbitLock(config.broker.url.get_secret_value(), config.control.lock_name)
        if not await lock.try_acquire():
            print(
                f"one-bridge: the reconciler lock ({lock.queue_name}) is held, most likely by a"
                " running bridge that reconciles by itself; or RabbitMQ is unreachable."
                " `one-bridge sync --dry-run` shows the plan without the lock.",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    try:
        async with aiohttp.ClientSession() as session:
            reconciler = Reconciler(
                targets_from_config(config, session),
                RoutingTable({}),
                name_prefix=config.control.name_prefix,
                interval_seconds=config.control.interval_seconds,
            )
            result = await reconciler.reconcile_once(dry_run=args.dry_run)
    finally:
        if lock is not None:
            await lock.close()
    _print_pass(result, dry_run=args.dry_run, as_json=args.json)
    if not result.is_ok:
        return EXIT_FAILURE
    pending = any(not plan.is_empty for plan in result.plans.values())
    return EXIT_PENDING if args.dry_run and pending else EXIT_OK


def _print_pass(result: PassResult, *, dry_run: bool, as_json: bool) -> None:
    if as_json:
        document = {
            "dry_run": dry_run,
            "tenants": {tenant: _plan_json(plan) for tenant, plan in result.plans.items()},
            "failures": result.failures,
        }
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    verb = "would" if dry_run else "did"
    for tenant, plan in result.plans.items():
        if plan.is_empty:
            print(f"{tenant}: up to date ({len(plan.unchanged)} registrations)")
            continue
        for webhook in plan.create:
            print(f"{tenant}: {verb} create {webhook.name} -> {webhook.callback_url}")
        for update in plan.update:
            print(
                f"{tenant}: {verb} update {update.current.name} ({update.current.id}):"
                f" {', '.join(update.drift)}"
            )
        for webhook in plan.delete:
            print(f"{tenant}: {verb} delete {webhook.name} ({webhook.id})")
    for failure in result.failures:
        print(f"failed: {failure}", file=sys.stderr)


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "create": [_masked(w) for w in plan.create],
        "update": [
            {"id": u.current.id, "drift": list(u.drift), "to": _masked(u.desired)}
            for u in plan.update
        ],
        "delete": [_masked(w) for w in plan.delete],
        "unchanged": len(plan.unchanged),
    }


# --- canary -------------------------------------------------------------------------------------


async def _canary(args: argparse.Namespace, config: Config) -> int:
    """Example callbacks must come out of RabbitMQ through a running bridge: the whole path."""
    failures = 0
    rows = []
    routes = RoutingTable({key: tenant.exchanges for key, tenant in config.tenants.items()})
    connection = await aio_pika.connect(config.broker.url.get_secret_value())
    async with connection, aiohttp.ClientSession() as session:
        channel = await connection.channel()
        for target in targets_from_config(config, session):
            await platform_types(target, routes)  # the exchanges the running bridge uses
            prefix = config.control.name_prefix
            owned = [
                w
                for w in await target.client.list_webhooks()
                if is_owned(w, prefix) and w.status == "ACTIVE"
            ]
            for webhook in owned:
                exchange = routes.exchange_for(target.tenant, webhook.webhook_type.name)
                queue = await channel.declare_queue(
                    f"one-bridge.canary-{uuid.uuid4().hex[:8]}", exclusive=True
                )
                await queue.bind(exchange or UNROUTED_EXCHANGE, routing_key="#")
                row = await _one_canary(target, webhook, queue, args.timeout)
                await queue.delete(if_unused=False, if_empty=False)
                failures += row["ok"] is False
                rows.append(row)
    _print_rows(rows, ("tenant", "event_type", "ok", "reason"), as_json=args.json)
    if not rows:
        print("one-bridge: no active registrations of ours to check", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE if failures else EXIT_OK


async def _one_canary(
    target: TenantTarget, webhook: Webhook, queue: aio_pika.abc.AbstractQueue, timeout: float
) -> dict[str, Any]:
    row: dict[str, Any] = {"tenant": target.tenant, "event_type": webhook.webhook_type.name}
    result = await target.client.example(
        webhook.webhook_type, webhook.callback_url, webhook.callback_auth
    )
    event_id = orjson.loads(result.request_body).get("eventId")
    try:
        async with asyncio.timeout(timeout), queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if message.message_id == event_id:
                    return row | {"ok": True, "reason": "ok"}
    except TimeoutError:
        pass
    return row | {
        "ok": False,
        "reason": f"example {event_id} did not come out of RabbitMQ within {timeout:g} s",
    }


# --- output -------------------------------------------------------------------------------------


def _masked(webhook: Webhook) -> dict[str, Any]:
    auth = webhook.callback_auth
    shown = CallbackAuth(auth.type, auth.username, MASK if auth.password else None)
    return replace(webhook, callback_auth=shown).to_json()


def _print_webhooks(webhooks: Sequence[Webhook], prefix: str, *, as_json: bool) -> None:
    rows = [
        {
            "id": w.id,
            "name": w.name,
            "status": w.status,
            "type": w.webhook_type.name,
            "exchangeName": w.webhook_type.exchange_name,
            "callbackUrl": w.callback_url,
            "auth": w.callback_auth.type
            + (f" {w.callback_auth.username}:{MASK}" if w.callback_auth.username else ""),
            "ours": is_owned(w, prefix),
        }
        for w in webhooks
    ]
    if as_json:
        print(orjson.dumps([_masked(w) | {"ours": is_owned(w, prefix)} for w in webhooks]).decode())
    else:
        _print_rows(
            rows, ("id", "name", "status", "type", "callbackUrl", "auth", "ours"), as_json=False
        )


def _print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(list(rows)).decode())
        return
    widths = {c: max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def _say(document: dict[str, Any], text: str, *, as_json: bool) -> None:
    print(orjson.dumps(document).decode() if as_json else text)
