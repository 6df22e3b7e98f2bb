"""deploy/systemd: the unit passes systemd-analyze, and the bridge runs as the unit runs it."""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
from conftest import CASES

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "one-bridge.service"
UNIT_CONFIG = UNIT.parent / "bridge.toml"
INSTALLED_PROGRAM = "/opt/one-bridge/venv/bin/one-bridge"
INSTALLED_CONFIG = "/etc/one-bridge/bridge.toml"
# Above this exposure (systemd-analyze security, 0-100: 11 means "1.1 OK") the sandbox regressed.
EXPOSURE_THRESHOLD = 20


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists, in order (keys repeat: Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


UNIT_SECTIONS = parse_unit(UNIT.read_text())


def values(section: str, key: str) -> list[str]:
    return [value for name, value in UNIT_SECTIONS[section] if name == key]


def one_bridge_program() -> Path:
    """The one-bridge console script of the Python running the tests (the venv's)."""
    program = Path(sys.executable).parent / "one-bridge"
    if not program.is_file():
        pytest.fail(f"{program} missing: install the project (pip install -e '.[test]')")
    return program


@pytest.fixture
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip(
            "systemd-analyze not found: install Debian's `systemd` package"
            " (apt-get install systemd; it works without systemd running)"
        )
    return path


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart naming this venv's one-bridge, which exists here: verify checks
    that the program is executable, and /opt/one-bridge/venv is the install layout, not this
    machine's. Same file name, so the unit's name stays one-bridge.service."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_PROGRAM} " in text
    copy = tmp_path / "unit" / UNIT.name
    copy.parent.mkdir()
    copy.write_text(
        text.replace(f"ExecStart={INSTALLED_PROGRAM} ", f"ExecStart={one_bridge_program()} ")
    )
    return copy


def test_unit_passes_systemd_analyze_verify(systemd_analyze, runnable_unit):
    """No error and no warning about the unit (unknown keys are only warnings: exit code 0)."""
    result = subprocess.run(
        [systemd_analyze, "verify", str(runnable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    about_unit = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if UNIT.name in line or str(runnable_unit.parent) in line
    ]
    assert result.returncode == 0 and not about_unit, result.stdout + result.stderr


def test_unit_sandbox_exposure_stays_low(systemd_analyze, runnable_unit):
    """systemd-analyze security rates the sandbox at most 2.0 ("OK")."""
    result = subprocess.run(
        [
            systemd_analyze,
            "security",
            "--offline=true",
            f"--threshold={EXPOSURE_THRESHOLD}",
            "--no-pager",
            str(runnable_unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_unit_is_notify_with_watchdog_and_fits_the_stop_budget():
    """Type=notify with the main process notifying, a watchdog, and the drain (shutdown +
    confirm flush 5 s + close 2 s, STYLE.md section 6) well inside TimeoutStopSec."""
    assert values("Service", "Type") == ["notify"]
    assert values("Service", "NotifyAccess") == ["main"]
    assert values("Service", "WatchdogSec") == ["30"]
    assert values("Service", "TimeoutStopSec") == ["30"]
    assert values("Service", "ExecStart") == [
        f"{INSTALLED_PROGRAM} run --config {INSTALLED_CONFIG}"
    ]
    shutdown = tomllib.loads(UNIT_CONFIG.read_text())["receiver"]["shutdown_timeout_seconds"]
    assert shutdown + 5 + 2 < 30


def test_unit_config_holds_no_secret():
    """The broker URL and passwords come only through the credentials directory."""
    data = tomllib.loads(UNIT_CONFIG.read_text())
    assert "url" not in data.get("broker", {})
    assert all("passwords" not in tenant for tenant in data.get("tenants", {}).values())


def expand(value: str, *, credentials: Path, state: Path) -> str:
    """The unit's specifiers this test stands in for: %d and %S (no others are used)."""
    expanded = value.replace("%d", str(credentials)).replace("%S", str(state))
    assert "%" not in expanded, f"unexpected specifier in {value!r}"
    return expanded


@pytest.mark.system
def test_bridge_runs_as_the_unit_runs_it(tmp_path, start_bridge, bridge_env):
    """The unit's command line, Environment= lines (%d, %S expanded) and LoadCredential= files
    in $CREDENTIALS_DIRECTORY: the bridge becomes ready through its spool without a broker,
    accepts a callback with the credential's password, and stops with exit code 0."""
    credentials = tmp_path / "credentials"
    state = tmp_path / "state"
    credentials.mkdir(mode=0o700)
    # StateDirectory=one-bridge: systemd creates it before starting the service.
    for name in values("Service", "StateDirectory"):
        (state / name).mkdir(mode=0o700, parents=True)

    # LoadCredential=ID:PATH: the service sees the file as $CREDENTIALS_DIRECTORY/ID.
    test_env, receiver_port, ops_port = bridge_env
    broker_url = test_env["BRIDGE_BROKER__URL"]  # a closed port: no broker
    password = "unit-test-password"
    secrets = {"broker-url": broker_url + "\n", "klient-passwords": password + "\nold-one\n"}
    for credential in values("Service", "LoadCredential"):
        name = credential.partition(":")[0]
        assert name in secrets, f"the test has no content for credential {name}"
        path = credentials / name
        path.write_text(secrets[name])
        path.chmod(0o400)

    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    for line in values("Service", "Environment"):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = expand(value, credentials=credentials, state=state)
    assert set(env) >= {"BRIDGE_BROKER__URL_FILE", "BRIDGE_TENANTS__KLIENT__PASSWORDS_FILE"}
    # The only departures from the unit: loopback, on ports that are free on this machine.
    env |= {
        "BRIDGE_RECEIVER__HOST": "127.0.0.1",
        "BRIDGE_RECEIVER__PORT": str(receiver_port),
        "BRIDGE_OPS__PORT": str(ops_port),
    }

    # ExecStart, with the install layout's paths mapped onto this checkout.
    installed_config = tmp_path / "etc" / "bridge.toml"
    installed_config.parent.mkdir()
    shutil.copyfile(UNIT_CONFIG, installed_config)
    argv = shlex.split(values("Service", "ExecStart")[0])
    assert argv[0] == INSTALLED_PROGRAM and INSTALLED_CONFIG in argv
    argv = [
        str(one_bridge_program())
        if arg == INSTALLED_PROGRAM
        else str(installed_config)
        if arg == INSTALLED_CONFIG
        else arg
        for arg in argv
    ]

    bridge = start_bridge(argv, env, ops_url=f"http://127.0.0.1:{ops_port}", cwd=tmp_path)
    bridge.wait_ready()

    body = (CASES / "documented-example-cartopened.body.json").read_bytes()
    request = urllib.request.Request(
        f"http://127.0.0.1:{receiver_port}/one/klient/events",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"one:{password}".encode()).decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        assert json.loads(response.read())["status"] == "spooled"
    spool = state / "one-bridge" / "spool"
    assert spool.is_dir() and any(spool.iterdir()), "the spool is not in the StateDirectory"

    assert bridge.terminate() == 0, bridge.log_text()
    assert password not in bridge.log_text() and "guest:guest" not in bridge.log_text()


SECCOMP_EXEC = Path(__file__).resolve().parent / "seccomp_exec.py"


@pytest.fixture
def seccomp_python(systemd_analyze) -> str:
    """Debian's system Python with python3-seccomp: it installs the filter, then execs."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None or subprocess.run([python, "-c", "import seccomp"], check=False).returncode:
        pytest.skip(
            "python3-seccomp not found for /usr/bin/python3: install Debian's `python3-seccomp`"
            " package to run the bridge under the unit's system call filter"
        )
    return python


@pytest.mark.system
def test_bridge_serves_under_the_units_system_call_filter(seccomp_python, start_bridge, bridge_env):
    """The unit's SystemCallFilter= lines and MemoryDenyWriteExecute=yes, applied with
    libseccomp: the bridge starts, spools a callback (SQLite, fsync, threads) and stops with
    exit code 0, so no system call or W+X mapping it needs is refused."""
    assert values("Service", "SystemCallErrorNumber") == ["EPERM"]
    assert values("Service", "SystemCallArchitectures") == ["native"]
    argv = [seccomp_python, str(SECCOMP_EXEC)]
    for line in values("Service", "SystemCallFilter"):
        flag, names = ("--deny", line[1:]) if line.startswith("~") else ("--allow", line)
        for name in names.split():
            argv += [flag, name]
    if values("Service", "MemoryDenyWriteExecute") == ["yes"]:
        argv.append("--mdwe")
    env, receiver_port, ops_port = bridge_env
    argv += ["--", str(one_bridge_program()), "run"]

    bridge = start_bridge(argv, env, ops_url=f"http://127.0.0.1:{ops_port}")
    bridge.wait_ready()
    body = (CASES / "documented-example-cartopened.body.json").read_bytes()
    request = urllib.request.Request(
        f"http://127.0.0.1:{receiver_port}/one/klient/events",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(b"one:deploy-test-password").decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["status"] == "spooled"
    assert bridge.terminate() == 0, bridge.log_text()
    assert "seccomp_exec: " in bridge.log_text() and "mdwe=True" in bridge.log_text()
