"""End-to-end benchmark: the bridge under wrk, side by side with an aio-pika-per-request baseline.

    python tests/bench/run.py [--duration 10] [--connections 64] [--threads 2] [--runs 3]
                              [--publisher fast,aio-pika] [--write-results]

(`make bench` runs it with --write-results.) One private RabbitMQ (bridge.devbroker) serves the
whole invocation. Each run measures every subject once, in an order rotated per run (run 1:
A B C, run 2: B C A, ...) so drift on the machine does not always favour the same subject:

- `bridge[<publisher>]`: `python -m bridge run` as a subprocess, one per requested publisher
  (BRIDGE_BROKER__PUBLISHER=<publisher>). It logs at `info` (one canonical `webhook.handled`
  JSON line per request, to a file) because that is production behaviour; --bridge-log-level
  changes it. Spool, duplicate window and metrics are on, as in production.
- `baseline`: tests/bench/baseline.py, aiohttp + one aio-pika exchange.publish() per request.

Per subject and run: a fresh tenant, and a fresh durable queue bound to its three exchanges
(declared as the bridge declares them: topic, durable, alternate exchange one-bridge.unrouted);
the subject is started and awaited until ready (for the bridge: /readyz and the broker
connected), warmed up with wrk, then measured with wrk and tests/bench/callbacks.lua (valid
callbacks of the three types, unique eventIds), while /proc gives the subject's CPU time
(utime + stime, all threads) and peak VmRSS (sampled every 100 ms). The subject is stopped with
SIGTERM (so every confirm is in), and the queue is audited: every message is read back and its
message_id counted. A consumer in this process reads the queue during the run, as production
consumers do (--no-consumer: the queue fills and is read afterwards; RabbitMQ then pages the
growing queue, and its pauses set the latency tail).

  lost  = 2xx answers (warm-up + measured) - distinct eventIds queued   (must be 0)
  dup   = messages queued - distinct eventIds queued                    (must be 0)
  extra = distinct eventIds queued - 2xx answers: published, but wrk saw no 2xx, normally the
          requests in flight when a wrk run ended (at most --connections per wrk run)

Not a pytest module (tests/bench is in norecursedirs). Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Run as a plain script, so the repository root is not on sys.path by itself.
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import aiohttp  # noqa: E402

from bridge.config import BrokerConfig, Config  # noqa: E402
from bridge.devbroker import LocalBroker, free_ports  # noqa: E402
from bridge.events import UNROUTED_EXCHANGE, documented_exchanges  # noqa: E402

HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "callbacks.lua"
BASELINE_SCRIPT = HERE / "baseline.py"
RESULTS_PATH = HERE / "RESULTS.md"
HOST = "127.0.0.1"
USER = "bench"
# The bridge's only publisher before broker.publisher exists.
CURRENT_PUBLISHER = "aio-pika"
BASELINE = "baseline"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0
DRAIN_TIMEOUT_SECONDS = 120.0
RSS_SAMPLE_SECONDS = 0.1
WRK_TIMEOUT = "10s"
# A measurement during which other processes used more of the machine is flagged.
DISTURBED_FRACTION = 0.05

# Every process we start, by pid (each leads its own process group): killed on any exit.
_children: set[int] = set()


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A subject or a tool failed; the message says which and how, `summary` in one line."""

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]


