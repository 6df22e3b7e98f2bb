"""Every deployment YAML file passes yamllint (deploy/.yamllint.yaml), warnings included."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# deploy/prometheus and deploy/grafana have their own owners; add them here once they lint.
LINTED = ["k8s", "docker", "prometheus"]


def yaml_files() -> list[Path]:
    files = sorted(
        path
        for directory in LINTED
        for pattern in ("*.yaml", "*.yml")
        for path in (DEPLOY / directory).rglob(pattern)
    )
    return [DEPLOY / ".yamllint.yaml", *files]


def test_there_is_yaml_to_lint():
    """The glob finds the manifests (an empty list would pass yamllint vacuously)."""
    names = {path.name for path in yaml_files()}
    assert {"kustomization.yaml", "statefulset.yaml", "compose.yaml", "prometheus.yml"} <= names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda path: str(path.relative_to(DEPLOY)))
def test_yaml_passes_yamllint(tool, path):
    """yamllint --strict: no error and no warning."""
    result = subprocess.run(
        [
            tool("yamllint"),
            "--strict",
            "-f",
            "parsable",
            "-c",
            str(DEPLOY / ".yamllint.yaml"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
