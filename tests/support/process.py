"""The bridge as a real subprocess (`python -m bridge run`, configured by BRIDGE_* variables).

The child inherits the test's environment, so BRIDGE_SPOOL__DIR (set per test by conftest) is
the same for every bridge a test starts: a restarted bridge reopens the spool of the first.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from conftest import DEV_PASSWORD, DEV_USER

ROOT = Path(__file__).parent.parent.parent
START_TIMEOUT_SECONDS = 30.0


def free_port() -> int:
    """A loopback port free right now (another process may still take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BridgeProcess:
    """A started bridge: its process, callback base URL and ops base URL."""

    process: asyncio.subprocess.Process
    url: str
    ops: str
    log_path: Path | None = None

    @property
    def ready(self) -> str:
        return f"{self.ops}/readyz"

    @property
    def pid(self) -> int:
        return self.process.pid

    def __getitem__(self, key: str) -> Any:
        # Dict-style access (bridge["process"], bridge["url"]), as test_process.py uses it.
        return getattr(self, key)

    def events_url(self, tenant: str) -> str:
        return f"{self.url}/one/{tenant}/events"

    async def readyz(self, session: aiohttp.ClientSession) -> int:
        """The /readyz status code."""
        async with session.get(self.ready) as response:
            return response.status

    async def metric(self, session: aiohttp.ClientSession, name: str) -> float | None:
        """The value of an unlabelled sample on /metrics, None if it is not there."""
        async with session.get(f"{self.ops}/metrics") as response:
            text = await response.text()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None

    async def wait_metric(
        self, name: str, condition: Callable[[float], bool], *, timeout: float = 30.0
    ) -> float:
        """Poll /metrics until `name` satisfies `condition`; its last value, or TimeoutError."""
        async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
            while True:
                value = await self.metric(session, name)
                if value is not None and condition(value):
                    return value
                assert self.process.returncode is None, "bridge exited while awaited"
                await asyncio.sleep(0.05)

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines named `event`, each with `time` (unix seconds) added."""
        found = []
        for line in self.log_text().splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
                found.append({**record, "time": stamp.timestamp()})
        return found

    def log_text(self) -> str:
        """What the bridge wrote on stderr so far (only when started with `log_path`)."""
        if self.log_path is None:
            return ""
        return self.log_path.read_text(errors="replace")


def bridge_env(amqp_url: str, tenant: str, receiver_port: int, ops_port: int) -> dict[str, str]:
    """Environment for one tenant with the dev credentials on loopback ports."""
    key = tenant.upper()
    return {
        "BRIDGE_BROKER__URL": amqp_url,
        "BRIDGE_RECEIVER__HOST": "127.0.0.1",
        "BRIDGE_RECEIVER__PORT": str(receiver_port),
        "BRIDGE_OPS__PORT": str(ops_port),
        f"BRIDGE_TENANTS__{key}__USERNAME": DEV_USER,
        f"BRIDGE_TENANTS__{key}__PASSWORDS": f'["{DEV_PASSWORD}"]',
        "BRIDGE_LOG__FORMAT": "json",
    }


@asynccontextmanager
async def bridge_process(
    amqp_url: str,
    tenant: str,
    *,
    log_path: Path | None = None,
    wait_ready: bool = True,
    preexec_fn: Callable[[], None] | None = None,
    **env: str,
) -> AsyncIterator[BridgeProcess]:
    """Run `python -m bridge run` for `tenant`; yields once it is ready; killed when it ends.

    `env` adds or overrides BRIDGE_* variables. With `log_path`, stderr goes to that file (it
    never fills up and blocks the bridge); without, it is a pipe the caller reads. With
    `wait_ready=False`, yields as soon as /healthz answers (a bridge that cannot be ready).
    """
    receiver_port, ops_port = free_port(), free_port()
    process_env = {**os.environ, **bridge_env(amqp_url, tenant, receiver_port, ops_port), **env}
    log_file = log_path.open("ab") if log_path is not None else None
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "run",
            env=process_env,
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_file if log_file is not None else asyncio.subprocess.PIPE,
            preexec_fn=preexec_fn,
        )
    finally:
        if log_file is not None:
            log_file.close()  # the child holds its own copy
    bridge = BridgeProcess(
        process=process,
        url=f"http://127.0.0.1:{receiver_port}",
        ops=f"http://127.0.0.1:{ops_port}",
        log_path=log_path,
    )
    probe = bridge.ready if wait_ready else f"{bridge.ops}/healthz"
    try:
        async with aiohttp.ClientSession() as session:

            async def answers() -> bool:
                try:
                    async with session.get(probe) as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                while not await answers():
                    if process.returncode is not None:
                        raise AssertionError(
                            f"bridge exited with {process.returncode} during start"
                            + (f":\n{bridge.log_text()[-2000:]}" if log_path else "")
                        )
                    await asyncio.sleep(0.05)
        yield bridge
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
