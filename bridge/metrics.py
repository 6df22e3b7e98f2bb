"""Every Prometheus collector of the bridge, on an injected registry (no global state)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from bridge import __version__
from bridge.errors import PUBLISH_FAILURES, RejectedEvent
from bridge.events import KNOWN_EVENT_TYPES, UNKNOWN_TYPE_LABEL

OUTCOMES = ("published", "unrouted", "rejected", "failed")
PUBLISH_RESULTS = ("confirmed", *PUBLISH_FAILURES)
_LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
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


REJECTION_REASONS = _rejection_reasons()


def event_type_label(event_type: str | None) -> str:
    """Known types as they are; anything else collapses so label sets stay bounded."""
    return event_type if event_type in KNOWN_EVENT_TYPES else UNKNOWN_TYPE_LABEL


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
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
        self.ready = Gauge(
            "onebridge_ready", "1 while the bridge reports ready.", registry=registry
        )
        self._initialise()

    def _initialise(self) -> None:
        """Touch every known label set so series start at 0 instead of appearing late."""
        self.build_info.labels(version=__version__).set(1)
        for event_type in (*KNOWN_EVENT_TYPES, UNKNOWN_TYPE_LABEL):
            for outcome in OUTCOMES:
                self.webhook_requests.labels(event_type=event_type, outcome=outcome)
            for result in PUBLISH_RESULTS:
                self.broker_publishes.labels(event_type=event_type, result=result)
        for reason in REJECTION_REASONS:
            self.webhook_rejections.labels(reason=reason)
        for outcome in OUTCOMES:
            self.webhook_duration.labels(outcome=outcome)

    def record_publish(self, event_type: str, result: str, seconds: float) -> None:
        self.broker_publishes.labels(event_type=event_type_label(event_type), result=result).inc()
        if result == "confirmed":
            self.broker_confirm_duration.observe(seconds)