# -- options and subjects -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tests/bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds before each run")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of every subject")
    parser.add_argument(
        "--publisher",
        default="fast,aio-pika",
        help="comma-separated bridge publishers to measure (broker.publisher values)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the aio-pika-per-request baseline"
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        help="the bridge's event_loop setting (default: the bridge's own default)",
    )
    parser.add_argument(
        "--baseline-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the baseline's event loop (default asyncio's own: the stock setup)",
    )
    parser.add_argument(
        "--bridge-log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="the bridge's log level (default info: one line per request, as in production)",
    )
    parser.add_argument(
        "--write-results", action="store_true", help=f"append the report to {RESULTS_PATH.name}"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each measurement, wait up to this many seconds for the machine to be"
        f" quiet (under {DISTURBED_FRACTION * 100:.0f}%% busy); 0: do not wait (default 60)",
    )
    parser.add_argument(
        "--no-consumer",
        action="store_true",
        help="let the bench queue fill during the run and read it afterwards (by default a"
        " consumer reads it during the run, as in production)",
    )
    parser.add_argument("--keep-dir", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    for name in ("duration", "connections", "threads", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads (wrk needs one per thread)")
    return args


@dataclass(frozen=True)
class Subject:
    name: str
    publisher: str | None  # None: the baseline
    # The BRIDGE_BROKER__PUBLISHER value; None: the variable is not set.
    publisher_env: str | None = None


def publisher_choices() -> tuple[str, ...] | None:
    """The values broker.publisher accepts; None while the bridge has no such setting."""
    field_info = BrokerConfig.model_fields.get("publisher")
    if field_info is None:
        return None
    values = typing.get_args(field_info.annotation)
    return tuple(str(value) for value in values) if values else ()


def bridge_event_loop(args: argparse.Namespace) -> tuple[str | None, str]:
    """(BRIDGE_EVENT_LOOP value or None, the loop the bridge will run on, described)."""
    field_info = Config.model_fields.get("event_loop")
    if field_info is None:
        if args.event_loop not in (None, "asyncio"):
            log(f"--event-loop {args.event_loop} ignored: the bridge has no event_loop setting")
        return None, "asyncio (the bridge has no event_loop setting)"
    chosen = args.event_loop or str(field_info.default)
    if chosen == "auto":
        effective = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        return args.event_loop, f"{effective} (event_loop = auto)"
    return args.event_loop, f"{chosen} (event_loop = {chosen})"


def pick_subjects(args: argparse.Namespace) -> tuple[list[Subject], dict[str, str]]:
    """The subjects to measure, and the requested publishers that cannot run, with why."""
    choices = publisher_choices()
    subjects: list[Subject] = []
    skipped: dict[str, str] = {}
    for publisher in (p.strip() for p in args.publisher.split(",")):
        if not publisher:
            continue
        name = f"bridge[{publisher}]"
        if choices is None:
            if publisher == CURRENT_PUBLISHER:
                subjects.append(Subject(name, publisher))
            else:
                skipped[name] = (
                    "not available: broker.publisher is not a setting yet"
                    f" (the bridge has only the {CURRENT_PUBLISHER} publisher)"
                )
        elif choices and publisher not in choices:
            skipped[name] = f"not available: broker.publisher accepts {', '.join(choices)}"
        else:
            subjects.append(Subject(name, publisher, publisher_env=publisher))
    if not args.no_baseline:
        subjects.append(Subject(BASELINE, None))
    return subjects, skipped


# -- /proc -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds_of(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- processes -------------------------------------------------------------------------------------


async def spawn(command: Sequence[str], *, env: dict[str, str], cwd: Path, log_path: Path) -> Any:
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # a terminal Ctrl-C reaches us only; we stop it
        )
    _children.add(process.pid)
    return process


async def stop(process: Any, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
    """SIGTERM, wait, then SIGKILL; the exit code (negative: killed by that signal)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            log(f"pid {process.pid} ignored SIGTERM for {timeout:.0f} s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # anything it left in its group
    _children.discard(process.pid)
    return int(process.returncode)


def kill_children() -> None:
    for pid in list(_children):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        _children.discard(pid)


def leftover_processes(broker: LocalBroker) -> list[str]:
    """Our live child processes and the broker's, as `pid command` strings."""
    me = os.getpid()
    found = []
    broker_pids = set(broker.pids())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and (int(fields[1]) == me or int(entry.name) in broker_pids):
            found.append(f"{entry.name} {cmdline}")
    return found


def failure_hint(path: Path) -> str:
    """The last error the subject logged, in one line (JSON log lines), else its last line."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    for line in reversed(lines):
        with contextlib.suppress(ValueError, AttributeError):
            record = json.loads(line)
            if record.get("level") in ("error", "critical"):
                event = str(record.get("event", "")).splitlines()[0]
                exception = str(record.get("exception", "")).strip().splitlines()
                return f"{event}: {exception[-1]}" if exception else event
    return next((line.strip() for line in reversed(lines) if line.strip()), "(no output)")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


# -- wrk -------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    ok: int
    non2xx: int
    statuses: dict[str, int]
    duration_seconds: float
    body_bytes_mean: float
    socket_errors: dict[str, int]
    latency_us: dict[str, float]
    cpu_seconds: float  # wrk's own CPU time


async def run_wrk(
    args: argparse.Namespace, url: str, tenant: str, password: str, seconds: int, log_path: Path
) -> WrkResult:
    tag = secrets.token_hex(4)  # unique eventIds per wrk invocation
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        tenant,
        USER,
        password,
        tag,
    ]
    cpu_before = children_cpu_seconds()
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _children.add(process.pid)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), seconds + 60)
    finally:
        await stop(process, timeout=5)
    cpu = children_cpu_seconds() - cpu_before
    text = output.decode(errors="replace")
    with log_path.open("a") as log_file:
        log_file.write(f"$ {shlex.join(command[:-3])} <user> <password> {tag}\n{text}\n")
    match = re.search(r"^BENCH_JSON (\{.*\})$", text, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({process.returncode}):\n{text[-2000:]}")
    data = json.loads(match.group(1))
    return WrkResult(
        requests=data["requests"],
        ok=data["ok"],
        non2xx=data["non2xx"],
        statuses=data["statuses"],
        duration_seconds=data["duration_us"] / 1e6,
        body_bytes_mean=data["body_bytes_mean"],
        socket_errors={k: v for k, v in data["errors"].items() if k != "status"},
        latency_us=data["latency_us"],
        cpu_seconds=cpu,
    )


# -- RabbitMQ topology and audit -------------------------------------------------------------------


def bench_queue(tenant: str) -> str:
    return f"bench.{tenant}"


async def declare_topology(channel: aio_pika.abc.AbstractChannel, tenant: str) -> None:
    """The tenant's exchanges as the bridge declares them, and a queue bound to all three."""
    await channel.declare_exchange(UNROUTED_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    unrouted = await channel.declare_queue(UNROUTED_EXCHANGE, durable=True)
    await unrouted.bind(UNROUTED_EXCHANGE, routing_key="#")
    queue = await channel.declare_queue(bench_queue(tenant), durable=True)
    for exchange_name in documented_exchanges(tenant).values():
        await channel.declare_exchange(
            exchange_name,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": UNROUTED_EXCHANGE},
        )
        await queue.bind(exchange_name, routing_key="#")


async def message_count(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> int:
    queue = await channel.declare_queue(queue_name, passive=True)
    result = queue.declaration_result.message_count
    return int(result or 0)


@dataclass
class Audit:
    queued: int
    distinct: int
    unrouted: int


class QueueConsumer:
    """Reads the bench queue while the subject runs, as the backend teams' consumers do: a queue
    that only grows makes RabbitMQ page messages to disk, and its pauses would dominate the
    latency tail of whichever subject publishes fastest. `finish()` reads the rest."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, tenant: str) -> None:
        self._connection = connection
        self._name = bench_queue(tenant)
        self.messages = 0
        self.ids: set[str | None] = set()

    async def start(self) -> None:
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=2000)
        self._queue = await self._channel.declare_queue(self._name, passive=True)
        self._consumer_tag = await self._queue.consume(self._received, no_ack=True)

    async def _received(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.messages += 1
        self.ids.add(message.message_id)

    async def finish(self, unrouted_before: int) -> Audit:
        """Once the subject has stopped: read until the queue is empty and nothing more comes."""
        async with asyncio.timeout(120):
            while True:
                seen = self.messages
                await asyncio.sleep(0.2)  # a poll of the queue, not a synchronisation
                if self.messages == seen and await message_count(self._channel, self._name) == 0:
                    break
        unrouted = await message_count(self._channel, UNROUTED_EXCHANGE) - unrouted_before
        await self._queue.cancel(self._consumer_tag)
        await self._channel.queue_delete(self._name)
        await self._channel.close()
        return Audit(queued=self.messages, distinct=len(self.ids), unrouted=unrouted)


async def audit_queue(
    connection: aio_pika.abc.AbstractConnection, tenant: str, unrouted_before: int
) -> Audit:
    """Read every message back (no ack), count distinct message_ids; then delete the queue."""
    channel = await connection.channel()
    name = bench_queue(tenant)
    queued = await message_count(channel, name)
    unrouted = await message_count(channel, UNROUTED_EXCHANGE) - unrouted_before
    ids: set[str | None] = set()
    if queued:
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(name, passive=True)
        seen = 0
        async with asyncio.timeout(120), queue.iterator() as messages:
            async for message in messages:
                ids.add(message.message_id)
                seen += 1
                if seen % 1000 == 0 or seen == queued:
                    await message.ack(multiple=True)
                if seen >= queued:
                    break
    await channel.queue_delete(name)
    await channel.close()
    return Audit(queued=queued, distinct=len(ids), unrouted=unrouted)


# -- one measurement -------------------------------------------------------------------------------


@dataclass
class Result:
    run: int
    subject: str
    tenant: str
    warmup: WrkResult
    load: WrkResult
    cpu_seconds: float
    rss_max_bytes: int
    rss_end_bytes: int
    broker_cpu_seconds: float
    host_busy_fraction: float
    # CPU used by processes that are not part of the measurement, as a share of the machine.
    other_cpu_fraction: float
    audit: Audit
    exit_code: int
    outcomes: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.load.ok / self.load.duration_seconds

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds * 1e6 / max(self.load.requests, 1)

    @property
    def broker_cpu_us_per_request(self) -> float:
        return self.broker_cpu_seconds * 1e6 / max(self.load.requests, 1)

    @property
    def wrk_cpu_us_per_request(self) -> float:
        return self.load.cpu_seconds * 1e6 / max(self.load.requests, 1)

    @property
    def ok_total(self) -> int:
        return self.warmup.ok + self.load.ok

    @property
    def lost(self) -> int:
        return max(0, self.ok_total - self.audit.distinct)

    @property
    def extra(self) -> int:
        return max(0, self.audit.distinct - self.ok_total)

    @property
    def duplicates(self) -> int:
        return self.audit.queued - self.audit.distinct

    @property
    def non2xx(self) -> int:
        return self.warmup.non2xx + self.load.non2xx

    @property
    def socket_errors(self) -> int:
        return sum(self.warmup.socket_errors.values()) + sum(self.load.socket_errors.values())

    @property
    def is_clean(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.exit_code == 0


def parse_metrics(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    samples = []
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        samples.append((labels, float(match.group(2))))
    return samples


class Harness:
    def __init__(
        self, args: argparse.Namespace, broker: LocalBroker, work_dir: Path, code_dir: Path
    ) -> None:
        self.args = args
        self.broker = broker
        self.work_dir = work_dir
        self.code_dir = code_dir
        self.password = secrets.token_urlsafe(16)
        # Subject name -> why it failed (it is not measured again).
        self.failures: dict[str, str] = {}
        self.base_env = {
            key: value
            for key, value in os.environ.items()
            # Nothing from the caller's bridge config or service manager leaks in.
            if not key.startswith(("BRIDGE_", "BENCH_BASELINE_")) and key != "NOTIFY_SOCKET"
        }

    def subject_command(
        self, subject: Subject, tenant: str, port: int, ops_port: int
    ) -> tuple[list[str], dict[str, str], str, str | None]:
        """(command, env, readiness URL, ops URL or None) for a subject."""
        env = dict(self.base_env)
        if subject.publisher is None:
            command = [
                sys.executable,
                str(BASELINE_SCRIPT),
                "--host",
                HOST,
                "--port",
                str(port),
                "--amqp-url",
                self.broker.url,
                "--tenant",
                tenant,
                "--user",
                USER,
                "--loop",
                self.args.baseline_loop,
            ]
            env["BENCH_BASELINE_PASSWORD"] = self.password
            return command, env, f"http://{HOST}:{port}/readyz", None
        key = tenant.upper()
        env.update(
            {
                "BRIDGE_BROKER__URL": self.broker.url,
                "BRIDGE_RECEIVER__HOST": HOST,
                "BRIDGE_RECEIVER__PORT": str(port),
                "BRIDGE_OPS__HOST": HOST,
                "BRIDGE_OPS__PORT": str(ops_port),
                "BRIDGE_SPOOL__DIR": str(self.work_dir / f"spool-{tenant}"),
                "BRIDGE_LOG__LEVEL": self.args.bridge_log_level,
                "BRIDGE_LOG__FORMAT": "json",
                f"BRIDGE_TENANTS__{key}__USERNAME": USER,
                f"BRIDGE_TENANTS__{key}__PASSWORDS": json.dumps([self.password]),
            }
        )
        if subject.publisher_env is not None:
            env["BRIDGE_BROKER__PUBLISHER"] = subject.publisher_env
        event_loop, _ = bridge_event_loop(self.args)
        if event_loop is not None:
            env["BRIDGE_EVENT_LOOP"] = event_loop
        ops = f"http://{HOST}:{ops_port}"
        # The snapshot of bridge/ first on sys.path (`-m` puts the cwd, the snapshot, first).
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.code_dir), *filter(None, [env.get("PYTHONPATH")])]
        )
        return [sys.executable, "-m", "bridge", "run"], env, f"{ops}/readyz", ops

    async def wait_ready(
        self, session: aiohttp.ClientSession, process: Any, ready_url: str, ops: str | None
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise BenchError(f"exited with {process.returncode} during start")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(ready_url) as response:
                    ready = response.status == 200
                if ready and ops is not None:
                    # Ready may mean "the spool takes events": wait for the broker itself.
                    async with session.get(f"{ops}/metrics") as response:
                        text = await response.text()
                    ready = any(
                        v == 1 for _, v in parse_metrics(text, "onebridge_broker_connected")
                    )
                if ready:
                    return
            await asyncio.sleep(0.05)
        raise BenchError(f"not ready within {START_TIMEOUT_SECONDS:.0f} s")

    async def bridge_outcomes(self, session: aiohttp.ClientSession, ops: str) -> dict[str, float]:
        """Requests by outcome so far; waits until the spool is empty (spooled events replayed)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
        while True:
            async with session.get(f"{ops}/metrics") as response:
                text = await response.text()
            spooled = sum(v for _, v in parse_metrics(text, "onebridge_spool_events"))
            if spooled == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        outcomes: dict[str, float] = {}
        for labels, value in parse_metrics(text, "onebridge_webhook_requests_total"):
            outcome = labels.get("outcome", "?")
            outcomes[outcome] = outcomes.get(outcome, 0) + value
        if spooled:
            outcomes["still_spooled"] = spooled
        return outcomes

    async def wait_quiet(self) -> None:
        """Wait (bounded) until other processes leave the machine alone for a second."""
        deadline = time.monotonic() + self.args.quiet_wait
        announced = False
        while time.monotonic() < deadline:
            busy_before, total_before = host_cpu()
            await asyncio.sleep(1.0)
            busy_after, total_after = host_cpu()
            busy = (busy_after - busy_before) / max(total_after - total_before, 1)
            if busy <= DISTURBED_FRACTION:
                return
            if not announced:
                log(f"machine {busy:.0%} busy; waiting up to {self.args.quiet_wait:.0f} s")
                announced = True
        if announced:
            log("still busy; measuring anyway (the run will be flagged if disturbed)")

    async def measure(
        self, subject: Subject, run: int, connection: aio_pika.abc.AbstractConnection
    ) -> Result:
        await self.wait_quiet()
        tenant = f"bench{run}{secrets.token_hex(3)}"
        admin = await connection.channel()
        await declare_topology(admin, tenant)
        unrouted_before = await message_count(admin, UNROUTED_EXCHANGE)
        await admin.close()

        port, ops_port = free_ports(2)
        command, env, ready_url, ops = self.subject_command(subject, tenant, port, ops_port)
        log_path = self.work_dir / f"run{run}-{subject.name.replace('[', '-').strip(']')}.log"
        url = f"http://{HOST}:{port}/one/{tenant}/events"
        cwd = ROOT if subject.publisher is None else self.code_dir
        process = await spawn(command, env=env, cwd=cwd, log_path=log_path)
        outcomes: dict[str, float] = {}
        consumer = None if self.args.no_consumer else QueueConsumer(connection, tenant)
        if consumer is not None:
            await consumer.start()
        try:
            async with aiohttp.ClientSession() as session:
                try:
                    await self.wait_ready(session, process, ready_url, ops)
                except BenchError as exc:
                    raise BenchError(
                        f"{exc}; log:\n{tail(log_path)}", f"{exc}: {failure_hint(log_path)}"
                    ) from None
                wrk_log = self.work_dir / f"wrk-run{run}.log"
                warmup = await run_wrk(
                    self.args, url, tenant, self.password, self.args.warmup, wrk_log
                )

                pid = process.pid
                broker_pids = self.broker.pids()
                rss_max = rss_bytes(pid)
                stop_sampling = asyncio.Event()

                async def sample_rss() -> None:
                    nonlocal rss_max
                    while not stop_sampling.is_set():
                        with contextlib.suppress(OSError):
                            rss_max = max(rss_max, rss_bytes(pid))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop_sampling.wait(), RSS_SAMPLE_SECONDS)

                sampler = asyncio.create_task(sample_rss())
                cpu_before = cpu_seconds(pid)
                broker_before = cpu_seconds_of(broker_pids)
                host_before = host_cpu()
                self_before, wall_before = time.process_time(), time.monotonic()
                try:
                    load = await run_wrk(
                        self.args, url, tenant, self.password, self.args.duration, wrk_log
                    )
                finally:
                    cpu_after = cpu_seconds(pid)
                    broker_after = cpu_seconds_of(broker_pids)
                    host_after = host_cpu()
                    self_cpu = time.process_time() - self_before
                    wall = time.monotonic() - wall_before
                    stop_sampling.set()
                    await sampler
                rss_end = rss_bytes(pid)
                rss_max = max(rss_max, rss_end)
                if ops is not None:
                    outcomes = await self.bridge_outcomes(session, ops)
        finally:
            exit_code = await stop(process)
        if exit_code != 0:
            log(f"{subject.name} exited with {exit_code} after SIGTERM; log:\n{tail(log_path)}")
        if consumer is not None:
            audit = await consumer.finish(unrouted_before)
        else:
            audit = await audit_queue(connection, tenant, unrouted_before)
        busy = (host_after[0] - host_before[0]) / max(host_after[1] - host_before[1], 1)
        # Whatever else ran meanwhile (another test suite, a build) skews every number here.
        ours = (
            (cpu_after - cpu_before) + (broker_after - broker_before) + load.cpu_seconds + self_cpu
        )
        other = (host_after[0] - host_before[0]) / CLOCK_TICKS - ours
        other_fraction = max(0.0, other) / (wall * len(os.sched_getaffinity(0)))
        return Result(
            run=run,
            subject=subject.name,
            tenant=tenant,
            warmup=warmup,
            load=load,
            cpu_seconds=cpu_after - cpu_before,
            rss_max_bytes=rss_max,
            rss_end_bytes=rss_end,
            broker_cpu_seconds=broker_after - broker_before,
            host_busy_fraction=busy,
            other_cpu_fraction=other_fraction,
            audit=audit,
            exit_code=exit_code,
            outcomes=outcomes,
        )

    async def run_all(self, subjects: list[Subject]) -> list[Result]:
        """Every run of every subject; a subject that fails is reported and not run again."""
        results: list[Result] = []
        connection = await aio_pika.connect(
            self.broker.url, client_properties={"connection_name": "one-bridge-bench"}
        )
        try:
            for run in range(1, self.args.runs + 1):
                shift = (run - 1) % len(subjects)
                for subject in subjects[shift:] + subjects[:shift]:
                    if subject.name in self.failures:
                        continue
                    log(f"run {run}/{self.args.runs}: {subject.name} ...")
                    try:
                        result = await self.measure(subject, run, connection)
                    except BenchError as exc:
                        log(f"{subject.name} failed in run {run}: {exc}")
                        self.failures[subject.name] = f"run {run}: {exc.summary}"
                        continue
                    results.append(result)
                    print(table([result], header=len(results) == 1))
                    sys.stdout.flush()
        finally:
            await connection.close()
        return results


# -- report ----------------------------------------------------------------------------------------

_RUN_COLUMNS = (
    "run | subject | req/s (2xx) | p50 ms | p90 ms | p99 ms | max ms | CPU us/req | RSS max MiB"
    " | 2xx incl. warm-up | non-2xx | sock err | queued | lost | dup | extra | unrouted"
    " | broker CPU us/req | wrk CPU us/req | host busy | other load"
)


def _ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.2f}"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f}"


def table(results: list[Result], *, header: bool = True) -> str:
    lines = []
    if header:
        lines.append(f"| {_RUN_COLUMNS} |")
        lines.append("|" + "---|" * (_RUN_COLUMNS.count("|") + 1))
    for r in results:
        latency = r.load.latency_us
        cells = [
            str(r.run),
            r.subject,
            f"{r.rps:.0f}",
            _ms(latency["p50"]),
            _ms(latency["p90"]),
            _ms(latency["p99"]),
            _ms(latency["max"]),
            f"{r.cpu_us_per_request:.0f}",
            _mib(r.rss_max_bytes),
            str(r.ok_total),
            str(r.non2xx),
            str(r.socket_errors),
            str(r.audit.queued),
            f"**{r.lost}**" if r.lost else "0",
            f"**{r.duplicates}**" if r.duplicates else "0",
            str(r.extra),
            str(r.audit.unrouted),
            f"{r.broker_cpu_us_per_request:.0f}",
            f"{r.wrk_cpu_us_per_request:.0f}",
            f"{r.host_busy_fraction:.0%}",
            f"{r.other_cpu_fraction:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Summary:
    subject: str
    runs: int
    rps: float
    p50_us: float
    p99_us: float
    cpu_us: float
    rss_max_bytes: float
    broker_cpu_us: float
    lost: int
    duplicates: int


def summarize(results: list[Result], subjects: list[Subject]) -> list[Summary]:
    summaries = []
    for subject in subjects:
        mine = [r for r in results if r.subject == subject.name]
        if not mine:
            continue

        def median(value: Callable[[Result], float], rows: list[Result] = mine) -> float:
            return statistics.median(value(r) for r in rows)

        summaries.append(
            Summary(
                subject=subject.name,
                runs=len(mine),
                rps=median(lambda r: r.rps),
                p50_us=median(lambda r: r.load.latency_us["p50"]),
                p99_us=median(lambda r: r.load.latency_us["p99"]),
                cpu_us=median(lambda r: r.cpu_us_per_request),
                rss_max_bytes=median(lambda r: r.rss_max_bytes),
                broker_cpu_us=median(lambda r: r.broker_cpu_us_per_request),
                lost=sum(r.lost for r in mine),
                duplicates=sum(r.duplicates for r in mine),
            )
        )
    return summaries


def summary_table(summaries: list[Summary]) -> str:
    baseline = next((s for s in summaries if s.subject == BASELINE), None)
    columns = (
        "subject | runs | req/s | p50 ms | p99 ms | CPU us/req | RSS max MiB | broker CPU us/req"
        " | lost | dup | req/s vs baseline | CPU/req vs baseline | p99 vs baseline"
    )
    lines = [f"| {columns} |", "|" + "---|" * (columns.count("|") + 1)]
    for s in summaries:
        if baseline is not None and s is not baseline:
            ratios = [
                f"**{s.rps / baseline.rps:.2f}x**",
                f"**{s.cpu_us / baseline.cpu_us:.2f}x**",
                f"{s.p99_us / baseline.p99_us:.2f}x",
            ]
        else:
            ratios = ["1", "1", "1"] if s is baseline else ["-", "-", "-"]
        cells = [
            s.subject,
            str(s.runs),
            f"{s.rps:.0f}",
            _ms(s.p50_us),
            _ms(s.p99_us),
            f"{s.cpu_us:.0f}",
            _mib(int(s.rss_max_bytes)),
            f"{s.broker_cpu_us:.0f}",
            str(s.lost),
            str(s.duplicates),
            *ratios,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _command_output(command: list[str]) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (
        (result.stdout or result.stderr).strip().splitlines()[0]
        if result.stdout or result.stderr
        else "?"
    )


def machine() -> dict[str, str]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    versions = {}
    for package in ("aiohttp", "aio-pika", "aiormq", "orjson"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "uname": " ".join(platform.uname()),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu_model,
        "memory": memory,
        "python": platform.python_version(),
        "wrk": _command_output(["wrk", "-v"]).split(" [")[0],
        "rabbitmq": _command_output(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"]),
        "erlang": _command_output(["dpkg-query", "-W", "-f=${Version}", "erlang-base"]),
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def snapshot_code(work_dir: Path) -> tuple[Path, str]:
    """Copy bridge/ so every run measures the same code, even while the tree is being edited.

    Returns the directory to put first on the bridge's sys.path and a digest of the sources.
    """
    code_dir = work_dir / "code"
    shutil.copytree(
        ROOT / "bridge", code_dir / "bridge", ignore=shutil.ignore_patterns("__pycache__")
    )
    digest = hashlib.sha256()
    for path in sorted((code_dir / "bridge").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(code_dir)).encode() + b"\0" + path.read_bytes())
    return code_dir, digest.hexdigest()[:12]


def git_revision() -> str:
    revision = _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    return f"{revision} + uncommitted changes" if dirty else revision


def exact_command() -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(ROOT)
    command = shlex.join([str(python), *sys.argv])
    via_make = " (via `make bench`)" if os.environ.get("MAKELEVEL") else ""
    return f"`{command}`{via_make}, from the repository root"


_RESULTS_HEADER = """\
# Benchmark results

Appended by `make bench` (`tests/bench/run.py --write-results`), newest at the end. Each
section is one invocation: the same private RabbitMQ for all runs, the subjects interleaved
(order rotated per run), wrk and tests/bench/callbacks.lua driving them from the same machine.

How to read the columns:

- **req/s**: 2xx answers per second of the measured wrk run; **p50/p90/p99/max**: wrk's latency.
- **CPU us/req**: the subject's utime + stime (all threads, /proc/<pid>/stat) during the measured
  run, divided by the requests wrk completed. **broker CPU** and **wrk CPU** are the same for
  RabbitMQ and for wrk; on a small machine all three compete for the cores (**host busy**).
  **other load**: CPU used meanwhile by processes outside the measurement, as a share of the
  machine (from /proc/stat); above a few percent the run was disturbed and its numbers are not
  comparable with a quiet run.
- **RSS max**: peak VmRSS of the subject, sampled every 100 ms under load.
- **lost** = 2xx answers - distinct eventIds read back from the queue (must be 0); **dup** =
  messages - distinct eventIds (must be 0); **extra** = published but no 2xx seen by wrk
  (requests in flight when a wrk run stopped, at most -c per wrk run); **unrouted** = messages
  that reached one-bridge.unrouted instead (must be 0).
- **vs baseline**: the bridge's median over the baseline's median (req/s: higher is better;
  CPU/req and p99: lower is better). The baseline is tests/bench/baseline.py: aiohttp and one
  aio-pika `exchange.publish()` per request, without spool, duplicate window, metrics or logs.
"""


def report(
    args: argparse.Namespace,
    results: list[Result],
    subjects: list[Subject],
    skipped: dict[str, str],
    failures: dict[str, str],
    started: datetime,
    code_digest: str,
) -> str:
    info = machine()
    summaries = summarize(results, subjects)
    bodies = [r.load.body_bytes_mean for r in results]
    lines = [
        f"## {started:%Y-%m-%d %H:%M} UTC · {git_revision()}",
        "",
        f"- command: {exact_command()}",
        f"- code: bridge/ as of the start (sha256 of its sources {code_digest}), run from a copy",
        f"- machine: `{info['uname']}`; {info['nproc']} CPUs ({info['cpu']}), {info['memory']}",
        f"- software: Python {info['python']}, {info['wrk']}, RabbitMQ {info['rabbitmq']}"
        f" (Erlang {info['erlang']}), {info['libraries']}",
        f"- load: `wrk -t{args.threads} -c{args.connections} -d{args.duration}s` after a"
        f" {args.warmup} s warm-up, per subject and run; callbacks of the three types in turn,"
        f" {statistics.mean(bodies) if bodies else 0:.0f}-byte bodies on average, unique"
        " eventIds, persistent messages, publisher confirms, one classic durable queue bound"
        " to the three exchanges, "
        + (
            "read after the run (--no-consumer)"
            if args.no_consumer
            else "read by a consumer during the run"
        ),
        f"- bridge: event loop {bridge_event_loop(args)[1]}; log level"
        f" `{args.bridge_log_level}` (JSON lines to a file); spool, duplicate window and metrics"
        " on (production defaults)",
        *([] if args.no_baseline else [f"- baseline: event loop {args.baseline_loop}"]),
        f"- runs: {args.runs}, interleaved; subjects: {', '.join(s.name for s in subjects)}",
    ]
    for name, reason in skipped.items():
        lines.append(f"- skipped: {name}: {reason}")
    for name, reason in failures.items():
        lines.append(f"- **failed**: {name}: {reason}")
    lines += ["", "Per run:", "", table(results), "", "Medians:", "", summary_table(summaries)]
    outcomes = [
        f"{r.subject} run {r.run}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.outcomes.items() if v)
        for r in results
        if r.outcomes
    ]
    if outcomes:
        lines += ["", "Bridge outcomes (its own metrics, warm-up included): " + "; ".join(outcomes)]
    disturbed = [r for r in results if r.other_cpu_fraction > DISTURBED_FRACTION]
    if disturbed:
        lines += [
            "",
            f"**Disturbed:** other processes used over {DISTURBED_FRACTION:.0%} of the machine"
            " during "
            + ", ".join(f"{r.subject} run {r.run} ({r.other_cpu_fraction:.0%})" for r in disturbed)
            + "; compare those numbers with care.",
        ]
    unclean = [r for r in results if not r.is_clean]
    if unclean:
        lines += [
            "",
            "**Not clean:** "
            + "; ".join(
                f"{r.subject} run {r.run}: lost {r.lost}, dup {r.duplicates}, exit {r.exit_code}"
                for r in unclean
            ),
        ]
    return "\n".join(lines) + "\n"


def write_results(text: str) -> None:
    existing = RESULTS_PATH.read_text() if RESULTS_PATH.exists() else _RESULTS_HEADER
    RESULTS_PATH.write_text(existing.rstrip("\n") + "\n\n" + text)
    log(f"appended to {RESULTS_PATH.relative_to(ROOT)}")


# -- main ------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        log("wrk is not installed; as root run: apt-get install -y wrk")
        return 2
    subjects, skipped = pick_subjects(args)
    for name, reason in skipped.items():
        log(f"{name}: {reason}")
    if not subjects:
        log("nothing to measure")
        return 2
    started = datetime.now(UTC)
    work_dir = Path(tempfile.mkdtemp(prefix="one-bridge-bench-"))
    code_dir, code_digest = snapshot_code(work_dir)
    broker = LocalBroker(work_dir)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    failed = True
    results: list[Result] = []
    try:
        log(f"starting RabbitMQ (temp dir {work_dir}) ...")
        broker.start()
        log(f"RabbitMQ on {broker.url.rpartition('@')[2]} in {broker.startup_seconds:.1f} s")
        harness = Harness(args, broker, work_dir, code_dir)
        results = asyncio.run(harness.run_all(subjects))
        failed = bool(harness.failures)
    except Interrupted:
        log("interrupted")
        return 130
    except BenchError as exc:
        log(str(exc))
        return 1
    finally:
        kill_children()
        broker.stop()
        leftovers = leftover_processes(broker)
        if leftovers:
            log("left-over processes:\n  " + "\n  ".join(leftovers))
        if failed or args.keep_dir or not all(r.is_clean for r in results):
            log(f"logs kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    text = report(args, results, subjects, skipped, harness.failures, started, code_digest)
    print()
    print(text)
    if args.write_results and results:
        write_results(text)
    return 0 if all(r.is_clean for r in results) and not harness.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
