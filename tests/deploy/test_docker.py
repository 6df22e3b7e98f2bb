"""deploy/docker: the Dockerfile lints clean, compose.yaml matches the compose specification,
and what they ship is what the bridge needs. (No Docker engine here: nothing is built or run.)"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from bridge import config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
BRIDGE_SERVICE = COMPOSE["services"]["bridge"]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = (DOCKERFILE.read_text()).replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def runtime_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_dockerfile_passes_hadolint(tool):
    """hadolint reports nothing, not even style or info findings."""
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_runtime_image_runs_the_bridge_as_10001():
    """Non-root user, the two ports, the spool volume, exec-form entry point and command, and a
    health check that needs nothing but Python."""
    runtime = dict(runtime_stage())
    assert runtime["USER"] == "10001:10001"
    assert runtime["EXPOSE"].split() == ["8080", "9102"]
    assert runtime["VOLUME"] == '["/var/lib/one-bridge"]'
    assert runtime["ENTRYPOINT"] == '["one-bridge"]'
    assert runtime["CMD"] == '["run", "--config", "/etc/one-bridge/bridge.toml"]'
    healthcheck = runtime["HEALTHCHECK"]
    assert '"python", "-c"' in healthcheck and "urllib.request" in healthcheck
    assert "127.0.0.1:9102/healthz" in healthcheck
    stages = [arguments for keyword, arguments in instructions() if keyword == "FROM"]
    assert len(stages) == 2, "multi-stage: a builder and a runtime"
    assert all(stage.startswith("${PYTHON_IMAGE}") for stage in stages)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    # Build tools stay in the builder: the runtime stage installs no packages.
    for keyword, arguments in runtime_stage():
        if keyword == "RUN":
            assert "apt-get" not in arguments and "pip " not in arguments


def test_dockerignore_keeps_what_the_dockerfile_copies():
    """Dockerfile.dockerignore excludes everything but each COPY source from the context."""
    patterns = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    kept = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    for keyword, arguments in instructions():
        if keyword == "COPY" and "--from=" not in arguments:
            *sources, _ = shlex.split(arguments)
            for source in sources:
                assert source.rstrip("/").removeprefix("./") in kept, source
                assert (ROOT / source).exists(), source


def test_compose_file_matches_the_compose_specification(tool):
    """check-jsonschema with its vendored compose-spec schema."""
    result = subprocess.run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DOCKER / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_builds_the_bridge_from_the_repository():
    """Context ../.. (the repository), the Dockerfile by its path there; the four services."""
    assert set(COMPOSE["services"]) == {"bridge", "rabbitmq", "prometheus", "grafana"}
    build = BRIDGE_SERVICE["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert COMPOSE["services"]["rabbitmq"]["image"] == "rabbitmq:3-management"


def test_compose_mounts_files_that_exist():
    """Every relative bind mount and secret file under deploy/docker exists."""
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name}: {source}"
    for name, secret in COMPOSE["secrets"].items():
        assert (DOCKER / secret["file"]).is_file(), name


def test_prometheus_scrapes_the_bridge_ops_port():
    """prometheus.yml targets the compose service's ops listener."""
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = [
        target
        for job in scrape["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert "bridge:9102" in targets


def test_grafana_provisions_the_datasource_and_the_dashboard_directory():
    """The datasource points at the compose Prometheus; the dashboards provider reads the
    directory compose mounts deploy/grafana/ on."""
    provisioning = DOCKER / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "one-bridge.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = COMPOSE["services"]["grafana"]["volumes"]
    assert f"../grafana:{path}:ro" in mounts


def test_compose_config_and_secrets_make_a_valid_config(tmp_path, monkeypatch):
    """deploy/docker/bridge.toml with the compose secrets as the files it names loads, and
    points at the compose broker; the ports are the published ones."""
    text = (DOCKER / "bridge.toml").read_text()
    for name, secret in COMPOSE["secrets"].items():
        assert f"/run/secrets/{name}" in text
        text = text.replace(f"/run/secrets/{name}", str((DOCKER / secret["file"]).resolve()))
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    for name, value in BRIDGE_SERVICE.get("environment", {}).items():
        monkeypatch.setenv(name, str(value))
    loaded = config.load(path)
    assert loaded.broker.url.get_secret_value().startswith("amqp://bridge:")
    assert "@rabbitmq:5672/" in loaded.broker.url.get_secret_value()
    assert loaded.ops.host == "0.0.0.0"
    published = {port.rsplit(":", 1)[1] for port in BRIDGE_SERVICE["ports"]}
    assert published == {str(loaded.receiver.port), str(loaded.ops.port)}
    rabbitmq = COMPOSE["services"]["rabbitmq"]["environment"]
    assert loaded.broker.url.get_secret_value() == (
        f"amqp://{rabbitmq['RABBITMQ_DEFAULT_USER']}:{rabbitmq['RABBITMQ_DEFAULT_PASS']}"
        "@rabbitmq:5672/"
    )


@pytest.mark.timeout(300)
def test_wheel_holds_every_module_of_the_package(tmp_path):
    """The image (and a venv install) get the package from its wheel, built as the Dockerfile
    builds it from the same files: every module under bridge/ must be in it, subpackages too."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, context / name)
    shutil.copytree(
        ROOT / "bridge", context / "bridge", ignore=shutil.ignore_patterns("__pycache__")
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = tmp_path.glob("one_bridge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.endswith(".py")}
    expected = {path.relative_to(context).as_posix() for path in (context / "bridge").rglob("*.py")}
    assert not expected - packed, (
        f"missing from the wheel: {sorted(expected - packed)}"
        " (pyproject.toml [tool.setuptools] packages must list every subpackage)"
    )


def test_prometheus_config_passes_promtool(tmp_path):
    """promtool check config, with the rules file where compose mounts it mapped to the repo."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: Debian's `prometheus` package provides it")
    text = (DOCKER / "prometheus.yml").read_text()
    for volume in COMPOSE["services"]["prometheus"]["volumes"]:
        source, _, target = volume.removesuffix(":ro").partition(":")
        if source.startswith("../"):
            text = text.replace(target, str((DOCKER / source).resolve()))
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(text)
    result = subprocess.run(
        [promtool, "check", "config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
