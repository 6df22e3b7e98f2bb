"""`one-bridge sync`, `webhooks` and `sandbox` as a user runs them, against the sandbox."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from support.amqp import unique
from support.process import free_port

from bridge.control.lock import RabbitLock
from bridge.sandbox import SANDBOX_STATE, build_sandbox_app

pytestmark = pytest.mark.system
ROOT = Path(__file__).parent.parent.parent
API_KEY = "cli-api-key"
PASSWORD = "cli-callback-password"


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        *args,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def platform(aiohttp_server) -> Any:
    return await aiohttp_server(build_sandbox_app(default_api_key=API_KEY))


def env_for(platform: Any, tenant: str, amqp_url: str, lock_name: str) -> dict[str, str]:
    key = tenant.upper()
    return {
        "BRIDGE_BROKER__URL": amqp_url,
        "BRIDGE_CONTROL__BASE_URL": str(platform.make_url("")),
        "BRIDGE_CONTROL__CALLBACK_BASE_URL": "http://127.0.0.1:18080",
        "BRIDGE_CONTROL__LOCK_NAME": lock_name,
        f"BRIDGE_TENANTS__{key}__USERNAME": "one",
        f"BRIDGE_TENANTS__{key}__PASSWORDS": f'["{PASSWORD}"]',
        f"BRIDGE_TENANTS__{key}__API_KEY": API_KEY,
    }


async def test_sync_dry_run_shows_the_plan_then_sync_applies_it(platform, rabbitmq):
    """dry-run exits 3 with changes pending and writes nothing; sync applies; then exit 0."""
    tenant = unique("s").replace("-", "")
    env = env_for(platform, tenant, rabbitmq.url, unique("lock"))
    state = platform.app[SANDBOX_STATE]

    code, out, err = await cli("sync", "--dry-run", env=env)
    assert code == 3, err
    assert out.count("would create") == 3
    assert state.webhooks(tenant) == []

    code, out, err = await cli("sync", "--json", env=env)
    assert code == 0, err
    assert len(orjson.loads(out)["tenants"][tenant]["create"]) == 3
    assert PASSWORD not in out and API_KEY not in out + err

    code, out, err = await cli("sync", "--dry-run", env=env)
    assert code == 0, err
    assert "up to date" in out


async def test_sync_refuses_while_another_process_holds_the_lock(platform, rabbitmq):
    """Never two writers: sync says so and exits 1 while the lock is held."""
    tenant = unique("h").replace("-", "")
    lock_name = unique("held")
    lock = RabbitLock(rabbitmq.url, lock_name)
    assert await lock.try_acquire()
    try:
        code, _, err = await cli("sync", env=env_for(platform, tenant, rabbitmq.url, lock_name))
    finally:
        await lock.close()
    assert code == 1
    assert "lock" in err and "--dry-run" in err
    assert platform.app[SANDBOX_STATE].webhooks(tenant) == []


async def test_webhooks_commands_mask_every_password(platform, rabbitmq):
    """list/get/types/create/update/delete work; passwords never show."""
    tenant = unique("w").replace("-", "")
    env = env_for(platform, tenant, rabbitmq.url, unique("lock"))
    code, out, err = await cli("webhooks", "create", "--type", "CartOpened", "--json", env=env)
    assert code == 0, err
    webhook_id = orjson.loads(out)["created"]

    code, out, err = await cli("webhooks", "list", env=env)
    assert code == 0, err
    assert webhook_id in out and "one-bridge:CartOpened" in out and PASSWORD not in out

    code, out, _ = await cli("webhooks", "get", webhook_id, "--json", env=env)
    [shown] = orjson.loads(out)
    assert shown["callbackAuthentication"]["password"] == "***"

    code, out, _ = await cli("webhooks", "update", webhook_id, "--status", "INACTIVE", env=env)
    assert code == 0
    assert platform.app[SANDBOX_STATE].webhook(tenant, webhook_id)["status"] == "INACTIVE"

    code, out, _ = await cli("webhooks", "types", "--json", env=env)
    assert {t["name"] for t in orjson.loads(out)} == {"CartOpened", "ClientLogged", "OfferOpened"}

    code, _, _ = await cli("webhooks", "delete", webhook_id, env=env)
    assert code == 0
    assert platform.app[SANDBOX_STATE].webhooks(tenant) == []


async def test_wrong_api_key_is_a_clean_failure(platform, rabbitmq):
    """A refused key is exit 1 with the status, never the key itself."""
    tenant = unique("k").replace("-", "")
    env = env_for(platform, tenant, rabbitmq.url, unique("lock"))
    env[f"BRIDGE_TENANTS__{tenant.upper()}__API_KEY"] = "wrong-key-123"
    code, out, err = await cli("webhooks", "list", env=env)
    assert code == 1
    assert "401" in err and "wrong-key-123" not in out + err
    assert "Traceback" not in err


async def test_sandbox_command_serves_the_platform_until_interrupted():
    """`one-bridge sandbox` prints its URL, answers the API, and stops cleanly on SIGINT."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "sandbox",
        "--port",
        str(port),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert f"127.0.0.1:{port}" in line
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{port}/api/v1/webhooks/integrations/auth-required/webhooks/types",
            headers={"one-tenant": "klient", "ApiAuth": "dev-api-key"},
        ) as response,
    ):
        assert response.status == 200
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), 30) == 0
