"""Fixtures for the deployment tests: the repo's deploy/ tree, lint tools, sd_notify sockets,
and the bridge as a subprocess started the way a service manager starts it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
START_TIMEOUT_SECONDS = 30.0
# Variables of a surrounding service manager that must not reach a bridge a test starts.
_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The versions of the deployment tools, so a failure names what it ran against."""
    lines = []
    for name, flag in (
        ("systemd-analyze", "--version"),
        ("hadolint", "--version"),
        ("yamllint", "--version"),
        ("kubernetes-validate", "--version"),
        ("check-jsonschema", "--version"),
    ):
        path = find_tool(name)
        if path is None:
            lines.append(f"deploy tools: {name} missing")
            continue
        result = subprocess.run(
            [path, flag], capture_output=True, text=True, timeout=30, check=False
        )
        version = (result.stdout or result.stderr).strip().splitlines()
        lines.append(f"deploy tools: {name}: {version[0] if version else '?'}")
    return lines


def find_tool(name: str) -> str | None:
    """A command-line tool: the one installed beside this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


@pytest.fixture
def tool() -> Callable[[str], str]:
    """require_tool, for tests."""
    return require_tool


def require_tool(name: str) -> str:
    """A tool of the `test` extra: missing is a broken install, not a reason to skip."""
    path = find_tool(name)
    if path is None:
        pytest.fail(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return path


def free_port() -> int:
    """A loopback port free right now (another process may still take it before it binds)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, *, timeout: float = 2.0) -> int | None:
    """The status code of GET url, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except OSError:
        return None


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket the test owns."""

    def __init__(self, *, abstract: bool) -> None:
        self._dir: str | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"one-bridge-test-{os.getpid()}-{id(self)}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
            self._dir = tempfile.mkdtemp(prefix="ob-notify-")
            self.address = os.path.join(self._dir, "notify.sock")
            self.sock.bind(self.address)

    def receive(self, timeout: float = 5.0) -> str:
        """The next datagram; TimeoutError if none arrives in time."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def wait_for(self, assignment: str, timeout: float = START_TIMEOUT_SECONDS) -> list[str]:
        """Every datagram up to and including the first holding `assignment` (a line)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {assignment} within {timeout} s; got {seen}")
            message = self.receive(remaining)
            seen.append(message)
            if assignment in message.split("\n"):
                return seen

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[Callable[..., NotifySocket]]:
    """Make NotifySocket(abstract=...) objects, closed at the end of the test."""
    made: list[NotifySocket] = []

    def make(*, abstract: bool = False) -> NotifySocket:
        made.append(NotifySocket(abstract=abstract))
        return made[-1]

    yield make
    for item in made:
        item.close()


class BridgeProcess:
    """A bridge started as a subprocess, its stderr in a file the test can show."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, ops_url: str) -> None:
        self.process = process
        self.log_path = log_path
        self.ops_url = ops_url

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Poll /readyz until it answers 200 (bounded); fail with the log if it never does."""
        deadline = time.monotonic() + timeout
        while http_status(f"{self.ops_url}/readyz") != 200:
            if self.process.poll() is not None:
                pytest.fail(f"bridge exited with {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"bridge not ready after {timeout} s:\n{self.log_text()}")
            time.sleep(0.05)  # polling interval, bounded by the deadline

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (killed and failed if it does not stop in time)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"bridge did not stop within {timeout} s:\n{self.log_text()}")


@pytest.fixture
def start_bridge(tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    """Start `argv` with `env` added to a clean environment; killed at the end if still up."""
    started: list[BridgeProcess] = []

    def start(
        argv: Sequence[str], env: Mapping[str, str], *, ops_url: str, cwd: Path = ROOT
    ) -> BridgeProcess:
        process_env = {
            name: value for name, value in os.environ.items() if name not in _MANAGER_VARIABLES
        }
        process_env.update(env)
        log_path = tmp_path / f"bridge-{len(started)}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                list(argv),
                env=process_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        started.append(BridgeProcess(process, log_path, ops_url))
        return started[-1]

    yield start
    for bridge in started:
        if bridge.process.poll() is None:
            bridge.process.kill()
            bridge.process.wait()


@pytest.fixture
def bridge_env(tmp_path: Path) -> tuple[dict[str, str], int, int]:
    """BRIDGE_* for a bridge on free loopback ports with tenant klient, its broker unreachable
    (a closed port: the bridge starts anyway and is ready through its spool); and the ports."""
    receiver_port, ops_port = free_port(), free_port()
    env = {
        "BRIDGE_BROKER__URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        "BRIDGE_BROKER__CONNECT_TIMEOUT_SECONDS": "1",
        "BRIDGE_RECEIVER__HOST": "127.0.0.1",
        "BRIDGE_RECEIVER__PORT": str(receiver_port),
        "BRIDGE_OPS__HOST": "127.0.0.1",
        "BRIDGE_OPS__PORT": str(ops_port),
        "BRIDGE_SPOOL__DIR": str(tmp_path / "spool"),
        "BRIDGE_TENANTS__KLIENT__USERNAME": "one",
        "BRIDGE_TENANTS__KLIENT__PASSWORDS": '["deploy-test-password"]',
        "BRIDGE_LOG__FORMAT": "json",
    }
    return env, receiver_port, ops_port
