"""Spool end to end: callbacks/s answered from the spool while RabbitMQ is down, then replay/s.

    python tests/bench/bench_replay.py [--count 20000] [--concurrency 64]

Starts a private RabbitMQ and the bridge (`python -m bridge run`, production defaults), stops
the RabbitMQ application, posts --count callbacks (bridge.sender, all answered `200 spooled`),
starts RabbitMQ again and watches /metrics until the spool is empty. Reports the spooling rate
over HTTP, the replay rate (records confirmed by RabbitMQ and deleted per second, between the
first poll that sees a replayed record and the one that sees an empty spool), and
lost = accepted - messages in the bound queue (must be 0). bench_spool.py measures the spool
alone, without HTTP or broker. Not a pytest module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run as a plain script, so the repository root is not on sys.path by itself.
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import aio_pika  # noqa: E402
import aiohttp  # noqa: E402
from run import (  # noqa: E402
    HOST,
    USER,
    bench_queue,
    declare_topology,
    message_count,
    parse_metrics,
    spawn,
    stop,
)

from bridge.devbroker import LocalBroker, free_ports  # noqa: E402
from bridge.sender import SendOptions, send_callbacks  # noqa: E402

TENANT = "benchreplay"
POLL_SECONDS = 0.05
WAIT_SECONDS = 120.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="callbacks to spool")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    return parser.parse_args()


async def metric(session: aiohttp.ClientSession, ops: str, name: str) -> float:
    async with session.get(f"{ops}/metrics") as response:
        text = await response.text()
    return sum(value for _, value in parse_metrics(text, name))


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, *, until: bool = True) -> float:
    """Poll `check()` until it returns `until`; returns the time it did."""
    deadline = time.monotonic() + WAIT_SECONDS
    while await check() is not until:
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic()


async def measure(
    args: argparse.Namespace, broker: LocalBroker, work_dir: Path
) -> dict[str, object]:
    connection = await aio_pika.connect(broker.url)
    channel = await connection.channel()
    await declare_topology(channel, TENANT)
    port, ops_port = free_ports(2)
    password = secrets.token_urlsafe(16)
    env = {key: value for key, value in os.environ.items() if not key.startswith("BRIDGE_")}
    env.update(
        {
            "BRIDGE_BROKER__URL": broker.url,
            "BRIDGE_RECEIVER__HOST": HOST,
            "BRIDGE_RECEIVER__PORT": str(port),
            "BRIDGE_OPS__HOST": HOST,
            "BRIDGE_OPS__PORT": str(ops_port),
            "BRIDGE_SPOOL__DIR": str(work_dir / "spool"),
            "BRIDGE_LOG__FORMAT": "json",
            f"BRIDGE_TENANTS__{TENANT.upper()}__USERNAME": USER,
            f"BRIDGE_TENANTS__{TENANT.upper()}__PASSWORDS": json.dumps([password]),
        }
    )
    ops = f"http://{HOST}:{ops_port}"
    bridge = await spawn(
        [sys.executable, "-m", "bridge", "run"],
        env=env,
        cwd=HERE.parents[1],
        log_path=work_dir / "bridge.log",
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def connected() -> bool:
                try:
                    return await metric(session, ops, "onebridge_broker_connected") == 1
                except aiohttp.ClientError:
                    return False

            await wait_for(connected, "the bridge to connect")
            await connection.close()
            broker.stop_app()
            await wait_for(connected, "the bridge to see the broker gone", until=False)

            options = SendOptions(
                url=f"http://{HOST}:{port}",
                tenant=TENANT,
                user=USER,
                password=password,
                count=args.count,
                concurrency=args.concurrency,
            )
            sent = await send_callbacks(options)
            spooled = await metric(session, ops, "onebridge_spool_events")

            broker.start_app()

            async def replaying() -> bool:
                return await metric(session, ops, "onebridge_spool_replayed_total") > 0

            async def empty() -> bool:
                return await metric(session, ops, "onebridge_spool_events") == 0

            first_replayed = await wait_for(replaying, "the first replayed record")
            replayed_before = await metric(session, ops, "onebridge_spool_replayed_total")
            emptied = await wait_for(empty, "an empty spool")
            replayed_after = await metric(session, ops, "onebridge_spool_replayed_total")
    finally:
        bridge.send_signal(signal.SIGTERM)
        await stop(bridge)
    connection = await aio_pika.connect(broker.url)
    queued = await message_count(await connection.channel(), bench_queue(TENANT))
    await connection.close()
    return {
        "accepted": sent.accepted,
        "statuses": sent.by_status,
        "spooling_per_second": round(sent.rate_per_second),
        "spooling_p99_ms": round(sent.p99_ms or 0, 1),
        "spooled": int(spooled),
        # Records replayed between two observations, over the time between them.
        "replay_per_second": round(
            (replayed_after - replayed_before) / max(emptied - first_replayed, 1e-9)
        ),
        "queued": queued,
        "lost": sent.accepted - queued,
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as directory:
        work_dir = Path(directory)
        with LocalBroker(work_dir / "rabbitmq", port=0) as broker:
            result = asyncio.run(measure(args, broker, work_dir))
    for key, value in result.items():
        print(f"{key}: {value}")
    if result["lost"] != 0:
        raise SystemExit("lost events: see above")


if __name__ == "__main__":
    main()
