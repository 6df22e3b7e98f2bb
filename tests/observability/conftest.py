"""Fixtures for the observability tests: the Prometheus binaries, and a bridge in-process."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
from conftest import make_config

from bridge.app import Bridge
from bridge.metrics import Metrics


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The Prometheus versions the rules were checked with, so a failure names them."""
    lines = []
    for name in ("promtool", "prometheus"):
        path = shutil.which(name)
        if path is None:
            lines.append(f"observability: {name} missing (Debian package prometheus)")
            continue
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        version = (result.stdout or result.stderr).strip().splitlines()
        lines.append(f"observability: {version[0] if version else name + ' ?'}")
    return lines


@pytest.fixture
async def bridge(rabbitmq) -> AsyncIterator[Bridge]:
    """A bridge with fresh metrics against the session RabbitMQ, tenant klient with the dev
    credentials, receiver and ops listener on ports the OS picks; connected when yielded."""
    config = make_config(broker={"url": rabbitmq.url})
    async with Bridge(config, metrics=Metrics()) as running:
        await asyncio.wait_for(running.publisher.wait_connected(), 30)
        yield running
