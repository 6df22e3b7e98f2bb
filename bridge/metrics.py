"""Every Prometheus collector of the bridge, on an injected registry (no global state)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from bridge import __version__
from bridge.errors import PUBLISH_FAILURES, RejectedEvent
from bridge.events import KNOWN_EVENT_TYPES, UNKNOWN_TYPE_LABEL

if TYPE_CHECKING:
    from bridge.spool import SpoolStats

OUTCOMES = ("published", "unrouted", "spooled", "duplicate", "rejected", "failed")
PUBLISH_RESULTS = ("confirmed", *PUBLISH_FAILURES)
# Refusals that set a spooled record aside (delivery.Replayer): the rest are retried.
DEAD_LETTER_REASONS = ("returned", "channel_error")
_LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PLATFORM_OPERATIONS = ("list", "get", "create", "update", "delete", "example", "types")
PLATFORM_STATUS_CLASSES = ("2xx", "4xx", "5xx", "error")
RECONCILE_ACTIONS = ("create", "update", "delete")
_BODY_BUCKETS_BYTES = (256, 512, 1024, 4096, 16384, 65536, 262144, 1048576)


def _rejection_reasons() -> tuple[str, ...]:
    seen: list[str] = []
    pending: list[type[RejectedEvent]] = [RejectedEvent]
    while pending:
        cls = pending.pop()
        if cls.reason not in seen:
            seen.append(cls.reason)
        pending.extend(cls.__subclasses__())
    return tuple(seen)


# Refusals below the handlers (guarded runner): malformed HTTP and connection limits.
HTTP_REFUSALS = ("malformed_request", "header_timeout", "too_many_connections")
REJECTION_REASONS = (*_rejection_reasons(), *HTTP_REFUSALS)


def event_type_label(event_type: str | None) -> str:
    """Known types as they are; anything else collapses so label sets stay bounded."""
    return event_type if event_type in KNOWN_EVENT_TYPES else UNKNOWN_TYPE_LABEL


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `*_created` series double the series count and no dashboard or alert here uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        # Labelled children by label values; the label sets are bounded (event_type_label).
        self._handled_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._publish_children: dict[tuple[str, str], Any] = {}
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        self.build_info = Gauge(
            "onebridge_build_info", "Build of the running bridge.", ["version"], registry=registry
        )
        self.webhook_requests = Counter(
            "onebridge_webhook_requests_total",
            "Callbacks handled, by event type and outcome.",
            ["event_type", "outcome"],
            registry=registry,
        )
        self.webhook_rejections = Counter(
            "onebridge_webhook_rejections_total",
            "Callbacks refused with a 4xx or 503, by reason.",
            ["reason"],
            registry=registry,
        )
        self.webhook_duration = Histogram(
            "onebridge_webhook_request_duration_seconds",
            "Time from request start to response, by outcome.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.webhook_body_bytes = Histogram(
            "onebridge_webhook_request_body_bytes",
            "Size of accepted callback bodies.",
            buckets=_BODY_BUCKETS_BYTES,
            registry=registry,
        )
        self.last_event = Gauge(
            "onebridge_last_event_timestamp_seconds",
            "When an event of the type was last accepted (0: not since start).",
            ["event_type"],
            registry=registry,
        )
        self.webhook_in_flight = Gauge(
            "onebridge_webhook_requests_in_flight",
            "Callbacks being handled right now.",
            registry=registry,
        )
        self.broker_publishes = Counter(
            "onebridge_broker_publishes_total",
            "Publishes to RabbitMQ, by event type and result.",
            ["event_type", "result"],
            registry=registry,
        )
        self.broker_confirm_duration = Histogram(
            "onebridge_broker_confirm_duration_seconds",
            "Time from publish to the broker's confirm.",
            buckets=_LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.broker_connected = Gauge(
            "onebridge_broker_connected",
            "1 while the bridge holds a connection to RabbitMQ.",
            registry=registry,
        )
        self.broker_blocked = Gauge(
            "onebridge_broker_blocked",
            "1 while RabbitMQ blocks the connection (resource alarm).",
            registry=registry,
        )
        self.ready = Gauge(
            "onebridge_ready", "1 while the bridge reports ready.", registry=registry
        )
        self.duplicates = Counter(
            "onebridge_webhook_duplicates_total",
            "Callbacks answered 200 without a publish: eventId seen inside the window.",
            registry=registry,
        )
        self.spool_events = Gauge(
            "onebridge_spool_events", "Events waiting in the spool.", registry=registry
        )
        self.spool_bytes = Gauge(
            "onebridge_spool_bytes", "Body bytes waiting in the spool.", registry=registry
        )
        self.spool_oldest = Gauge(
            "onebridge_spool_oldest_event_timestamp_seconds",
            "Receive time of the oldest spooled event (0 when empty).",
            registry=registry,
        )
        self.spool_dead_letters = Gauge(
            "onebridge_spool_dead_letters",
            "Records set aside because the broker refused them for good.",
            registry=registry,
        )
        self.spool_max_events = Gauge(
            "onebridge_spool_max_events",
            "The spool's bound in events (spool.max_events): at it, callbacks get 503.",
            registry=registry,
        )
        self.spool_max_bytes = Gauge(
            "onebridge_spool_max_bytes",
            "The spool's bound in body bytes (spool.max_bytes): at it, callbacks get 503.",
            registry=registry,
        )
        self.spool_writable = Gauge(
            "onebridge_spool_writable",
            "1 while the spool takes appends (0 after a write failed).",
            registry=registry,
        )
        self.spool_appended = Counter(
            "onebridge_spool_appended_total", "Events written to the spool.", registry=registry
        )
        self.spool_replayed = Counter(
            "onebridge_spool_replayed_total",
            "Spooled events published and confirmed.",
            registry=registry,
        )
        self.spool_dead_lettered = Counter(
            "onebridge_spool_dead_lettered_total",
            "Records moved to the dead-letter table, by reason.",
            ["reason"],
            registry=registry,
        )
        self.reconcile_runs = Counter(
            "onebridge_reconcile_runs_total",
            "Reconcile passes, by result.",
            ["result"],
            registry=registry,
        )
        self.reconcile_actions = Counter(
            "onebridge_reconcile_actions_total",
            "Changes made at the platform, by action and result.",
            ["action", "result"],
            registry=registry,
        )
        self.reconcile_last_success = Gauge(
            "onebridge_reconcile_last_success_timestamp_seconds",
            "When a reconcile pass last succeeded (0: never).",
            registry=registry,
        )
        self.reconciler_leader = Gauge(
            "onebridge_reconciler_leader",
            "1 while this replica holds the reconciler lock.",
            registry=registry,
        )
        self.platform_requests = Counter(
            "onebridge_platform_requests_total",
            "Calls to the ONe management API, by operation and status class.",
            ["operation", "status_class"],
            registry=registry,
        )
        self.platform_duration = Histogram(
            "onebridge_platform_request_duration_seconds",
            "Duration of calls to the ONe management API.",
            ["operation"],
            buckets=_LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.canary_runs = Counter(
            "onebridge_canary_runs_total",
            "Canary checks (example callback through the platform), by event type and result.",
            ["event_type", "result"],
            registry=registry,
        )
        self.canary_ok = Gauge(
            "onebridge_canary_ok",
            "1 if the last canary of the event type arrived, 0 if it did not.",
            ["event_type"],
            registry=registry,
        )
        self.canary_latency = Histogram(
            "onebridge_canary_latency_seconds",
            "From the example call to our receiver seeing the callback.",
            buckets=_LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self._initialise()

    def _initialise(self) -> None:
        """Touch every known label set so series start at 0 instead of appearing late."""
        self.build_info.labels(version=__version__).set(1)
        for event_type in (*KNOWN_EVENT_TYPES, UNKNOWN_TYPE_LABEL):
            self.last_event.labels(event_type)
            for outcome in OUTCOMES:
                self.webhook_requests.labels(event_type=event_type, outcome=outcome)
            for result in PUBLISH_RESULTS:
                self.broker_publishes.labels(event_type=event_type, result=result)
        for reason in REJECTION_REASONS:
            self.webhook_rejections.labels(reason=reason)
        for reason in DEAD_LETTER_REASONS:
            self.spool_dead_lettered.labels(reason)
        for outcome in OUTCOMES:
            self.webhook_duration.labels(outcome=outcome)
        for result in ("success", "failure"):
            self.reconcile_runs.labels(result)
            for action in RECONCILE_ACTIONS:
                self.reconcile_actions.labels(action, result)
            for event_type in (*KNOWN_EVENT_TYPES, UNKNOWN_TYPE_LABEL):
                self.canary_runs.labels(event_type, result)
                self.canary_ok.labels(event_type)
        for operation in PLATFORM_OPERATIONS:
            self.platform_duration.labels(operation)
            for status_class in PLATFORM_STATUS_CLASSES:
                self.platform_requests.labels(operation, status_class)

    def watch_spool(
        self,
        stats: Callable[[], SpoolStats],
        is_writable: Callable[[], bool],
        *,
        max_events: int,
        max_bytes: int,
    ) -> None:
        """Spool gauges read the spool's in-memory stats at scrape time: nothing per event."""
        self.spool_max_events.set(max_events)
        self.spool_max_bytes.set(max_bytes)
        self.spool_events.set_function(lambda: stats().events)
        self.spool_bytes.set_function(lambda: stats().body_bytes)
        self.spool_oldest.set_function(lambda: stats().oldest_received_at or 0.0)
        self.spool_dead_letters.set_function(lambda: stats().dead_letters)
        self.spool_writable.set_function(lambda: 1.0 if is_writable() else 0.0)

    def record_platform_request(self, operation: str, status_class: str, seconds: float) -> None:
        self.platform_requests.labels(operation, status_class).inc()
        self.platform_duration.labels(operation).observe(seconds)

    def record_canary(self, event_type: str, is_ok: bool, latency_seconds: float | None) -> None:
        label = event_type_label(event_type)
        self.canary_runs.labels(label, "success" if is_ok else "failure").inc()
        self.canary_ok.labels(label).set(1 if is_ok else 0)
        if latency_seconds is not None:
            self.canary_latency.observe(latency_seconds)

    def record_handled(
        self, event_type: str, outcome: str, seconds: float, body_bytes: int, received_at: float
    ) -> None:
        """One accepted callback: the per-request hot path, so labelled children are cached."""
        type_label = event_type_label(event_type)
        key = (type_label, outcome)
        children = self._handled_children.get(key)
        if children is None:
            children = self._handled_children[key] = (
                self.webhook_requests.labels(type_label, outcome),
                self.last_event.labels(type_label),
                self.webhook_duration.labels(outcome),
            )
        requests, last_event, duration = children
        requests.inc()
        last_event.set(received_at)
        duration.observe(seconds)
        self.webhook_body_bytes.observe(body_bytes)

    def record_publish(self, event_type: str, result: str, seconds: float) -> None:
        key = (event_type_label(event_type), result)
        counter = self._publish_children.get(key)
        if counter is None:
            counter = self._publish_children[key] = self.broker_publishes.labels(*key)
        counter.inc()
        if result == "confirmed":
            self.broker_confirm_duration.observe(seconds)
