"""Shared by the observability tests: the deploy files, the metric catalogue, PromQL name
extraction, and a real Prometheus (Debian's binary) run on a loopback port."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "one-bridge.rules.yml"
RULES_TEST = PROMETHEUS_DIR / "one-bridge.rules.test.yml"
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.example.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "one-bridge.json"
# Debian's `prometheus` package ships both binaries.
APT_PACKAGE = "prometheus"

# Metric names as written in PromQL: the bridge's own, and the process collector's. Recording
# rules (onebridge:...) do not match: the colon ends the identifier before the prefix.
_METRIC_NAME = re.compile(r"(?<![\w:])((?:onebridge|process)_[A-Za-z0-9_]*)(?![\w:])")
# What Grafana substitutes before a panel's query reaches Prometheus.
_GRAFANA_VARIABLES = {"$job": ".*", "$instance": ".*", "$__rate_interval": "1m"}


def require_binary(name: str) -> str:
    """The path of a Prometheus binary; skipped (reason printed) only when it is missing."""
    path = shutil.which(name)
    if path is None:
        reason = (
            f"{name} not found: install Debian's {APT_PACKAGE} package"
            f" (apt-get install -y {APT_PACKAGE})"
        )
        print(reason)
        pytest.skip(reason)
    return path


def exposition_names(text: str) -> set[str]:
    """Every series name an exposition can carry: its samples' names, and for a labelled
    family that has no child yet (no sample), the names its type will expose."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        if not family.samples:
            names.update(
                {
                    "counter": [f"{family.name}_total"],
                    "histogram": [f"{family.name}_{s}" for s in ("bucket", "sum", "count")],
                }.get(family.type, [family.name])
            )
    return names


def catalogue_text() -> str:
    """The exposition of a fresh `Metrics()`: everything the bridge can export."""
    return generate_latest(Metrics(CollectorRegistry()).registry).decode()


def catalogue_families() -> dict[str, str]:
    """{family name: type} of the bridge's own metrics (onebridge_*)."""
    return {
        family.name: family.type
        for family in text_string_to_metric_families(catalogue_text())
        if family.name.startswith("onebridge_")
    }


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (onebridge_* and process_*)."""
    return set(_METRIC_NAME.findall(expr))


def load_rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of the rules file."""
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerting_rules() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, as written in the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def as_sent_by_grafana(expr: str) -> str:
    """The query with the dashboard's variables replaced as Grafana does (all selected)."""
    for name, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """Debian's prometheus on a free loopback port, with its config and TSDB in `directory`,
    scraping `targets` every second and evaluating the bridge's rules every second."""

    def __init__(self, binary: str, directory: Path, targets: list[str]) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "one-bridge",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "prometheus.log"
        self.argv = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process: subprocess.Popen[bytes] | None = None
        result = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        lines = (result.stdout or result.stderr).strip().splitlines()
        self.version = lines[0] if lines else "prometheus, version unknown"

    def start(self) -> None:
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; always reaped."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        """Poll /-/ready until it answers 200 (bounded); fail with the log if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                async with session.get(f"{self.url}/-/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {timeout} s:\n{self.log_text()}")
            await _poll_pause()

    async def api(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, AssertionError otherwise."""
        async with session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            document = await response.json()
        assert document.get("status") == "success", (path, params, document)
        return document["data"]


async def _poll_pause() -> None:
    # The pause between two polls of a bounded wait; never a synchronisation by itself.
    await asyncio.sleep(0.1)


async def poll_until(
    check: Callable[[], Awaitable[tuple[bool, Any]]], *, timeout: float, what: str
) -> Any:
    """Await `check()` -> (done, observed) until done, then return observed; fail with the last
    observation after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, observed = await check()
        if done:
            return observed
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {timeout} s; last observed: {observed!r}")
        await _poll_pause()
