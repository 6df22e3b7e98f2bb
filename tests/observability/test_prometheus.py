"""A real Prometheus (Debian's binary) scrapes an in-process bridge: the counters arrive as
sent, the rules load and evaluate cleanly, and every dashboard query runs."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import DEV_PASSWORD, DEV_USER
from observability.helpers import (
    APT_PACKAGE,
    PrometheusServer,
    as_sent_by_grafana,
    dashboard_queries,
    load_dashboard,
    load_rules,
    poll_until,
    require_binary,
)

from bridge.events import KNOWN_EVENT_TYPES

pytestmark = [
    pytest.mark.integration,
    # Decided before any fixture runs, so a missing binary does not start a broker first.
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason=f"prometheus not found: apt-get install -y {APT_PACKAGE} (Debian)",
    ),
]

CALLBACKS = 30
PUBLISHED_QUERY = 'sum(onebridge_webhook_requests_total{outcome="published"})'
AUTH = "Basic " + b64encode(f"{DEV_USER}:{DEV_PASSWORD}".encode()).decode()


@pytest.fixture
def prometheus_binary() -> str:
    return require_binary("prometheus")


@pytest.fixture
def prometheus_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    return directory


@pytest.fixture
def stopped_at_end() -> Iterator[list[PrometheusServer]]:
    """Servers put here are stopped (SIGTERM, then SIGKILL) when the test ends, however."""
    servers: list[PrometheusServer] = []
    yield servers
    for server in servers:
        server.stop()
        assert server.process is not None and server.process.poll() is not None


async def query(prometheus: PrometheusServer, session: aiohttp.ClientSession, expr: str):
    return await prometheus.api(session, "query", query=expr)


async def test_prometheus_scrapes_the_bridge_and_counts_every_callback(
    bridge, prometheus_binary, prometheus_dir, stopped_at_end
):
    """After N callbacks, Prometheus's sum of published requests is N."""
    prometheus = PrometheusServer(
        prometheus_binary, prometheus_dir, targets=[f"127.0.0.1:{bridge.ops_port}"]
    )
    stopped_at_end.append(prometheus)
    prometheus.start()
    async with aiohttp.ClientSession() as session:
        await prometheus.wait_ready(session)

        async def target_up() -> tuple[bool, object]:
            result = await query(prometheus, session, 'up{job="one-bridge"}')
            return [s["value"][1] for s in result["result"]] == ["1"], result["result"]

        await poll_until(target_up, timeout=15, what="bridge scraped (up == 1)")

        url = f"http://127.0.0.1:{bridge.receiver_port}/one/klient/events"
        headers = {"Authorization": AUTH, "Content-Type": "application/json"}

        async def send(index: int) -> int:
            event_type = KNOWN_EVENT_TYPES[index % len(KNOWN_EVENT_TYPES)]
            data = b'{"type": "%s", "tenantKey": "klient", "eventId": "%s"}' % (
                event_type.encode(),
                uuid.uuid4().hex.encode(),
            )
            async with session.post(url, data=data, headers=headers) as response:
                assert (await response.json())["status"] == "published"
                return response.status

        assert await asyncio.gather(*map(send, range(CALLBACKS))) == [200] * CALLBACKS

        async def all_counted() -> tuple[bool, object]:
            result = (await query(prometheus, session, PUBLISHED_QUERY))["result"]
            return [sample["value"][1] for sample in result] == [str(CALLBACKS)], result

        result = await poll_until(all_counted, timeout=20, what=f"{PUBLISHED_QUERY} == {CALLBACKS}")
    print(
        f"\nGET /api/v1/query?query={PUBLISHED_QUERY} after {CALLBACKS} callbacks"
        f"\n-> {json.dumps(result)} ({prometheus.version})"
    )


async def test_rules_evaluate_cleanly_and_dashboard_queries_run_against_live_data(
    bridge, prometheus_binary, prometheus_dir, stopped_at_end
):
    """Prometheus loads every rule, evaluates each without error (no vector-matching
    conflict on real label sets), and answers every dashboard query as Grafana sends it."""
    prometheus = PrometheusServer(
        prometheus_binary, prometheus_dir, targets=[f"127.0.0.1:{bridge.ops_port}"]
    )
    stopped_at_end.append(prometheus)
    prometheus.start()
    expected_rules = {rule.get("alert") or rule["record"] for rule in load_rules()}
    async with aiohttp.ClientSession() as session:
        await prometheus.wait_ready(session)

        async def scraped() -> tuple[bool, object]:
            result = await query(prometheus, session, "count(onebridge_build_info)")
            return bool(result["result"]), result["result"]

        await poll_until(scraped, timeout=15, what="bridge scraped")
        first = (await prometheus.api(session, "rules"))["groups"]
        first_seen = {r["name"]: r["lastEvaluation"] for g in first for r in g["rules"]}

        async def evaluated_after_scrape() -> tuple[bool, object]:
            groups = (await prometheus.api(session, "rules"))["groups"]
            rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
            # Every rule evaluated again since the bridge's series arrived.
            done = set(rules) == expected_rules and all(
                rule["lastEvaluation"] != first_seen.get(name) for name, rule in rules.items()
            )
            return done, rules

        rules = await poll_until(evaluated_after_scrape, timeout=15, what="rules evaluated")
        unhealthy = {
            name: rule.get("lastError") for name, rule in rules.items() if rule["health"] != "ok"
        }
        assert not unhealthy, unhealthy

        failures = []
        for title, expr in dashboard_queries(load_dashboard()):
            async with session.get(
                f"{prometheus.url}/api/v1/query", params={"query": as_sent_by_grafana(expr)}
            ) as response:
                document = await response.json()
            if document.get("status") != "success":
                failures.append((title, expr, document.get("error")))
        assert not failures, failures
        # The bridge is healthy and idle: no alert may be firing against it.
        alerts = (await prometheus.api(session, "alerts"))["alerts"]
        assert [a for a in alerts if a["state"] == "firing"] == []
