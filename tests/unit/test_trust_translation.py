"""What a tenant's Service may not make the control plane do (issue 10, points 4 and 5): take over
or redirect another namespace's clusters with `xds.dev/cluster-patch`, or send the proxy's traffic
to its own node (loopback, link-local, unspecified addresses). Each refusal names the object and
the field, and the rest of the Service and of the mesh is still served."""

from __future__ import annotations

import json

import pytest

from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds.config import Settings
from xds.model import (
    Endpoint,
    EndpointGroup,
    EndpointPort,
    Mesh,
    Service,
    ServiceEntry,
    ServicePort,
)
from xds.resources import CLUSTER, ENDPOINT, ROUTE
from xds.translate import (
    CLUSTER_PATCH_ANNOTATION,
    CONNECT_TIMEOUT_ANNOTATION,
    LB_POLICY_ANNOTATION,
    MAX_CLUSTER_PATCH_CHARS,
    PATCHABLE_CLUSTER_FIELDS,
    Translation,
    decode,
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


def mesh(*entries: ServiceEntry) -> Mesh:
    return Mesh({e.service.key: e for e in entries})


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
