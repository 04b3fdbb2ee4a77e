"""What a tenant's Service may not make the control plane do (issue 10, points 4 and 5): take over
or redirect another namespace's clusters with `xds.dev/cluster-patch`, or send the proxy's traffic
to its own node (loopback, link-local, unspecified addresses). Each refusal names the object and
the field, and the rest of the Service and of the mesh is still served."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from tests.unit.test_translate import mesh
from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds.bootstrap import bootstrap
from xds.cache import Snapshot
from xds.cli import main
from xds.config import Settings
from xds.model import (
    Endpoint,
    EndpointGroup,
    EndpointPort,
    Service,
    ServiceEntry,
    ServicePort,
)
from xds.resources import CLUSTER, ENDPOINT, ROUTE, decode
from xds.translate import (
    CLUSTER_PATCH_ANNOTATION,
    CONNECT_TIMEOUT_ANNOTATION,
    LB_POLICY_ANNOTATION,
    MAX_CLUSTER_PATCH_CHARS,
    PATCHABLE_CLUSTER_FIELDS,
    Translation,
    Translator,
    translate,
)

PATCH_FIELD = f'metadata.annotations["{CLUSTER_PATCH_ANNOTATION}"]'
EVERYWHERE = Settings(cluster_patch_namespaces=("*",))


def service(
    name: str, namespace: str, annotations: dict[str, str] | None = None, **kw: object
) -> Service:
    return Service(
        namespace,
        name,
        (ServicePort(80, "http", "http"),),
        annotations=tuple(sorted((annotations or {}).items())),
        **kw,  # type: ignore[arg-type]
    )


def slice_of(namespace: str, *addresses: str) -> EndpointGroup:
    return EndpointGroup(
        f"EndpointSlice {namespace}/slice",
        (EndpointPort(8080, "http"),),
        tuple(Endpoint(a) for a in addresses),
    )


def victim() -> ServiceEntry:
    return ServiceEntry(service("victim", "team-b"), (slice_of("team-b", "10.2.0.1"),))


def attacker(patch: object) -> ServiceEntry:
    text = patch if isinstance(patch, str) else json.dumps(patch)
    return ServiceEntry(
        service("attacker", "team-a", {CLUSTER_PATCH_ANNOTATION: text}),
        (slice_of("team-a", "10.1.0.1"),),
    )


def cluster(out: Translation, name: str) -> cluster_pb2.Cluster:
    message = decode(out.resources[CLUSTER][name])
    assert isinstance(message, cluster_pb2.Cluster)
    return message


def endpoints(out: Translation, name: str) -> list[str]:
    assignment = decode(out.resources[ENDPOINT][name])
    return [
        lb.endpoint.address.socket_address.address
        for locality in assignment.endpoints  # type: ignore[attr-defined]
        for lb in locality.lb_endpoints
    ]


def assert_both_served_as_written(out: Translation) -> None:
    """The victim's cluster is its own, and the attacker's is unpatched and still served."""
    assert set(out.resources[CLUSTER]) == {"team-a/attacker:http", "team-b/victim:http"}
    for name, address in (("team-b/victim:http", "10.2.0.1"), ("team-a/attacker:http", "10.1.0.1")):
        served = cluster(out, name)
        assert served.name == name
        assert served.type == cluster_pb2.Cluster.EDS
        assert served.eds_cluster_config.service_name == name
        assert not served.HasField("load_assignment") and not served.HasField("transport_socket")
        assert endpoints(out, name) == [address]
    assert cluster(out, "team-a/attacker:http") == cluster(
        translate(mesh(attacker({})), EVERYWHERE), "team-a/attacker:http"
    )
    assert set(decode(out.resources[ROUTE]["http:80"]).virtual_hosts[0].domains) >= {  # type: ignore[attr-defined]
        "attacker.team-a"
    }


def test_the_hijack_patch_is_refused_and_the_victim_keeps_its_cluster():
    """The tester's attack: a patch naming another namespace's cluster took it over."""
    patch = {
        "name": "team-b/victim:http",
        "edsClusterConfig": {"serviceName": "team-a/attacker:http"},
        "connectTimeout": "2s",
    }
    out = translate(mesh(victim(), attacker(patch)), EVERYWHERE)
    assert_both_served_as_written(out)
    fields = {p.field for p in out.problems if p.object == "Service team-a/attacker"}
    assert fields == {f"{PATCH_FIELD}.name", f"{PATCH_FIELD}.edsClusterConfig"}
    assert all(p.severity == "error" and "ignored" in p.message for p in out.problems)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "team-b/victim:http"),
        ("altStatName", "team-b/victim:http"),
        ("type", "STATIC"),  # STATIC is the enum's zero: present only through its oneof
        ("type", "STRICT_DNS"),
        ("clusterType", {"name": "envoy.clusters.aggregate"}),
        ("eds_cluster_config", {"serviceName": "team-b/victim:http"}),
        ("edsClusterConfig", {"serviceName": "team-b/victim:http"}),
        (
            "loadAssignment",
            {
                "clusterName": "team-a/attacker:http",
                "endpoints": [
                    {
                        "lbEndpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socketAddress": {"address": "10.2.0.1", "portValue": 8080}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        ),
        (
            "transportSocket",
            {
                "name": "envoy.transport_sockets.tls",
                "typedConfig": {
                    "@type": "type.googleapis.com/google.protobuf.Empty",
                },
            },
        ),
        ("transportSocketMatches", [{"name": "m"}]),
        ("metadata", {"filterMetadata": {"envoy.transport_socket_match": {"tls": True}}}),
        ("healthChecks", [{"timeout": "1s", "interval": "1s", "eventLogPath": "/etc/passwd"}]),
        ("typedExtensionProtocolOptions", {}),
        ("lrsServer", {"ads": {}}),
        ("upstreamBindConfig", {"sourceAddress": {"address": "127.0.0.1", "portValue": 0}}),
        ("lbPolicy", "MAGLEV"),
        ("dnsResolvers", [{"socketAddress": {"address": "127.0.0.1", "portValue": 53}}]),
    ],
)
def test_fields_outside_the_allow_list_are_refused_by_name(key: str, value: object):
    out = translate(mesh(victim(), attacker({key: value, "connectTimeout": "3s"})), EVERYWHERE)
    assert [(p.severity, p.object, p.field) for p in out.problems] == [
        ("error", "Service team-a/attacker", f"{PATCH_FIELD}.{key}")
    ]
    assert "may not be patched" in out.problems[0].message
    # The whole patch is ignored (connectTimeout too), the rest of the Service served as written.
    assert cluster(out, "team-a/attacker:http").connect_timeout.seconds == 1
    assert_both_served_as_written(out)


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        ("{nope", "", "is not JSON"),
        ("[1, 2]", "", "must be a JSON object"),
        ('"name"', "", "must be a JSON object"),
        ("[" * 5000 + "]" * 5000, "", "characters long"),
        ("[" * 4000 + "]" * 4000, "", "is not JSON"),  # deeper than Python's recursion limit
        ({"nameOfTheCluster": "x"}, ".nameOfTheCluster", "is not a field"),
        ({"outlierDetection": {"consecutive5xx": "many"}}, "", "not a valid"),
        (
            {
                "outlierDetection": {
                    "monitors": [
                        {
                            "name": "m",
                            "typedConfig": {
                                "@type": "type.googleapis.com/envoy.extensions."
                                "load_balancing_policies.round_robin.v3.RoundRobin"
                            },
                        }
                    ]
                }
            },
            ".outlierDetection.monitors[0]",
            "typed extension config",
        ),
    ],
)
def test_a_patch_that_is_not_plain_allowed_cluster_fields_is_refused(
    patch: object, field: str, words: str
):
    out = translate(mesh(victim(), attacker(patch)), EVERYWHERE)
    [problem] = out.problems
    assert (problem.object, problem.field) == ("Service team-a/attacker", PATCH_FIELD + field)
    assert words in problem.message
    assert len(problem.message) < 1000  # a huge value is not quoted whole
    assert_both_served_as_written(out)


def test_patches_are_off_unless_enabled_for_the_namespace():
    patch = {"outlierDetection": {"consecutive5xx": 3}}
    for settings in (Settings(), Settings(cluster_patch_namespaces=("team-b", "team-c"))):
        out = translate(mesh(victim(), attacker(patch)), settings)
        [problem] = out.problems
        assert (problem.object, problem.field) == ("Service team-a/attacker", PATCH_FIELD)
        assert "--allow-cluster-patch team-a" in problem.message
        assert not cluster(out, "team-a/attacker:http").HasField("outlier_detection")
        assert_both_served_as_written(out)
    for allowed in (("team-a",), ("*",)):
        out = translate(mesh(victim(), attacker(patch)), Settings(cluster_patch_namespaces=allowed))
        assert out.problems == ()
        assert cluster(out, "team-a/attacker:http").outlier_detection.consecutive_5xx.value == 3
        assert not cluster(out, "team-b/victim:http").HasField("outlier_detection")


def test_traffic_policy_fields_are_merged():
    patch = {
        "connectTimeout": "0.250s",
        "perConnectionBufferLimitBytes": 65536,
        "circuitBreakers": {"thresholds": [{"maxConnections": 10, "maxRequests": 20}]},
        "outlier_detection": {"consecutive5xx": 3, "baseEjectionTime": "10s"},
        "commonLbConfig": {"healthyPanicThreshold": {"value": 20}},
        "upstreamConnectionOptions": {"tcpKeepalive": {"keepaliveTime": 30}},
        "ignoreHealthOnHostRemoval": True,
    }
    out = translate(mesh(victim(), attacker(patch)), EVERYWHERE)
    assert out.problems == ()
    patched = cluster(out, "team-a/attacker:http")
    assert patched.connect_timeout.nanos == 250_000_000
    assert patched.per_connection_buffer_limit_bytes.value == 65536
    assert patched.circuit_breakers.thresholds[0].max_requests.value == 20
    assert patched.outlier_detection.base_ejection_time.seconds == 10
    assert patched.common_lb_config.healthy_panic_threshold.value == 20
    assert patched.upstream_connection_options.tcp_keepalive.keepalive_time.value == 30
    assert patched.ignore_health_on_host_removal
    # What it is and where it sends traffic are this control plane's.
    assert patched.name == "team-a/attacker:http"
    assert patched.eds_cluster_config.service_name == "team-a/attacker:http"


def test_every_patchable_field_is_a_cluster_field():
    names = {f.name for f in cluster_pb2.Cluster.DESCRIPTOR.fields}
    assert names >= PATCHABLE_CLUSTER_FIELDS
    assert not PATCHABLE_CLUSTER_FIELDS & {
        "name",
        "alt_stat_name",
        "type",
        "cluster_type",
        "eds_cluster_config",
        "load_assignment",
        "transport_socket",
        "transport_socket_matches",
        "metadata",
        "typed_extension_protocol_options",
        "health_checks",
    }


@pytest.mark.parametrize(
    ("annotation", "value", "words"),
    [
        (CONNECT_TIMEOUT_ANNOTATION, "1" * 400 + "s", "characters long"),
        (CONNECT_TIMEOUT_ANNOTATION, "1" * 60 + "s", "is not in"),  # once a crash of the run
        (CONNECT_TIMEOUT_ANNOTATION, "99999999999999999999s", "is not in"),
        (CONNECT_TIMEOUT_ANNOTATION, "0ms", "is not in"),
        (CONNECT_TIMEOUT_ANNOTATION, "fast", "is not a duration"),
        (LB_POLICY_ANNOTATION, "x" * 100_000, "characters long"),
        (LB_POLICY_ANNOTATION, "FASTEST", "is not one of"),
    ],
)
def test_other_annotations_are_bounded_and_never_fail_the_translation(
    annotation: str, value: str, words: str
):
    bad = ServiceEntry(
        service("a", "team-a", {annotation: value}), (slice_of("team-a", "10.1.0.1"),)
    )
    out = translate(mesh(victim(), bad), Settings())
    [problem] = out.problems
    assert (problem.object, problem.field) == (
        "Service team-a/a",
        f'metadata.annotations["{annotation}"]',
    )
    assert words in problem.message and len(problem.message) < 200
    served = cluster(out, "team-a/a:http")
    assert served.connect_timeout.seconds == 1  # the default, kept
    assert endpoints(out, "team-a/a:http") == ["10.1.0.1"]
    assert endpoints(out, "team-b/victim:http") == ["10.2.0.1"]


def test_patch_size_bound_is_checked_before_parsing():
    patch = json.dumps({"outlierDetection": {"consecutive5xx": 3}})
    padded = patch[:-1] + " " * (MAX_CLUSTER_PATCH_CHARS - len(patch)) + "}"
    out = translate(mesh(attacker(padded)), EVERYWHERE)
    assert out.problems == ()
    out = translate(mesh(attacker(padded + " ")), EVERYWHERE)
    [problem] = out.problems
    assert "characters long" in problem.message


# --- Point 5: no route to the proxy's own node. ---

LOCAL = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: Linux connects to 127.0.0.1
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("fe80::1", "link-local"),
    ("::ffff:169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
]


def web(*groups: EndpointGroup, namespace: str = "team-a") -> ServiceEntry:
    return ServiceEntry(service("web", namespace), groups)


@pytest.mark.parametrize(("address", "kind"), LOCAL)
def test_endpoints_on_the_proxys_own_node_are_refused_and_the_rest_served(address: str, kind: str):
    out = translate(
        mesh(victim(), web(slice_of("team-a", "10.1.0.1", address, "10.1.0.2"))), Settings()
    )
    [problem] = out.problems
    assert (problem.severity, problem.object, problem.field) == (
        "error",
        "EndpointSlice team-a/slice",
        "endpoints[1].addresses[0]",
    )
    assert f"'{address}' is a{'n' if kind[0] == 'u' else ''} {kind} address" in problem.message
    assert "Service team-a/web" in problem.message and "--allow-endpoints" in problem.message
    assert endpoints(out, "team-a/web:http") == ["10.1.0.1", "10.1.0.2"]
    assert endpoints(out, "team-b/victim:http") == ["10.2.0.1"]
    assert "team-a/web:http" in out.resources[CLUSTER]


def test_ordinary_addresses_are_not_refused():
    addresses = ("10.0.0.1", "192.168.1.1", "172.16.0.1", "100.64.0.1", "fd00::1", "2001:db8::1")
    out = translate(mesh(web(slice_of("team-a", *addresses))), Settings())
    assert out.problems == ()
    assert sorted(endpoints(out, "team-a/web:http")) == sorted(addresses)


def test_an_allowance_lets_a_range_through_and_nothing_else():
    settings = Settings(allowed_endpoint_ranges=("127.0.0.2/32", "169.254.10.0/24"))
    group = slice_of("team-a", "127.0.0.2", "127.0.0.1", "169.254.10.7", "169.254.169.254", "::1")
    out = translate(mesh(web(group)), settings)
    assert endpoints(out, "team-a/web:http") == ["127.0.0.2", "169.254.10.7"]
    assert [p.field for p in out.problems] == [
        "endpoints[1].addresses[0]",
        "endpoints[3].addresses[0]",
        "endpoints[4].addresses[0]",
    ]
    # An IPv4 allowance covers the IPv4-mapped form too.
    out = translate(mesh(web(slice_of("team-a", "::ffff:127.0.0.2"))), settings)
    assert out.problems == ()


def test_refusals_name_the_field_in_the_object_as_written(tmp_path: Path):
    """Through the manifest source: an EndpointSlice's endpoints, and an Endpoints object's
    subsets with ready and not-ready addresses."""
    from xds.sources.files import ManifestSource

    (tmp_path / "mesh.yaml").write_text(
        """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: team-a}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: team-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.1.0.1]}
