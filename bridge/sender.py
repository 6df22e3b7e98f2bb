"""Post realistic ONe callbacks to a running bridge's receiver and report the results."""

from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import json
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TENANT = "klient"
DEFAULT_TYPES: tuple[str, ...] = ("CartOpened", "ClientLogged", "OfferOpened")

# The id fields each type carries, in wire order (between tenantKey and eventId).
# CartOpened is documented (the platform's example callback). ClientLogged and OfferOpened bodies
# are NOT documented ("unknown" in one-platform.md): these field sets are our best guess.
ID_FIELDS: Mapping[str, tuple[str, ...]] = {
    "CartOpened": ("cartId", "clientId"),
    "ClientLogged": ("clientId",),  # guess: undocumented
    "OfferOpened": ("offerId", "clientId"),  # guess: undocumented
}
# Types we know nothing about still get a client id, like every known type.
UNKNOWN_TYPE_ID_FIELDS: tuple[str, ...] = ("clientId",)

_RESERVED_FIELDS = frozenset({"type", "tenantKey", "eventId", "timestamp"})

# What the platform's example callback carries (Host and Content-Length come from the client).
ACCEPT = "application/json, application/cbor, application/*+json"
CONTENT_TYPE = "application/json"
# aiohttp adds these by default; the platform's documented request has neither.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept-Encoding")

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


# --- bodies (pure) -------------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """Render a moment as the platform does: UTC, microseconds, `Z`: 2023-02-22T04:32:51.014160Z."""
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def callback_body(
    event_type: str,
    *,
    tenant_key: str,
    event_id: str,
    timestamp: str,
    ids: Mapping[str, str],
) -> bytes:
    """Build a callback body exactly as the platform puts it on the wire.

    Field order: type, tenantKey, the ids in the given order, eventId, timestamp. Jackson-style
    pretty printing: two-space indent, `" : "` separators, no trailing newline.
    """
    clashes = _RESERVED_FIELDS.intersection(ids)
    if clashes:
        raise ValueError(f"ids must not contain reserved fields: {sorted(clashes)}")
    payload: dict[str, str] = {"type": event_type, "tenantKey": tenant_key}
    payload.update(ids)
    payload["eventId"] = event_id
    payload["timestamp"] = timestamp
    # orjson cannot produce `" : "`; the stdlib can, and bodies are small.
    return json.dumps(payload, indent=2, separators=(",", " : "), ensure_ascii=False).encode()


def id_fields(event_type: str) -> tuple[str, ...]:
    """Name the id fields a callback of this type carries."""
    return ID_FIELDS.get(event_type, UNKNOWN_TYPE_ID_FIELDS)


def new_ids(event_type: str) -> dict[str, str]:
    """Fresh uuid4 ids for a type's id fields; client ids carry the platform's `org:` prefix."""
    return {name: _new_id(name) for name in id_fields(event_type)}


def _new_id(name: str) -> str:
    value = str(uuid.uuid4())
    return f"org:{value}" if name == "clientId" else value


def new_callback_body(event_type: str, *, tenant_key: str, now: datetime | None = None) -> bytes:
    """A realistic callback body: fresh eventId and ids, timestamp `now` (default: the clock)."""
    return callback_body(
        event_type,
        tenant_key=tenant_key,
        event_id=str(uuid.uuid4()),
        timestamp=format_timestamp(now or datetime.now(UTC)),
        ids=new_ids(event_type),
    )


# --- options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendOptions:
    """What to send, where, and how fast."""

    url: str = DEFAULT_URL
    tenant: str = DEFAULT_TENANT
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    count: int = 10
    rate: float | None = None
    concurrency: int = 4
    types: tuple[str, ...] = DEFAULT_TYPES
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        problem = _options_problem(self)
        if problem:
            raise ValueError(problem)

    @property
    def events_url(self) -> str:
        """The receiver endpoint: `{url}/one/{tenant}/events`."""
        return f"{self.url.rstrip('/')}/one/{quote(self.tenant, safe='')}/events"


def _options_problem(options: SendOptions) -> str | None:
    checks = (
        (options.count >= 1, "count must be at least 1"),
        (options.concurrency >= 1, "concurrency must be at least 1"),
        (options.rate is None or options.rate > 0, "rate must be greater than 0"),
        (options.timeout_seconds > 0, "timeout_seconds must be greater than 0"),
        (bool(options.types), "types must name at least one event type"),
        (all(options.types), "type names must not be empty"),
        (bool(options.tenant), "tenant must not be empty"),
    )
    return next((message for ok, message in checks if not ok), None)


