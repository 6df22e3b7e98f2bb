"""deploy/k8s: schema-valid for the Kubernetes versions we target, consistent with itself and
with the bridge's configuration."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import config

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# 1.30: the oldest with the preStop `sleep` handler on by default; None: the newest shipped by
# kubernetes-validate.
KUBERNETES_VERSIONS = ["1.30.0", None]
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


KUSTOMIZATION = load_documents(K8S / "kustomization.yaml")[0]
RESOURCES = {name: load_documents(K8S / name) for name in KUSTOMIZATION["resources"]}
BY_KIND: dict[str, list[dict[str, Any]]] = {}
for _documents in RESOURCES.values():
    for _doc in _documents:
        BY_KIND.setdefault(_doc["kind"], []).append(_doc)


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in BY_KIND[kind] if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


STATEFULSET = only("StatefulSet")
POD = STATEFULSET["spec"]["template"]["spec"]
CONTAINER = POD["containers"][0]
ENV = {item["name"]: item["value"] for item in CONTAINER["env"]}


def core_files() -> list[Path]:
    return [
        K8S / name
        for name, documents in RESOURCES.items()
        if all((doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS for doc in documents)
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS, ids=lambda v: v or "latest")
def test_core_resources_validate_strictly(tool, version):
    """kubernetes-validate --strict: every core resource matches its schema, no unknown field."""
    files = core_files()
    command = [tool("kubernetes-validate"), "--strict"]
    if version:
        command += ["--kubernetes-version", version]
    result = subprocess.run(
        [*command, *map(str, files)], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    documents = sum(len(RESOURCES[file.name]) for file in files)
    assert result.returncode == 0, output
    assert output.count(" passed for resource ") == documents, output
    assert "WARN" not in output and "ERROR" not in output, output


def test_kustomization_lists_every_manifest_and_only_existing_ones():
    """resources: each file exists, none twice, and no manifest in deploy/k8s is left out."""
    assert KUSTOMIZATION["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert KUSTOMIZATION["kind"] == "Kustomization"
    listed = KUSTOMIZATION["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists missing {name}"
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(listed)
    assert {image["name"] for image in KUSTOMIZATION["images"]} == {
        CONTAINER["image"].split(":")[0]
    }


def test_service_monitor_has_the_required_fields_and_selects_the_metrics_service():
    """apiVersion, kind, metadata.name, spec.selector and spec.endpoints[].port, naming a port
    of the Service its selector matches."""
    monitor = only("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints and all(endpoint.get("port") for endpoint in endpoints)
    services = [
        service
        for service in BY_KIND["Service"]
        if selector.items() <= service["metadata"]["labels"].items()
    ]
    assert [service["metadata"]["name"] for service in services] == ["one-bridge-metrics"]
    port_names = {port["name"] for port in services[0]["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in endpoints} <= port_names
    assert all(endpoint.get("path", "/metrics") == "/metrics" for endpoint in endpoints)


def test_services_reach_the_pod_ports():
    """Receiver 8080 and metrics 9102 Services select the pod and name its container ports;
    the StatefulSet's serviceName is the headless Service."""
    pod_labels = STATEFULSET["spec"]["template"]["metadata"]["labels"]
    container_ports = {port["name"]: port["containerPort"] for port in CONTAINER["ports"]}
    assert container_ports == {"http": 8080, "metrics": 9102}
    for service in BY_KIND["Service"]:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert container_ports[port["targetPort"]] == port["port"]
    assert [port["port"] for port in only("Service", "one-bridge")["spec"]["ports"]] == [8080]
    metrics = only("Service", "one-bridge-metrics")["spec"]["ports"]
    assert [port["port"] for port in metrics] == [9102]
    headless = only("Service", STATEFULSET["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert STATEFULSET["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_pod_probes_lifecycle_and_stop_budget():
    """/healthz for liveness, /readyz for readiness, preStop sleeps 5 s, and the drain
    (preStop 5 + shutdown + flush 5 + close 2 s) fits in terminationGracePeriodSeconds."""
    assert CONTAINER["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert CONTAINER["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert CONTAINER["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    toml = tomllib.loads(only("ConfigMap")["data"]["bridge.toml"])
    shutdown = toml["receiver"]["shutdown_timeout_seconds"]
    assert POD["terminationGracePeriodSeconds"] == 30
    assert 5 + shutdown + 5 + 2 < POD["terminationGracePeriodSeconds"]
    assert STATEFULSET["spec"]["replicas"] == 1
    assert STATEFULSET["spec"]["podManagementPolicy"] in ("Parallel", "OrderedReady")


def test_pod_is_locked_down():
    """Non-root 10001, read-only root, no privilege escalation, no capabilities, RuntimeDefault
    seccomp, fsGroup for the volumes; memory bounded."""
    pod = POD["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001 and pod["fsGroup"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = CONTAINER["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"]["drop"] == ["ALL"]
    resources = CONTAINER["resources"]
    assert resources["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert resources["limits"]["memory"] == "256Mi"
    assert POD["automountServiceAccountToken"] is False
    assert POD["enableServiceLinks"] is False


def test_spool_is_on_the_claim_template():
    """The spool directory lies on the volumeClaimTemplates volume, which every replica owns."""
    mounts = {mount["name"]: mount["mountPath"] for mount in CONTAINER["volumeMounts"]}
    templates = [claim["metadata"]["name"] for claim in STATEFULSET["spec"]["volumeClaimTemplates"]]
    assert templates == ["spool"]
    spool_dir = tomllib.loads(only("ConfigMap")["data"]["bridge.toml"])["spool"]["dir"]
    assert Path(spool_dir).is_relative_to(mounts["spool"])
    assert mounts["spool"] == "/var/lib/one-bridge"


def test_network_policy_opens_only_what_the_bridge_uses():
    """In: 8080 (callbacks), 9102 from the monitoring namespace. Out: AMQP, DNS, HTTPS."""
    policy = only("NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress = {port["port"]: rule for rule in policy["ingress"] for port in rule["ports"]}
    assert set(ingress) == {8080, 9102}
    assert ingress[9102]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
    assert egress == {5671, 5672, 53, 443}


def test_configmap_and_pod_environment_make_a_valid_config(tmp_path, monkeypatch):
    """bridge.toml from the ConfigMap with the pod's BRIDGE_* variables, the Secret's keys as
    the files they name: the configuration loads, ops listens on 0.0.0.0, ports agree."""
    secret = only("Secret")
    secret_mount = next(
        mount["mountPath"] for mount in CONTAINER["volumeMounts"] if mount["name"] == "secrets"
    )
    secret_volume = next(volume for volume in POD["volumes"] if volume["name"] == "secrets")
    assert secret_volume["secret"]["secretName"] == secret["metadata"]["name"]
    for key, value in secret["stringData"].items():
        (tmp_path / key).write_text(value)
    path = tmp_path / "bridge.toml"
    path.write_text(only("ConfigMap")["data"]["bridge.toml"])
    for name, value in ENV.items():
        if name.endswith("_FILE"):
            assert value.startswith(secret_mount + "/"), f"{name} is not on the Secret's volume"
            value = str(tmp_path / Path(value).relative_to(secret_mount))
        monkeypatch.setenv(name, value)

    loaded = config.load(path)
    assert loaded.ops.host == "0.0.0.0"
    assert loaded.receiver.port == 8080 and loaded.ops.port == 9102
    assert loaded.tenants["klient"].password_values() == ("CHANGE-ME-callback-password",)
    assert "CHANGE-ME" in loaded.broker.url.get_secret_value()


def test_example_secret_values_are_marked_placeholders():
    """Nobody mistakes the example Secret for a real one."""
    for value in only("Secret")["stringData"].values():
        assert "CHANGE-ME" in value


def test_kustomize_build_renders_valid_resources(tool, tmp_path):
    """`kubectl kustomize` renders the set (namespace applied) into schema-valid resources."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: the kustomize build is checked where kubectl exists")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert built.returncode == 0, built.stderr
    documents = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert len(documents) == sum(len(docs) for docs in RESOURCES.values())
    for doc in documents:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == KUSTOMIZATION["namespace"]
    core = tmp_path / "built.yaml"
    core.write_text(
        yaml.safe_dump_all(
            [doc for doc in documents if (doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS]
        )
    )
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.30.0", str(core)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "WARN" not in result.stdout, result.stdout + result.stderr
