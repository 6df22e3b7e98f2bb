"""The bridge as a real process: the CLI's exit codes, `send`, and SIGTERM under load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from base64 import b64encode
from pathlib import Path

import aiohttp
import pytest
from conftest import DEV_PASSWORD, DEV_USER
from support.amqp import bound_queue, drain, take, unique, wait_until
from support.process import bridge_process

pytestmark = pytest.mark.system

ROOT = Path(__file__).parent.parent.parent
AUTH = "Basic " + b64encode(f"{DEV_USER}:{DEV_PASSWORD}".encode()).decode()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@pytest.mark.parametrize("name", ["bridge.dev.toml", "bridge.example.toml"])
def test_check_config_passes_on_shipped_configs(name):
    """Exit 0, the effective config printed, secrets masked."""
    result = cli("check-config", "--config", f"config/{name}")
    assert result.returncode == 0, result.stderr
    assert "tenants.klient.username" in result.stdout
    assert "dev-password" not in result.stdout and "change-me" not in result.stdout


def test_check_config_names_the_broken_key_and_exits_2(tmp_path):
    """A configuration error is exit 2 with the key and its source."""
    path = tmp_path / "broken.toml"
    path.write_text("[receiver]\nport = 'eighty'\n")
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "receiver.port" in result.stderr and str(path) in result.stderr


def test_bad_environment_value_is_exit_2_naming_the_variable():
    """The source of a bad value may be the environment."""
    result = cli("check-config", env={"BRIDGE_OPS__PORT": "-5"})
    assert result.returncode == 2
    assert "BRIDGE_OPS__PORT" in result.stderr


def test_usage_error_is_exit_2():
    """An unknown subcommand or flag is a usage error."""
    assert cli("frobnicate").returncode == 2
    assert cli("run", "--no-such-flag").returncode == 2


@pytest.mark.parametrize(
    ("publisher", "event_loop"), [("fast", "uvloop"), ("fast", "asyncio"), ("aio-pika", "uvloop")]
)
async def test_send_command_delivers_its_events(rabbitmq, publisher, event_loop):
    """`one-bridge send` posts N callbacks of all types; all N are in RabbitMQ, with either
    publisher on either event loop."""
    tenant = unique("send").replace("-", "")
    exchanges = [
        f"p-u-o-m-e-c-cartopened-{tenant}",
        f"p-u-o-m-e-c-clientlogged-{tenant}",
        f"p-u-o-m-e-o-offeropened-{tenant}",
    ]
    async with (
        bound_queue(rabbitmq.url, *exchanges) as queue,
        bridge_process(
            rabbitmq.url,
            tenant,
            BRIDGE_BROKER__PUBLISHER=publisher,
            BRIDGE_EVENT_LOOP=event_loop,
        ) as bridge,
    ):
        result = await asyncio.to_thread(
            cli,
            "send",
            "--url",
            bridge["url"],
            "--tenant",
            tenant,
            "--user",
            DEV_USER,
            "--password",
            DEV_PASSWORD,
            "--count",
            "30",
            "--concurrency",
            "4",
            "--json",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert DEV_PASSWORD not in result.stdout
        messages = await take(queue, 30)
    assert {m.type for m in messages} == {"CartOpened", "ClientLogged", "OfferOpened"}
    assert len({m.message_id for m in messages}) == 30


async def test_sigterm_under_load_answers_truthfully_and_exits_0(rabbitmq):
    """Requests in flight at SIGTERM get their real answer; every 200 is in the queue; exit 0."""
    tenant = unique("term").replace("-", "")
    exchange = f"p-u-o-m-e-c-cartopened-{tenant}"
    accepted: list[str] = []
    refused = 0
    async with (
        bound_queue(rabbitmq.url, exchange) as queue,
        bridge_process(rabbitmq.url, tenant) as bridge,
    ):
        process = bridge["process"]
        url = f"{bridge['url']}/one/{tenant}/events"
        stop_sending = asyncio.Event()

        async def sender(session: aiohttp.ClientSession, worker: int) -> None:
            nonlocal refused
            sequence = 0
            while not stop_sending.is_set():
                sequence += 1
                event_id = f"w{worker}-{sequence}"
                body = b'{"type": "CartOpened", "eventId": "%s"}' % event_id.encode()
                try:
                    async with session.post(
                        url,
                        data=body,
                        headers={"Authorization": AUTH, "Content-Type": "application/json"},
                    ) as response:
                        if response.status == 200:
                            accepted.append(event_id)
                        else:
                            refused += 1
                except aiohttp.ClientError:
                    # Connection refused or closed once the listener is gone: a true "not taken".
                    refused += 1
                    if process.returncode is not None or stop_sending.is_set():
                        return

        connector = aiohttp.TCPConnector(limit=16, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            workers = [asyncio.create_task(sender(session, n)) for n in range(16)]
            await wait_until(lambda: len(accepted) >= 200)
            process.send_signal(signal.SIGTERM)
            returncode = await asyncio.wait_for(process.wait(), 30)
            stop_sending.set()
            await asyncio.gather(*workers)
        stderr = (await process.stderr.read()).decode()
        assert returncode == 0, stderr[-2000:]
        assert '"bridge.stopped"' in stderr
        received = {m.message_id for m in await drain(queue)}
    lost = set(accepted) - received
    assert not lost, f"{len(lost)} accepted events missing from RabbitMQ"
    assert len(accepted) >= 200