def request_headers(options: SendOptions) -> dict[str, str]:
    """The headers the platform sends with a callback (Authorization only with a password)."""
    headers = {"Accept": ACCEPT}
    if options.password is not None:
        headers["Authorization"] = basic_authorization(options.user or "", options.password)
    headers["one-tenant"] = options.tenant
    headers["Content-Type"] = CONTENT_TYPE
    return headers


def basic_authorization(user: str, password: str) -> str:
    """`Basic base64(user:password)`, UTF-8 encoded."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


# --- report --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], percent: float) -> float | None:
    """Nearest-rank percentile (`percent` in 0..100); None for no values."""
    if not 0 <= percent <= 100:
        raise ValueError("percent must be between 0 and 100")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class SendReport:
    """Outcome of a send run.

    `by_status` counts every request by HTTP status ("200", "503") or, when no answer came, by
    error kind ("connection_refused", "timeout", ...). `latencies` holds seconds, one per request
    that got an HTTP answer, in completion order.
    """

    accepted: int = 0
    failed: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return self.accepted + self.failed

    @property
    def rate_per_second(self) -> float:
        """Accepted callbacks per second: failures are not throughput."""
        return self.accepted / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float | None:
        return _ms(percentile(self.latencies, 50))

    @property
    def p90_ms(self) -> float | None:
        return _ms(percentile(self.latencies, 90))

    @property
    def p99_ms(self) -> float | None:
        return _ms(percentile(self.latencies, 99))

    @property
    def max_ms(self) -> float | None:
        return _ms(max(self.latencies, default=None))

    def record(self, outcome: str, *, is_accepted: bool, latency_seconds: float | None) -> None:
        """Count one finished request."""
        if is_accepted:
            self.accepted += 1
        else:
            self.failed += 1
        self.by_status[outcome] = self.by_status.get(outcome, 0) + 1
        if latency_seconds is not None:
            self.latencies.append(latency_seconds)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def exit_code(report: SendReport) -> int:
    """0 if every request was accepted (and there was at least one), else 1."""
    return 0 if report.failed == 0 and report.accepted > 0 else 1


def report_as_dict(report: SendReport) -> dict[str, JsonValue]:
    """The report's summary as JSON-ready data (no raw latencies)."""
    return {
        "requests": report.requests,
        "accepted": report.accepted,
        "failed": report.failed,
        "by_status": dict(sorted(report.by_status.items())),
        "elapsed_seconds": round(report.elapsed_seconds, 6),
        "rate_per_second": round(report.rate_per_second, 3),
        "latency_ms": {
            "p50": _round(report.p50_ms),
            "p90": _round(report.p90_ms),
            "p99": _round(report.p99_ms),
            "max": _round(report.max_ms),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def render_report(report: SendReport, *, as_json: bool) -> str:
    """A short table for humans, or one JSON object. Holds counts and timings only, no secrets."""
    if as_json:
        return orjson.dumps(report_as_dict(report)).decode()
    rows = [
        ("requests", str(report.requests)),
        ("accepted", str(report.accepted)),
        ("failed", str(report.failed)),
        ("elapsed", f"{report.elapsed_seconds:.3f} s"),
        ("accepted rate", f"{report.rate_per_second:.1f} /s"),
        ("latency p50", _format_ms(report.p50_ms)),
        ("latency p90", _format_ms(report.p90_ms)),
        ("latency p99", _format_ms(report.p99_ms)),
        ("latency max", _format_ms(report.max_ms)),
    ]
    rows += [(f"status {outcome}", str(n)) for outcome, n in sorted(report.by_status.items())]
    if report.by_status.get("401"):
        rows.append(("hint", "401: check --tenant, --user and --password"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


# --- sending -------------------------------------------------------------------------------------


def error_kind(exc: BaseException) -> str:
    """A short, bounded name for a request that got no HTTP answer."""
    if isinstance(exc, TimeoutError):  # includes aiohttp's ServerTimeoutError
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns_error"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "tls_error"
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return "connection_refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server_disconnected"
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return "connection_error"
    return "client_error"


async def send_callbacks(options: SendOptions) -> SendReport:
    """Send `options.count` callbacks with `options.concurrency` workers; never raises for I/O."""
    report = SendReport()
    headers = request_headers(options)
    loop = asyncio.get_running_loop()
    indexes = iter(range(options.count))  # shared by the workers: each index is sent once
    connector = aiohttp.TCPConnector(limit=options.concurrency)
    timeout = aiohttp.ClientTimeout(total=options.timeout_seconds)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=_SKIP_AUTO_HEADERS
    ) as session:
        started = loop.time()
        async with asyncio.TaskGroup() as group:
            for _ in range(options.concurrency):
                group.create_task(_work(session, options, headers, indexes, started, report))
        report.elapsed_seconds = loop.time() - started
    return report


async def _work(
    session: aiohttp.ClientSession,
    options: SendOptions,
    headers: Mapping[str, str],
    indexes: Iterator[int],
    started: float,
    report: SendReport,
) -> None:
    loop = asyncio.get_running_loop()
    for index in indexes:
        if options.rate is not None:
            # Absolute schedule from the start: a slow request does not push later ones back.
            await _sleep_until(loop, started + index / options.rate)
        event_type = options.types[index % len(options.types)]
        body = new_callback_body(event_type, tenant_key=options.tenant)
        await _post(session, options.events_url, headers, body, report)


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    delay = deadline - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    report: SendReport,
) -> None:
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        report.record(error_kind(exc), is_accepted=False, latency_seconds=None)
        return
    latency = loop.time() - sent_at
    report.record(str(status), is_accepted=200 <= status < 300, latency_seconds=latency)


# --- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `send` command's flags."""
    add = parser.add_argument
    add("--url", default=DEFAULT_URL, help=f"receiver base URL (default {DEFAULT_URL})")
    add("--tenant", default=DEFAULT_TENANT, help=f"tenant key (default {DEFAULT_TENANT})")
    add("--user", help="Basic auth user name (needs --password or --password-file)")
    add("--password", help="Basic auth password (prefer --password-file: argv is visible)")
    add("--password-file", help="file holding the Basic auth password (one trailing newline ok)")
    add("--count", type=int, default=10, help="callbacks to send (default 10)")
    add("--rate", type=float, help="target requests per second overall (default: unpaced)")
    add("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    add(
        "--types",
        default=",".join(DEFAULT_TYPES),
        help="comma-separated event types, sent round-robin; unknown names are sent as is"
        f" (default {','.join(DEFAULT_TYPES)})",
    )
    add("--timeout", type=float, default=10.0, help="per-request timeout in seconds (default 10)")
    add("--json", action="store_true", help="print the report as one JSON object")


def options_from_args(args: argparse.Namespace) -> SendOptions:
    """Turn parsed flags into SendOptions; ValueError names the offending flag."""
    _check_flags(args)
    password = _password_from_args(args)
    if password is not None and not args.user:
        raise ValueError("--user is required with --password or --password-file")
    if args.user and password is None:
        raise ValueError("--user needs --password or --password-file")
    return SendOptions(
        url=args.url,
        tenant=args.tenant,
        user=args.user,
        password=password,
        count=args.count,
        rate=args.rate,
        concurrency=args.concurrency,
        types=parse_types(args.types),
        timeout_seconds=args.timeout,
    )


def _check_flags(args: argparse.Namespace) -> None:
    checks = (
        (args.count >= 1, "--count must be at least 1"),
        (args.concurrency >= 1, "--concurrency must be at least 1"),
        (args.rate is None or args.rate > 0, "--rate must be greater than 0"),
        (args.timeout > 0, "--timeout must be greater than 0"),
        (bool(args.tenant), "--tenant must not be empty"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    _check_url(args.url)


def _check_url(url: str) -> None:
    # The URL itself is never echoed: it might carry credentials.
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("--url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("--url must not contain credentials; use --user and --password-file")


def _password_from_args(args: argparse.Namespace) -> str | None:
    if args.password is not None and args.password_file is not None:
        raise ValueError("--password and --password-file are mutually exclusive")
    if args.password_file is None:
        password: str | None = args.password
        return password
    return read_password_file(Path(args.password_file))


def read_password_file(path: Path) -> str:
    """Read a password file, dropping one trailing newline; ValueError names --password-file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        # `from None`: a UnicodeDecodeError carries the file's bytes, i.e. the password.
        raise ValueError(f"--password-file: cannot read {path}: {reason}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"--password-file: {path} is empty")
    return password


def parse_types(value: str) -> tuple[str, ...]:
    """Split `--types` on commas; every name must be non-empty."""
    names = tuple(name.strip() for name in value.split(","))
    if not all(names):
        raise ValueError("--types must be a comma-separated list of non-empty type names")
    return names


__all__ = [
    "DEFAULT_TYPES",
    "SendOptions",
    "SendReport",
    "add_arguments",
    "callback_body",
    "exit_code",
    "format_timestamp",
    "new_callback_body",
    "new_ids",
    "options_from_args",
    "parse_types",
    "percentile",
    "render_report",
    "send_callbacks",
]