- {addresses: [127.0.0.1]}
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: team-a}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: old, namespace: team-a}
subsets:
- addresses: [{ip: 10.1.0.3}]
  ports: [{name: http, port: 8080}]
- addresses: [{ip: 10.1.0.4}, {ip: 169.254.169.254}]
  notReadyAddresses: [{ip: 10.1.0.5}, {ip: 127.0.0.9}]
  ports: [{name: http, port: 8080}]
"""
    )
    source = ManifestSource([tmp_path])
    source.reload()
    assert list(source.problems()) == []
    out = translate(source.mesh(), Settings())
    assert [(p.object, p.field) for p in out.problems] == [
        ("Endpoints team-a/old", "subsets[1].addresses[1].ip"),
        ("Endpoints team-a/old", "subsets[1].notReadyAddresses[1].ip"),
        ("EndpointSlice team-a/web-1", "endpoints[1].addresses[0]"),
    ]
    assert endpoints(out, "team-a/old:http") == ["10.1.0.3", "10.1.0.4"]
    assert endpoints(out, "team-a/web:http") == ["10.1.0.1"]


def external(target: str, name: str = "alias") -> ServiceEntry:
    return ServiceEntry(service(name, "team-a", type="ExternalName", external_name=target))


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1",
        "127.1",  # what inet_aton, and so many resolvers, read as 127.0.0.1
        "2130706433",
        "0x7f.1",
        "0x7f000001",
        "0",
        "0.0.0.0",
        "169.254.169.254",
        "localhost",
        "LocalHost.",
        "localhost.localdomain",
        "ip6-localhost",
        "anything.localhost",
    ],
)
def test_external_names_on_the_proxys_own_node_are_refused(target: str):
    out = translate(mesh(victim(), external(target)), Settings())
    [problem] = out.problems
    assert (problem.severity, problem.object, problem.field) == (
        "error",
        "Service team-a/alias",
        "spec.externalName",
    )
    assert "--allow-endpoints" in problem.message
    # The cluster stays (routes name it) with no host to send anything to: an EDS cluster with
    # an empty assignment, which gRPC's clients accept as well as Envoy.
    refused = cluster(out, "team-a/alias:http")
    assert refused.type == cluster_pb2.Cluster.EDS
    assert endpoints(out, "team-a/alias:http") == []
    assert "alias.team-a" in {
        d
        for v in decode(out.resources[ROUTE]["http:80"]).virtual_hosts
        for d in v.domains  # type: ignore[attr-defined]
    }
    assert endpoints(out, "team-b/victim:http") == ["10.2.0.1"]
    assert Snapshot.build(out.resources).inconsistencies() == []


@pytest.mark.parametrize("target", ["example.com", "10.0.0.1", "db.example.com.", "localhost-db"])
def test_other_external_names_are_served(target: str):
    out = translate(mesh(external(target)), Settings())
    assert out.problems == ()
    served = cluster(out, "team-a/alias:http")
    assert served.type == cluster_pb2.Cluster.LOGICAL_DNS
    [locality] = served.load_assignment.endpoints
    assert locality.lb_endpoints[0].endpoint.address.socket_address.address == target


def test_allowed_external_names():
    out = translate(
        mesh(external("127.0.0.2")), Settings(allowed_endpoint_ranges=("127.0.0.2/32",))
    )
    assert out.problems == ()
    # localhost may resolve to either loopback address: both must be allowed.
    only_v4 = Settings(allowed_endpoint_ranges=("127.0.0.0/8",))
    [problem] = translate(mesh(external("localhost")), only_v4).problems
    assert "--allow-endpoints 127.0.0.1/32 --allow-endpoints ::1/128" in problem.message
    both = Settings(allowed_endpoint_ranges=("127.0.0.0/8", "::1/128"))
    assert translate(mesh(external("localhost")), both).problems == ()


def test_incremental_translation_refuses_like_a_whole_one():
    translator = Translator(Settings(allowed_endpoint_ranges=("127.0.0.2/32",)))
    steps = [
        mesh(victim(), web(slice_of("team-a", "127.0.0.2"))),
        mesh(victim(), web(slice_of("team-a", "127.0.0.2", "127.0.0.1"))),
        mesh(victim(), web(slice_of("team-a", "127.0.0.1")), external("localhost")),
        mesh(victim(), web(slice_of("team-a", "127.0.0.2")), external("127.0.0.2")),
    ]
    previous = steps[0]
    translator.translate(previous)
    for step in steps[1:]:
        derived = previous.derive(dict(step.entries))
        for key in previous.keys:
            if key not in step:
                derived = derived.derive({key: None})
        incremental = translator.translate(derived)
        whole = Translator(translator.settings).translate(step)
        assert incremental.problems == whole.problems
        assert {u: dict(r) for u, r in incremental.resources.items()} == {
            u: dict(r) for u, r in whole.resources.items()
        }
        previous = step


@pytest.mark.parametrize("cidr", ["127.0.0.1/8", "not-a-range", "127.0.0.0/33", ""])
def test_a_bad_allowance_is_a_usage_error(cidr: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(ValueError, match="CIDR"):
        Settings(allowed_endpoint_ranges=(cidr,))
    assert main(["translate", "--manifests", "-", "--allow-endpoints", cidr]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("xds translate: error: argument --allow-endpoints:") and err.count("\n") == 1
    )


def test_the_cli_passes_both_allowances():
    from xds.cli import _settings, build_parser

    args = build_parser().parse_args(
        [
            "serve", "--manifests", ".",
            "--allow-endpoints", "127.0.0.2/32", "--allow-endpoints", "::1",
            "--allow-cluster-patch", "team-a", "--allow-cluster-patch", "team-b",
        ]
    )  # fmt: skip
    settings = _settings(args)
    assert settings.allowed_endpoint_ranges == ("127.0.0.2/32", "::1/128")
    assert settings.cluster_patch_namespaces == ("team-a", "team-b")
    defaults = _settings(build_parser().parse_args(["translate", "--manifests", "."]))
    assert defaults.allowed_endpoint_ranges == () and defaults.cluster_patch_namespaces == ()


def test_generated_bootstraps_keep_envoys_admin_on_loopback():
    config = bootstrap(node_id="n", xds_address="10.0.0.1:18000")
    address = config["admin"]["address"]["socket_address"]["address"]
    assert ipaddress.ip_address(address).is_loopback
    assert bootstrap(node_id="n", xds_address="x:1", admin_address="::1")["admin"]
    for exposed in ("0.0.0.0", "10.0.0.1", "::", "envoy.local"):
        with pytest.raises(ValueError, match="loopback"):
            bootstrap(node_id="n", xds_address="10.0.0.1:18000", admin_address=exposed)
