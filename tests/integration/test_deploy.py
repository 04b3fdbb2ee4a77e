"""The kind deployment, checked statically (no cluster runs here): every manifest parses, RBAC is
read-only and exact, the control plane's arguments are ones the CLI accepts, and the node proxies'
bootstrap is the current `xds bootstrap` output, which the real Envoy validates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from xds.cli import build_parser
from xds.local import envoy_validate

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BOOTSTRAP_ARGS = [
    "--node-id", "node-proxy",
    "--xds-address", "xds-control-plane.xds-system.svc.cluster.local:18000",
    "--admin-port", "9901",
    "--otel-collector", "otel-collector.observability.svc.cluster.local:4317",
]  # fmt: skip


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_every_manifest_is_a_kubernetes_object_and_kustomize_lists_them_all():
    documents = manifests()
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= document.keys(), document
        assert document["metadata"]["name"]
    kinds = {d["kind"] for d in documents}
    assert kinds >= {
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "Deployment", "Service", "DaemonSet", "ConfigMap",
    }  # fmt: skip
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_the_control_plane_may_only_read_services_and_endpoints_and_get_nodes():
    role = one("ClusterRole", "xds-control-plane")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        (group, resource, verb)
        for group, resource in (
            ("", "services"), ("", "endpoints"), ("discovery.k8s.io", "endpointslices")
        )
        for verb in ("get", "list", "watch")
    } | {("", "nodes", "get"), ("", "nodes", "list")}  # fmt: skip
    binding = one("ClusterRoleBinding", "xds-control-plane")
    assert binding["roleRef"]["name"] == "xds-control-plane"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "xds-control-plane", "namespace": "xds-system"}
    ]


def test_the_control_plane_deployment_runs_two_replicas_with_arguments_the_cli_accepts():
    deployment = one("Deployment", "xds-control-plane")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "xds-control-plane"
    [container] = pod["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve" and args.kubernetes
    assert args.xds_host == "0.0.0.0"
    # /debug/* stays on loopback; probes reach the health port on the pod's address.
    assert args.admin_host == "127.0.0.1" and args.health_host == "0.0.0.0"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    probes = set()
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert ports[probe["httpGet"]["port"]] == args.health_port != args.admin_port
        probes.add(probe["httpGet"]["path"])
    assert probes == {"/readyz", "/healthz"}
    assert args.tracing_cluster == "otel_collector"


def test_the_node_proxy_bootstrap_is_current_and_envoy_accepts_it(tmp_path: Path):
    current = subprocess.run(
        [sys.executable, "-m", "xds", "bootstrap", *BOOTSTRAP_ARGS],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    carried = one("ConfigMap", "envoy-bootstrap")["data"]["bootstrap.json"]
    assert carried == current, "deploy/03-envoy.yaml is stale: regenerate its bootstrap"
    path = tmp_path / "bootstrap.json"
    path.write_text(carried)
    check = envoy_validate(path)
    assert check.returncode == 0, check.stdout + check.stderr
    daemonset = one("DaemonSet", "envoy")
    [container] = daemonset["spec"]["template"]["spec"]["containers"]
    assert "/etc/envoy/bootstrap.json" in container["args"]
    assert "--service-node" in container["args"]


def test_kind_has_one_control_plane_node_and_two_workers():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert sorted(node["role"] for node in config["nodes"]) == [
        "control-plane", "worker", "worker"
    ]  # fmt: skip
    # Each worker in a zone of its own: node proxies are placed by their Node's labels.
    zones = [n.get("labels", {}).get("topology.kubernetes.io/zone") for n in config["nodes"]]
    assert sorted(z for z in zones if z) == ["zone-a", "zone-b"]
