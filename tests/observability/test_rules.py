"""deploy/prometheus: the rules pass promtool's checks and unit tests, every alert follows the
runbook conventions and is unit-tested, and the example scrape config is valid."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from observability.helpers import (
    EXAMPLE_CONFIG,
    PROMETHEUS_DIR,
    RULES,
    RULES_TEST,
    alerting_rules,
    require_binary,
)

RUNBOOK = "https://github.com/one-bridge/one-bridge/blob/main/deploy/OPERATIONS.md#"
ALERTS = [
    "OneBridgeDown",
    "OneBridgeBrokerDisconnected",
    "OneBridgeBrokerBlocked",
    "OneBridgeSpoolGrowing",
    "OneBridgeSpoolNearlyFull",
    "OneBridgeSpoolOld",
    "OneBridgeSpoolUnwritable",
    "OneBridgeDeadLetters",
    "OneBridgeNotReady",
    "OneBridgeReconcileFailing",
    "OneBridgeCanaryFailing",
    "OneBridgeUnauthorizedSpike",
    "OneBridge5xx",
    "OneBridgeEventTypeSilent",
    "OneBridgeUnroutedEvents",
]


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=PROMETHEUS_DIR,
    )


def test_rules_pass_promtool_check():
    """promtool check rules: valid YAML, valid PromQL, valid templates."""
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout.strip())


def test_rules_pass_their_unit_tests():
    """promtool test rules: every alert fires, and stays quiet, when its tests say."""
    result = promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout.strip())


def test_example_prometheus_config_is_valid_and_loads_the_rules():
    """promtool check config follows rule_files, so the rules are found beside it."""
    result = promtool("check", "config", EXAMPLE_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    document = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    [job] = [job for job in document["scrape_configs"] if job["job_name"] == "one-bridge"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9102"]  # ops.port's default


def test_the_alerts_are_the_documented_set():
    """Exactly the agreed alerts, each once."""
    names = [rule["alert"] for rule in alerting_rules()]
    assert sorted(names) == sorted(ALERTS)


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda rule: rule["alert"])
def test_alert_follows_the_runbook_conventions(rule):
    """Severity page or ticket; summary, description and the runbook anchor of its name."""
    assert rule["labels"]["severity"] in {"page", "ticket"}
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert annotations["runbook_url"] == RUNBOOK + rule["alert"].lower()
    assert "\n" not in annotations["summary"] and "\n" not in annotations["description"]
    if "for" in rule:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet():
    """Each alert has an eval that expects it, and one that expects it quiet (before its `for`
    ran out, or after the condition cleared); look-alike series that must not fire sit in the
    same tests, so a firing eval also proves they stay quiet."""
    document = yaml.safe_load(RULES_TEST.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(ALERTS)
    assert quiet == set(ALERTS)


def test_prometheus_yaml_passes_the_deploy_yamllint_rules():
    """The same yamllint config as the other deploy YAML (tests/deploy/test_yaml.py)."""
    yamllint = Path(sys.executable).parent / "yamllint"
    if not yamllint.exists():
        pytest.fail("yamllint not found: install the test extra (pip install -e '.[test]')")
    files = sorted(PROMETHEUS_DIR.glob("*.yml"))
    assert len(files) == 3
    config = PROMETHEUS_DIR.parent / ".yamllint.yaml"
    result = subprocess.run(
        [yamllint, "--strict", "-f", "parsable", "-c", config, *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
