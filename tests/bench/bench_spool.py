"""Measure the spool: durable appends/s under concurrency, and replay (head + delete) events/s.

Run from the repository root:  python tests/bench/bench_spool.py [--dir /var/lib/one-bridge/bench]

Point --dir at the disk the spool will live on: a tmpfs makes fsync free and the numbers
meaningless. Not a pytest module (tests/bench is in norecursedirs).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a plain script, so the repository root is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bridge.events import WebhookEvent
from bridge.spool import SqliteSpool

UNLIMITED = 1 << 62


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="parent directory for the bench spool")
    parser.add_argument("--seconds", type=float, default=3.0, help="append phase length")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent appenders")
    parser.add_argument("--body-bytes", type=int, default=400, help="size of each event body")
    parser.add_argument("--batch", type=int, default=500, help="replay batch: head(N) + delete")
    return parser.parse_args()


async def append_for(
    spool: SqliteSpool, seconds: float, concurrency: int, body: bytes
) -> tuple[int, list[float]]:
    """Appenders loop until the deadline; returns (appends, per-append latencies in seconds)."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    async def appender(worker: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            event = WebhookEvent("bench", "CartOpened", f"{worker}-{i}", body, time.time())
            started = time.perf_counter()
            await spool.append(f"exchange-{worker % 3}", event)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(appender(worker) for worker in range(concurrency)))
    return len(latencies), latencies


async def replay_all(spool: SqliteSpool, batch: int) -> int:
    """Drain the spool the way the replayer does: read a batch in order, delete it."""
    replayed = 0
    while records := await spool.head(batch):
        await spool.delete([record.seq for record in records])
        replayed += len(records)
    return replayed


def percentile_ms(latencies: list[float], fraction: float) -> float:
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(args: argparse.Namespace) -> None:
    body = b"x" * args.body_bytes
    with tempfile.TemporaryDirectory(prefix="bench-spool-", dir=args.dir) as directory:
        print(f"spool directory: {directory}")
        async with await SqliteSpool.open(
            Path(directory), max_bytes=UNLIMITED, max_events=UNLIMITED
        ) as spool:
            # One appender: every append waits for its own fsync (the latency floor).
            count, latencies = await append_for(spool, 1.0, 1, body)
            print(
                f"append, 1 appender:   {count / 1.0:8.0f} events/s"
                f"  (median {statistics.median(latencies) * 1000:.2f} ms per fsync)"
            )

            commits_before = spool._writer.commits
            started = time.perf_counter()
            count, latencies = await append_for(spool, args.seconds, args.concurrency, body)
            elapsed = time.perf_counter() - started
            commits = spool._writer.commits - commits_before
            print(
                f"append, {args.concurrency} appenders: {count / elapsed:8.0f} events/s"
                f"  ({count} in {elapsed:.2f} s, {commits} commits,"
                f" {count / max(commits, 1):.1f} events per commit,"
                f" p50 {percentile_ms(latencies, 0.5):.2f} ms,"
                f" p99 {percentile_ms(latencies, 0.99):.2f} ms)"
            )

            stats = spool.stats()
            started = time.perf_counter()
            replayed = await replay_all(spool, args.batch)
            elapsed = time.perf_counter() - started
            print(
                f"replay, head({args.batch}) + delete: {replayed / elapsed:8.0f} events/s"
                f"  ({replayed} of {stats.events} in {elapsed:.2f} s)"
            )


def main() -> None:
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()
