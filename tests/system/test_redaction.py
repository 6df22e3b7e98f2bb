"""Planted secrets never leak: not in logs, HTTP answers, metrics or command output."""

from __future__ import annotations

import asyncio
import os
import sys
from base64 import b64encode
from urllib.parse import urlsplit

import aiohttp
import pytest
from support.amqp import unique
from support.process import ROOT, bridge_process

from bridge.sandbox import SANDBOX_STATE, Faults, build_sandbox_app

pytestmark = pytest.mark.system

PASSWORD = "planted-callback-password-7781"
OLD_PASSWORD = "planted-old-password-3391"
API_KEY = "planted-api-key-5521"
BROKER_PASSWORD = "planted-broker-password-9034"
USER = "one"
SECRETS = [PASSWORD, OLD_PASSWORD, API_KEY, BROKER_PASSWORD]
FORMS = [
    *SECRETS,
    b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
    b64encode(f"{USER}:{OLD_PASSWORD}".encode()).decode(),
    b64encode(f"{USER}:wrong-{PASSWORD}".encode()).decode(),
]


def assert_clean(text: str, where: str) -> None:
    for secret in FORMS:
        assert secret not in text, f"a planted secret leaked into {where}"


def env_for(tenant: str, sandbox_url: str, amqp_url: str) -> dict[str, str]:
    key = tenant.upper()
    return {
        # The broker cannot be reached with this password: the bridge runs on its spool, and
        # every connection error it logs would carry the URL.
        "BRIDGE_BROKER__URL": amqp_url,
        f"BRIDGE_TENANTS__{key}__USERNAME": USER,
        f"BRIDGE_TENANTS__{key}__PASSWORDS": f'["{PASSWORD}", "{OLD_PASSWORD}"]',
        f"BRIDGE_TENANTS__{key}__API_KEY": API_KEY,
        "BRIDGE_CONTROL__BASE_URL": sandbox_url,
        "BRIDGE_CONTROL__INTERVAL_SECONDS": "3600",
        "BRIDGE_CONTROL__CANARY_TIMEOUT_SECONDS": "2",
        "BRIDGE_LOG__LEVEL": "debug",
    }


async def test_secrets_stay_out_of_logs_answers_metrics_and_commands(aiohttp_server, tmp_path):
    """Success and failure paths alike: bad credentials, malformed HTTP, platform errors, an
    unreachable broker; then the CLI's output."""
    tenant = unique("sec").replace("-", "")
    platform = await aiohttp_server(build_sandbox_app(default_api_key=API_KEY))
    state = platform.app[SANDBOX_STATE]
    amqp_url = f"amqp://guest:{BROKER_PASSWORD}@127.0.0.1:1/"
    env = env_for(tenant, str(platform.make_url("")), amqp_url)
    log_path = tmp_path / "bridge.log"
    answers: list[str] = []
    async with bridge_process(
        amqp_url,
        tenant,
        log_path=log_path,
        BRIDGE_CONTROL__CALLBACK_BASE_URL="http://127.0.0.1:1",
        **env,
    ) as bridge:
        env["BRIDGE_CONTROL__CALLBACK_BASE_URL"] = bridge.url
        url = bridge.events_url(tenant)
        body = b'{"type": "CartOpened", "eventId": "e-1", "note": "x"}'
        async with aiohttp.ClientSession() as session:
            for password in (PASSWORD, OLD_PASSWORD, f"wrong-{PASSWORD}"):
                authorization = "Basic " + b64encode(f"{USER}:{password}".encode()).decode()
                headers = {"Content-Type": "application/json", "Authorization": authorization}
                async with session.post(url, data=body, headers=headers) as response:
                    answers.append(await response.text())
                    answers.append(str(response.headers))
            # Malformed HTTP that carries the credentials in the offending line.
            basic = b64encode(f"{USER}:{PASSWORD}".encode())
            for raw in (
                b"POST /one/x/events HTTP/1.1\r\nAuthorization: Basic " + basic + b"\x00\r\n\r\n",
                b"GARBAGE Basic " + basic + b" HTTP/1.1\r\n\r\n",
                b"POST /one/x/events HTTP/1.1\r\nContent-Length: x\r\nApiAuth: "
                + API_KEY.encode()
                + b"\r\n\r\n",
            ):
                receiver = urlsplit(bridge.url)
                reader, writer = await asyncio.open_connection(receiver.hostname, receiver.port)
                writer.write(raw)
                await writer.drain()
                answers.append((await reader.read()).decode(errors="replace"))
                writer.close()
            # The platform failing, then refusing the key, while the reconciler works.
            state.faults = Faults(fail_status=500, fail_times=None)
            await _sync(env, answers)
            state.faults = Faults(fail_status=401, fail_times=None)
            await _sync(env, answers)
            state.faults = Faults()
            async with session.get(f"{bridge.ops}/metrics") as response:
                answers.append(await response.text())
    for args in (
        ("check-config",),
        ("check-config", "--json"),
        ("webhooks", "list"),
        ("webhooks", "list", "--json"),
        ("sync", "--dry-run"),
        ("sync", "--dry-run", "--json"),
    ):
        answers.append(await _cli(env, *args))
    assert_clean("\n".join(answers), "HTTP answers, metrics or command output")
    logs = log_path.read_text()
    assert '"webhook.rejected"' in logs and "http.malformed_request" in logs
    assert_clean(logs, "the bridge's logs")


async def _sync(env: dict[str, str], answers: list[str]) -> None:
    answers.append(await _cli(env, "sync", "--dry-run"))


async def _cli(env: dict[str, str], *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *args,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return out.decode(errors="replace")
