"""The "aio-pika per request" baseline: what a straightforward webhook-to-RabbitMQ bridge costs.

    python tests/bench/baseline.py --port 8081 --amqp-url amqp://guest:guest@127.0.0.1:5672/ \
        --tenant klient [--user one] [--password dev-password]

An aiohttp server that checks what the bridge checks on the hot path (HTTP Basic, compared in
constant time; a JSON Content-Type; the body parsed with orjson for `type` and `eventId`) and
publishes every request through aio-pika: one robust connection, one confirm channel,
`exchange.publish()` per request, persistent, `message_id` = eventId, the bridge's properties and
headers, answering 200 once the broker confirmed. It has none of the bridge's other work: no
spool, no duplicate window, no metrics, no per-request log line.

Deliberately self-contained (aiohttp, aio-pika, orjson; nothing from `bridge`), so the baseline
stays the same while the bridge changes. GET /readyz answers 200 once the exchanges are declared.
Options fall back to BENCH_BASELINE_* environment variables (run.py passes the password so).
Not a pytest module (tests/bench is in norecursedirs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import orjson
from aio_pika.abc import AbstractRobustExchange
from aiohttp import web

UNROUTED_EXCHANGE = "one-bridge.unrouted"
# The documented type -> exchangeName stems (the tenant key is appended), as the bridge has them.
EXCHANGE_STEMS = {
    "CartOpened": "p-u-o-m-e-c-cartopened-",
    "ClientLogged": "p-u-o-m-e-c-clientlogged-",
    "OfferOpened": "p-u-o-m-e-o-offeropened-",
}
PUBLISH_TIMEOUT_SECONDS = 5.0

EXCHANGES = web.AppKey("exchanges", dict[str, AbstractRobustExchange])
OPTIONS = web.AppKey("options", argparse.Namespace)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="aio-pika per-request baseline publisher")
    parser.add_argument("--host", default=env("BENCH_BASELINE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("BENCH_BASELINE_PORT", "8081")))
    parser.add_argument(
        "--amqp-url",
        default=env("BENCH_BASELINE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    parser.add_argument("--tenant", default=env("BENCH_BASELINE_TENANT", "klient"))
    parser.add_argument("--user", default=env("BENCH_BASELINE_USER", "one"))
    parser.add_argument("--password", default=env("BENCH_BASELINE_PASSWORD", "dev-password"))
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=env("BENCH_BASELINE_LOOP", "asyncio"),
        help="event loop (default asyncio's own: the stock setup)",
    )
    return parser.parse_args(argv)


def is_authorized(header: str | None, user: bytes, password: bytes) -> bool:
    scheme, _, encoded = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_user, _, given_password = decoded.partition(b":")
    user_ok = hmac.compare_digest(given_user, user)
    return hmac.compare_digest(given_password, password) and user_ok


def error(status: int, reason: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"error": reason}), content_type="application/json"
    )


async def handle_callback(request: web.Request) -> web.Response:
    options = request.app[OPTIONS]
    if request.match_info["tenant"] != options.tenant:
        return error(404, "unknown_tenant")
    if not is_authorized(
        request.headers.get("Authorization"), options.user.encode(), options.password.encode()
    ):
        return error(401, "unauthorized")
    if request.content_type != "application/json":
        return error(415, "unsupported_media_type")
    body = await request.read()
    try:
        document = orjson.loads(body)
        event_type, event_id = document["type"], document["eventId"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return error(400, "invalid_body")
    if not isinstance(event_type, str) or not isinstance(event_id, str):
        return error(400, "invalid_body")
    exchanges = request.app[EXCHANGES]
    exchange = exchanges.get(event_type) or exchanges[UNROUTED_EXCHANGE]
    received_at = datetime.now(UTC)
    message = aio_pika.Message(
        body=body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event_id,
        type=event_type,
        app_id="one-bridge-baseline",
        timestamp=received_at,
        headers={
            "x-one-tenant": options.tenant,
            "x-one-event-type": event_type,
            "x-one-received-at": received_at.isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            ),
        },
    )
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
            await exchange.publish(message, routing_key=event_type, mandatory=True)
    except Exception as exc:
        return error(503, f"publish failed: {type(exc).__name__}")
    return web.Response(
        body=orjson.dumps({"status": "published", "eventId": event_id}),
        content_type="application/json",
    )


async def handle_readyz(request: web.Request) -> web.Response:
    return web.Response(text="ready\n" if request.app[EXCHANGES] else "starting\n")


async def broker(app: web.Application) -> AsyncIterator[None]:
    """Connect, declare the exchanges as the bridge does, close on shutdown."""
    options = app[OPTIONS]
    connection = await aio_pika.connect_robust(
        options.amqp_url, client_properties={"connection_name": "one-bridge-baseline"}
    )
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchanges = app[EXCHANGES]
    exchanges[UNROUTED_EXCHANGE] = await channel.declare_exchange(
        UNROUTED_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    for event_type, stem in EXCHANGE_STEMS.items():
        exchanges[event_type] = await channel.declare_exchange(
            stem + options.tenant,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": UNROUTED_EXCHANGE},
        )
    yield
    await connection.close()


def build_app(options: argparse.Namespace) -> web.Application:
    app = web.Application()
    app[OPTIONS] = options
    app[EXCHANGES] = {}
    app.cleanup_ctx.append(broker)
    app.router.add_post("/one/{tenant}/events", handle_callback)
    app.router.add_get("/readyz", handle_readyz)
    return app


def main() -> None:
    options = parse_args()
    loop = None
    if options.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    # SIGTERM/SIGINT: stop listening, let in-flight handlers finish, close the connection.
    web.run_app(
        build_app(options),
        host=options.host,
        port=options.port,
        access_log=None,
        print=None,
        shutdown_timeout=10.0,
        loop=loop,
    )


if __name__ == "__main__":
    main()
