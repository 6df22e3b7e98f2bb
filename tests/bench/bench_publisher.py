"""Publisher-only benchmark: client CPU per confirmed message, without HTTP in the way.

    python tests/bench/bench_publisher.py [--publisher fast,aio-pika] [--count 20000]
                                          [--in-flight 256] [--repeat 3] [--amqp-url URL]

Publishes --count events (realistic ~256-byte callback bodies, the three types in turn, unique
eventIds) through the bridge's publisher object itself (`publish(event, exchange, timeout=...)`
returns once RabbitMQ confirmed), with --in-flight publish() calls outstanding at any time, into
one durable queue bound to the three exchanges. Reported per publisher: client CPU per confirmed
message (time.process_time() delta / count: every thread of this process, event loop included),
messages per second, and the broker's CPU per message when the broker is ours. The publishers
named in --publisher are measured in turn, --repeat times, interleaved; the summary gives
medians. `aio-pika` is bridge.publisher.AmqpPublisher; `fast` is
bridge.fastpublisher.FastPublisher.

Without --amqp-url (or BRIDGE_TEST_AMQP_URL) it starts a private RabbitMQ on free loopback ports
(bridge.devbroker) and stops it at the end. Not a pytest module (tests/bench is in norecursedirs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Run as a plain script, so the repository root is not on sys.path by itself; run.py (beside
# this file) declares the bench topology.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import aio_pika
from pydantic import SecretStr
from run import bench_queue, declare_topology

from bridge import log
from bridge.config import BrokerConfig
from bridge.devbroker import LocalBroker
from bridge.errors import PublishError
from bridge.events import WebhookEvent, documented_exchanges
from bridge.sender import callback_body, format_timestamp

TENANT = "benchpub"
QUEUE = bench_queue(TENANT)
PUBLISH_TIMEOUT_SECONDS = 30.0
# name -> (module, class)
PUBLISHERS = {
    "aio-pika": ("bridge.publisher", "AmqpPublisher"),
    "fast": ("bridge.fastpublisher", "FastPublisher"),
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tests/bench/bench_publisher.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--publisher",
        default="fast,aio-pika",
        help="comma-separated: fast, aio-pika (default: both)",
    )
    parser.add_argument("--count", type=int, default=20_000, help="messages per measurement")
    parser.add_argument("--in-flight", type=int, default=256, help="concurrent publish() calls")
    parser.add_argument("--warmup", type=int, default=2_000, help="messages before measuring")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per publisher")
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("BRIDGE_TEST_AMQP_URL"),
        help="use this broker instead of starting one (default: $BRIDGE_TEST_AMQP_URL)",
    )
    args = parser.parse_args()
    if min(args.count, args.in_flight, args.repeat) < 1:
        parser.error("--count, --in-flight and --repeat must be at least 1")
    return args


def load_publisher(name: str) -> type[Any] | str:
    """The publisher class, or why it is not available."""
    if name not in PUBLISHERS:
        return f"unknown publisher (choose from {', '.join(PUBLISHERS)})"
    module_name, class_name = PUBLISHERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"not available ({module_name}: {exc})"
    publisher_class = getattr(module, class_name, None)
    if publisher_class is None:
        return f"not available ({module_name} has no {class_name})"
    return publisher_class  # type: ignore[no-any-return]


def make_events(count: int, tag: str) -> list[tuple[WebhookEvent, str]]:
    """(event, exchange) pairs: the three types in turn, bodies as the platform sends them."""
    exchanges = documented_exchanges(TENANT)
    types = list(exchanges)
    now = time.time()
    timestamp = format_timestamp(datetime.now(UTC))
    events = []
    for i in range(count):
        event_type = types[i % 3]
        event_id = f"{tag}-{i:012d}"
        ids = {"cartId": str(uuid.uuid4()), "clientId": f"org:{uuid.uuid4()}"}
        if event_type == "ClientLogged":
            ids = {"clientId": ids["clientId"]}
        elif event_type == "OfferOpened":
            ids = {"offerId": ids["cartId"], "clientId": ids["clientId"]}
        body = callback_body(
            event_type, tenant_key=TENANT, event_id=event_id, timestamp=timestamp, ids=ids
        )
        events.append(
            (WebhookEvent(TENANT, event_type, event_id, body, now), exchanges[event_type])
        )
    return events


async def publish_all(
    publisher: Any, events: list[tuple[WebhookEvent, str]], in_flight: int
) -> int:
    """Publish everything with `in_flight` calls outstanding; the number of failures."""
    pending = iter(events)
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for event, exchange in pending:
            try:
                await publisher.publish(event, exchange, timeout=PUBLISH_TIMEOUT_SECONDS)
            except PublishError:
                failures += 1

    await asyncio.gather(*(worker() for _ in range(min(in_flight, len(events)))))
    return failures


def broker_cpu_seconds(broker: LocalBroker | None) -> float:
    if broker is None:
        return 0.0
    total = 0.0
    for pid in broker.pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


@dataclass
class Measurement:
    publisher: str
    count: int
    failures: int
    cpu_seconds: float
    wall_seconds: float
    broker_cpu_seconds: float
    queued: int

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_seconds * 1e6 / self.count

    @property
    def messages_per_second(self) -> float:
        return self.count / self.wall_seconds

    @property
    def broker_us_per_message(self) -> float:
        return self.broker_cpu_seconds * 1e6 / self.count


async def measure(
    name: str,
    publisher_class: type[Any],
    url: str,
    args: argparse.Namespace,
    broker: LocalBroker | None,
    queue: aio_pika.abc.AbstractQueue,
    round_number: int,
) -> Measurement:
    config = BrokerConfig(url=SecretStr(url))
    publisher = publisher_class(config, exchanges=sorted(documented_exchanges(TENANT).values()))
    await publisher.start()
    try:
        async with asyncio.timeout(30):
            await publisher.wait_connected()
        tag = f"{name}-{round_number}-{uuid.uuid4().hex[:8]}"
        if args.warmup:
            await publish_all(publisher, make_events(args.warmup, tag + "-w"), args.in_flight)
        events = make_events(args.count, tag)
        await queue.purge()
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        broker_before = broker_cpu_seconds(broker)
        failures = await publish_all(publisher, events, args.in_flight)
        wall = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        broker_cpu = broker_cpu_seconds(broker) - broker_before
    finally:
        await publisher.close()
    declared = await queue.declare()
    queued = int(declared.message_count or 0)
    await queue.purge()
    return Measurement(name, args.count, failures, cpu, wall, broker_cpu, queued)


async def run(args: argparse.Namespace, url: str, broker: LocalBroker | None) -> int:
    names = [name.strip() for name in args.publisher.split(",") if name.strip()]
    classes: dict[str, type[Any]] = {}
    for name in names:
        loaded = load_publisher(name)
        if isinstance(loaded, str):
            print(f"{name}: {loaded}")
        else:
            classes[name] = loaded
    if not classes:
        return 2
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await declare_topology(channel, TENANT)
    queue = await channel.get_queue(QUEUE)

    print(
        f"{args.count} persistent messages per measurement, {args.in_flight} publish() calls in"
        f" flight, after {args.warmup} warm-up messages; CPU of this process (all threads)\n"
    )
    print(
        f"{'publisher':<10} {'round':>5} {'CPU us/msg':>10} {'msg/s':>8} {'broker us/msg':>13}"
        f" {'failed':>6} {'queued':>7}"
    )
    results: list[Measurement] = []
    try:
        for round_number in range(1, args.repeat + 1):
            order = list(classes)
            shift = (round_number - 1) % len(order)
            for name in order[shift:] + order[:shift]:
                m = await measure(name, classes[name], url, args, broker, queue, round_number)
                results.append(m)
                print(
                    f"{m.publisher:<10} {round_number:>5} {m.cpu_us_per_message:>10.1f}"
                    f" {m.messages_per_second:>8.0f}"
                    f" {m.broker_us_per_message if broker else float('nan'):>13.1f}"
                    f" {m.failures:>6} {m.queued:>7}"
                )
        await channel.queue_delete(QUEUE)
    finally:
        await connection.close()

    print("\nmedians:")

    def median(name: str, value: Callable[[Measurement], float]) -> float:
        return statistics.median(value(m) for m in results if m.publisher == name)

    for name in classes:
        print(
            f"{name:<10} CPU {median(name, lambda m: m.cpu_us_per_message):6.1f} us/msg"
            f"  {median(name, lambda m: m.messages_per_second):7.0f} msg/s"
            + (
                f"  broker {median(name, lambda m: m.broker_us_per_message):6.1f} us/msg"
                if broker
                else ""
            )
        )
    if "fast" in classes and "aio-pika" in classes:
        ratio = median("fast", lambda m: m.cpu_us_per_message) / median(
            "aio-pika", lambda m: m.cpu_us_per_message
        )
        print(f"fast / aio-pika CPU per message: {ratio:.2f}x")
    bad = [m for m in results if m.failures or m.queued != m.count]
    for m in bad:
        print(f"NOT CLEAN: {m.publisher}: {m.failures} failed, {m.queued} of {m.count} queued")
    return 1 if bad else 0


def main() -> int:
    args = parse_args()
    log.configure("warning", "console")
    if args.amqp_url:
        return asyncio.run(run(args, args.amqp_url, None))
    # SIGTERM like Ctrl-C, so the broker is stopped either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="bench-publisher-") as directory:
        broker = LocalBroker(directory)
        print("starting RabbitMQ ...", file=sys.stderr, flush=True)
        try:
            broker.start()
            return asyncio.run(run(args, broker.url, broker))
        except KeyboardInterrupt:
            return 130
        finally:
            broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
