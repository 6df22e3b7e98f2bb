"""Operator commands as a user runs them: spool stats/export/drain and configuration errors."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from support.amqp import bound_queue, take, unique

from bridge.events import WebhookEvent
from bridge.spool import SqliteSpool

pytestmark = pytest.mark.system
ROOT = Path(__file__).parent.parent.parent


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=ROOT,
    )


async def fill_spool(directory: Path, exchange: str, count: int) -> None:
    async with await SqliteSpool.open(directory, max_bytes=10**6, max_events=100) as spool:
        for n in range(count):
            body = b'{"type": "CartOpened", "eventId": "spooled-%d"}' % n
            await spool.append(
                exchange, WebhookEvent("klient", "CartOpened", f"spooled-{n}", body, 1.0)
            )


async def test_spool_stats_and_export_read_what_is_spooled(tmp_path):
    """stats counts the records; export prints each as a JSON line with the exact body."""
    await fill_spool(tmp_path / "spool", "ex", 3)
    stats = cli("spool", "stats", "--json", BRIDGE_SPOOL__DIR=str(tmp_path / "spool"))
    assert stats.returncode == 0, stats.stderr
    assert orjson.loads(stats.stdout)["events"] == 3
    export = cli("spool", "export", BRIDGE_SPOOL__DIR=str(tmp_path / "spool"))
    lines = [orjson.loads(line) for line in export.stdout.splitlines()]
    assert [line["event_id"] for line in lines] == ["spooled-0", "spooled-1", "spooled-2"]
    assert lines[0]["body"] == '{"type": "CartOpened", "eventId": "spooled-0"}'


def test_spool_stats_without_a_spool_is_a_clear_failure(tmp_path):
    """A wrong directory is exit 1 with the path, not a traceback."""
    result = cli("spool", "stats", BRIDGE_SPOOL__DIR=str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert "no spool" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
async def test_spool_drain_publishes_everything_and_empties_the_spool(tmp_path, rabbitmq):
    """drain replays every record to the broker, in order, and exits 0 when nothing is left."""
    exchange = unique("drain-ex")
    await fill_spool(tmp_path / "spool", exchange, 4)
    async with bound_queue(rabbitmq.url, exchange) as queue:
        result = await asyncio.to_thread(
            cli,
            "spool",
            "drain",
            "--json",
            BRIDGE_SPOOL__DIR=str(tmp_path / "spool"),
            BRIDGE_BROKER__URL=rabbitmq.url,
        )
        assert result.returncode == 0, result.stderr
        assert orjson.loads(result.stdout) == {"replayed": 4, "remaining": 0}
        messages = await take(queue, 4)
    assert [m.message_id for m in messages] == [f"spooled-{n}" for n in range(4)]


async def test_spool_drain_refuses_while_the_spool_is_in_use(tmp_path):
    """Only one process replays a spool: drain says so while another holds it."""
    await fill_spool(tmp_path / "spool", "ex", 1)
    async with await SqliteSpool.open(tmp_path / "spool", max_bytes=10**6, max_events=10):
        result = await asyncio.to_thread(
            cli, "spool", "drain", BRIDGE_SPOOL__DIR=str(tmp_path / "spool")
        )
    assert result.returncode == 1
    assert "in use" in result.stderr


def test_misspelt_environment_section_is_refused():
    """BRIDGE_RECEIVR__PORT would otherwise be ignored without a word."""
    result = cli("check-config", BRIDGE_RECEIVR__PORT="1")
    assert result.returncode == 2
    assert "BRIDGE_RECEIVR__PORT" in result.stderr


def test_invalid_json_in_the_environment_names_the_variable():
    """A list-valued key given as non-JSON is exit 2 naming the variable, not a traceback."""
    result = cli("check-config", BRIDGE_TENANTS__KLIENT__PASSWORDS="not-json")
    assert result.returncode == 2
    assert "BRIDGE_TENANTS__KLIENT__PASSWORDS" in result.stderr
    assert "Traceback" not in result.stderr


def test_busy_port_is_a_clear_failure(tmp_path):
    """A port in use is exit 1 naming the setting, not a traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(
            "run",
            BRIDGE_OPS__PORT=str(port),
            BRIDGE_RECEIVER__PORT="0",
            BRIDGE_BROKER__URL="amqp://guest:guest@127.0.0.1:1/",
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "BRIDGE_OPS__PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_flag_is_answered_with_that_commands_usage():
    """Exit 2, and the usage shown is the subcommand's, so the right flags are in sight."""
    result = cli("spool", "stats", "--bogus")
    assert result.returncode == 2
    assert "usage: one-bridge spool stats" in result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr


def test_sandbox_on_a_busy_port_is_a_clear_failure():
    """Exit 1 with the address and the reason, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("sandbox", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
