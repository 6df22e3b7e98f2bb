"""Rules and dashboard read only metrics the bridge exports (bridge/metrics.py), under their
exposed names; the dashboard is valid Grafana JSON covering the whole catalogue."""

from __future__ import annotations

import json
import re

import pytest
from observability.helpers import (
    DASHBOARD,
    all_panels,
    catalogue_families,
    catalogue_text,
    dashboard_queries,
    exposition_names,
    load_dashboard,
    load_rules,
    metric_names,
)


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Every series name a fresh Metrics() exposes (process_* included)."""
    return exposition_names(catalogue_text())


def test_metric_name_extraction_reads_promql_as_prometheus_does():
    """Names inside functions, selectors and matchers; not recording rules or label names."""
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(onebridge_x_seconds_bucket{job=~"$job"}[5m])))'
        " / onebridge:last_event_timestamp_seconds:max1d and on (instance) process_open_fds"
        ' unless onebridge_y{reason="onebridge_not_a_metric_z"}'
    )
    assert metric_names(expr) == {
        "onebridge_x_seconds_bucket",
        "process_open_fds",
        "onebridge_y",
        # A label value is not PromQL's business but is harmless: it must then exist too,
        # which keeps the dashboards from quoting metric-like names in strings.
        "onebridge_not_a_metric_z",
    }


def test_catalogue_exposes_series_names_with_their_suffixes(exposed):
    """Counters end in _total, histograms in _bucket/_sum/_count; _created is disabled."""
    assert "onebridge_webhook_requests_total" in exposed
    assert "onebridge_webhook_request_duration_seconds_bucket" in exposed
    assert "onebridge_webhook_request_duration_seconds" not in exposed
    assert "onebridge_spool_dead_lettered_total" in exposed  # labelled, no child at start
    assert not [name for name in exposed if name.endswith("_created")]


@pytest.mark.parametrize(
    "rule", load_rules(), ids=lambda rule: rule.get("alert") or rule.get("record")
)
def test_rule_reads_only_exported_metrics(rule, exposed):
    """Every onebridge_* name in the rule's expression is one the bridge exports, and every
    onebridge:* name one of the file's recording rules."""
    names = metric_names(rule["expr"])
    recorded = set(re.findall(r"onebridge:[\w:]+", rule["expr"]))
    if rule.get("alert") != "OneBridgeDown":  # reads only `up`
        assert names or recorded, f"no metric name found in {rule['expr']!r}"
    assert names <= exposed, sorted(names - exposed)
    assert recorded <= {r["record"] for r in load_rules() if "record" in r}, recorded


def test_dashboard_reads_only_exported_metrics(exposed):
    """Every onebridge_* and process_* name in every panel query is exported."""
    queries = dashboard_queries(load_dashboard())
    assert len(queries) > 40
    missing = {
        (title, name)
        for title, expr in queries
        for name in metric_names(expr)
        if name not in exposed
    }
    assert not missing, sorted(missing)


def test_dashboard_shows_every_metric_of_the_catalogue():
    """A metric added to bridge/metrics.py without a panel fails here."""
    used = {name for _, expr in dashboard_queries(load_dashboard()) for name in metric_names(expr)}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    unshown = [
        family
        for family, kind in catalogue_families().items()
        if not any(family + suffix in used for suffix in suffixes.get(kind, ("",)))
    ]
    assert not unshown, unshown


def test_dashboard_is_valid_grafana_json_with_unique_panel_ids():
    """Parses; schemaVersion 39; unique ids; datasource from the variable; refIds per panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "one-bridge"
    panels = list(all_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert 'job=~"$job", instance=~"$instance"' in target["expr"], target["expr"]


def test_dashboard_panels_do_not_overlap():
    """Grafana would move overlapping panels; the layout as written is the layout shown."""
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(load_dashboard()):
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_catalogue_needs_no_spool_watch_to_expose_the_spool_gauges():
    """The spool gauges exist before watch_spool(): a Metrics() alone is the whole catalogue."""
    text = catalogue_text()
    for name in ("onebridge_spool_events", "onebridge_spool_oldest_event_timestamp_seconds"):
        assert f"\n{name} 0.0\n" in text
