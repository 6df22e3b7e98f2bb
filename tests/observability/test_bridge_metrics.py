"""/metrics of a running bridge: the whole catalogue, and a bounded series count whatever
callers send (random tenants, types, paths and credentials)."""

from __future__ import annotations

import asyncio
import uuid
from base64 import b64encode
from collections import Counter

import aiohttp
import pytest
from conftest import DEV_PASSWORD, DEV_USER
from observability.helpers import catalogue_families
from prometheus_client.parser import text_string_to_metric_families

from bridge.events import KNOWN_EVENT_TYPES, UNKNOWN_TYPE_LABEL

pytestmark = pytest.mark.integration

AUTH = "Basic " + b64encode(f"{DEV_USER}:{DEV_PASSWORD}".encode()).decode()
FLOOD = 60  # requests of each kind


def random_text(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def body(event_type: str) -> bytes:
    return b'{"type": "%s", "tenantKey": "klient", "clientId": "org:1", "eventId": "%s"}' % (
        event_type.encode(),
        uuid.uuid4().hex.encode(),
    )


async def scrape(session: aiohttp.ClientSession, bridge) -> str:
    async with session.get(f"http://127.0.0.1:{bridge.ops_port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain;")
        return await response.text()


def onebridge_series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of the bridge's own samples (process_* and python_* vary
    by themselves and are left out)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("onebridge_")
        for sample in family.samples
    }


async def test_metrics_endpoint_exposes_the_whole_catalogue(bridge):
    """Every family of bridge/metrics.py is on /metrics, with its HELP and TYPE."""
    async with aiohttp.ClientSession() as session:
        text = await scrape(session, bridge)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    expected = catalogue_families()
    assert len(expected) >= 30
    missing = sorted(set(expected) - set(families))
    assert not missing, missing
    assert {name: families[name].type for name in expected} == expected
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= {
        sample.name for family in families.values() for sample in family.samples
    }
    # Live values, not only declarations: the gauges the bridge wires at start.
    series = onebridge_series(text)
    assert series[("onebridge_broker_connected", frozenset())] == 1
    assert series[("onebridge_spool_writable", frozenset())] == 1
    assert series[("onebridge_broker_blocked", frozenset())] == 0
    # The spool's bounds as configured, so "how full" is a query (OneBridgeSpoolNearlyFull).
    assert series[("onebridge_spool_max_events", frozenset())] == bridge.config.spool.max_events
    assert series[("onebridge_spool_max_bytes", frozenset())] == bridge.config.spool.max_bytes


async def test_series_count_is_constant_under_a_flood_of_random_input(bridge):
    """Random tenants, unknown types, paths and credentials add no onebridge_ series: unknown
    types collapse to event_type="unknown", everything else is counted by a bounded reason."""
    base = f"http://127.0.0.1:{bridge.receiver_port}"
    json_headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=32), raise_for_status=False
    ) as session:
        before_text = await scrape(session, bridge)
        before = onebridge_series(before_text)

        async def send(method: str, path: str, headers: dict[str, str], data: bytes) -> int:
            async with session.request(method, base + path, headers=headers, data=data) as r:
                await r.read()
                return r.status

        unknown_types = [random_text("Type") for _ in range(FLOOD)]
        random_tenants = [random_text("tenant") for _ in range(FLOOD)]
        requests = (
            # Unknown types for the configured tenant: accepted, published to unrouted.
            [
                ("POST", "/one/klient/events", {**json_headers, "Authorization": AUTH}, body(t))
                for t in unknown_types
            ]
            # Tenants nobody configured.
            + [
                ("POST", f"/one/{t}/events", {**json_headers, "Authorization": AUTH}, body(t))
                for t in random_tenants
            ]
            # Paths nothing serves.
            + [
                (method, "/" + random_text("path") + "/" + random_text(""), json_headers, b"{}")
                for method in ("GET", "POST")
                for _ in range(FLOOD // 2)
            ]
            # Wrong credentials, random user names and passwords.
            + [
                (
                    "POST",
                    "/one/klient/events",
                    {
                        **json_headers,
                        "Authorization": "Basic "
                        + b64encode(f"{random_text('u')}:{random_text('p')}".encode()).decode(),
                    },
                    body("CartOpened"),
                )
                for _ in range(FLOOD)
            ]
            # And the documented types, so their label sets are in use too.
            + [
                ("POST", "/one/klient/events", {**json_headers, "Authorization": AUTH}, body(t))
                for t in KNOWN_EVENT_TYPES
            ]
        )
        statuses = await asyncio.gather(*(send(*request) for request in requests))
        after_text = await scrape(session, bridge)

    assert Counter(statuses) == {200: FLOOD + len(KNOWN_EVENT_TYPES), 404: 2 * FLOOD, 401: FLOOD}
    after = onebridge_series(after_text)
    print(f"onebridge_ series: {len(before)} before, {len(after)} after {len(requests)} requests")
    assert set(after) == set(before), sorted(set(after) ^ set(before))
    assert len(after) == len(before)

    def value(name: str, **labels: str) -> float:
        return after[(name, frozenset(labels.items()))]

    requests_total = "onebridge_webhook_requests_total"
    assert value(requests_total, event_type=UNKNOWN_TYPE_LABEL, outcome="unrouted") == FLOOD
    assert value("onebridge_webhook_rejections_total", reason="unknown_tenant") == FLOOD
    assert value("onebridge_webhook_rejections_total", reason="unauthorized") == FLOOD
    for event_type in KNOWN_EVENT_TYPES:
        assert value(requests_total, event_type=event_type, outcome="published") == 1
    event_types = {
        dict(labels)["event_type"] for _, labels in after if "event_type" in dict(labels)
    }
    assert event_types == {*KNOWN_EVENT_TYPES, UNKNOWN_TYPE_LABEL}
    # None of the random text reaches the exposition, not even in a label value.
    for text in [*unknown_types, *random_tenants]:
        assert text not in after_text
