"""Translation of model values into Envoy resources: pure, deterministic, incremental."""

from __future__ import annotations

import json

from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds._pb.envoy.config.core.v3 import health_check_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds.cache import Snapshot
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
from xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, decode
from xds.translate import CLUSTER_PATCH_ANNOTATION, LB_POLICY_ANNOTATION, Translator, translate


def service(
    name: str,
    namespace: str = "default",
    ports: tuple[ServicePort, ...] = (ServicePort(80, "http", "web"),),
    cluster_ip: str | None = "10.0.0.1",
    annotations: dict[str, str] | None = None,
    **kwargs: object,
) -> Service:
    return Service(
        namespace,
        name,
        ports,
        cluster_ip=cluster_ip,
        annotations=tuple(sorted((annotations or {}).items())),
        **kwargs,
    )


def group(*addresses: str, port: int = 8080, name: str = "http", **kw: object) -> EndpointGroup:
    return EndpointGroup(
        "EndpointSlice default/x",
        (EndpointPort(port, name),),
        tuple(Endpoint(a, **kw) for a in addresses),
    )


def mesh(*entries: ServiceEntry) -> Mesh:
    return Mesh({e.service.key: e for e in entries})


def test_cluster_is_eds_with_random_then_round_robin():
    out = translate(mesh(ServiceEntry(service("web"), (group("10.1.0.1"),))), Settings())
    cluster = decode(out.resources[CLUSTER]["default/web:http"])
    assert cluster.type == cluster.EDS
    assert cluster.eds_cluster_config.service_name == "default/web:http"
    policies = [p.typed_extension_config.name for p in cluster.load_balancing_policy.policies]
    assert policies == [
        "envoy.load_balancing_policies.random",
        "envoy.load_balancing_policies.round_robin",
    ]
    assert cluster.lb_policy == cluster.ROUND_ROBIN  # the enum's default: not used to say RANDOM
    assert cluster.connect_timeout.seconds == 1


def test_lb_policy_setting_and_annotation_override():
    entries = (
        ServiceEntry(service("a")),
        ServiceEntry(service("b", annotations={LB_POLICY_ANNOTATION: "least_request"})),
    )
    out = translate(mesh(*entries), Settings(lb_policy="ROUND_ROBIN"))
    a = decode(out.resources[CLUSTER]["default/a:http"])
    b = decode(out.resources[CLUSTER]["default/b:http"])
    assert [p.typed_extension_config.name for p in a.load_balancing_policy.policies] == [
        "envoy.load_balancing_policies.round_robin"
    ]
    assert b.load_balancing_policy.policies[0].typed_extension_config.name.endswith("least_request")


def test_bad_annotation_is_an_error_naming_the_field_and_the_default_is_kept():
    out = translate(
        mesh(ServiceEntry(service("a", annotations={LB_POLICY_ANNOTATION: "FASTEST"}))), Settings()
    )
    [problem] = out.problems
    assert problem.object == "Service default/a"
    assert LB_POLICY_ANNOTATION in problem.field
    assert "default/a:http" in out.resources[CLUSTER]


def test_cluster_patch_annotation_is_merged():
    patch = json.dumps({"outlierDetection": {"consecutive5xx": 3}})
    allowed = Settings(cluster_patch_namespaces=("default",))
    out = translate(
        mesh(ServiceEntry(service("a", annotations={CLUSTER_PATCH_ANNOTATION: patch}))), allowed
    )
    assert (
        decode(out.resources[CLUSTER]["default/a:http"]).outlier_detection.consecutive_5xx.value
        == 3
    )
    broken = translate(
        mesh(ServiceEntry(service("a", annotations={CLUSTER_PATCH_ANNOTATION: "{nope"}))),
        allowed,
    )
    assert CLUSTER_PATCH_ANNOTATION in broken.problems[0].field


def test_http2_by_app_protocol_or_port_name():
    ports = (
        ServicePort(80, "http"),
        ServicePort(81, "grpc-api"),
        ServicePort(82, "x", app_protocol="h2c"),
    )
    out = translate(mesh(ServiceEntry(service("a", ports=ports))), Settings())
    options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    by_name = {n: decode(r) for n, r in out.resources[CLUSTER].items()}
    assert options not in by_name["default/a:http"].typed_extension_protocol_options
    assert options in by_name["default/a:grpc-api"].typed_extension_protocol_options
    assert options in by_name["default/a:x"].typed_extension_protocol_options


def test_assignment_has_ready_endpoints_with_resolved_ports_and_draining_terminating():
    groups = (
        group("10.1.0.2", "10.1.0.1", port=9000),
        group("10.1.0.3", ready=False, serving=True, terminating=True, port=9000),
        group("10.1.0.4", ready=False, serving=False, port=9000),
    )
    out = translate(mesh(ServiceEntry(service("web"), groups)), Settings())
    cla = decode(out.resources[ENDPOINT]["default/web:http"])
    seen = [
        (
            e.endpoint.address.socket_address.address,
            e.endpoint.address.socket_address.port_value,
            e.health_status,
        )
        for locality in cla.endpoints
        for e in locality.lb_endpoints
    ]
    assert seen == [
        ("10.1.0.1", 9000, health_check_pb2.HEALTHY),
        ("10.1.0.2", 9000, health_check_pb2.HEALTHY),
        ("10.1.0.3", 9000, health_check_pb2.DRAINING),
    ]


def test_endpoints_without_the_service_port_name_are_an_error_naming_both():
    out = translate(
        mesh(ServiceEntry(service("web"), (group("10.1.0.1", name="metrics"),))), Settings()
    )
    [problem] = out.problems
    assert problem.object == "EndpointSlice default/x"
    assert problem.field == "ports"
    assert "default/web" in problem.message and "'http'" in problem.message
    assert not decode(out.resources[ENDPOINT]["default/web:http"]).endpoints


def test_listener_per_port_with_offset_and_route_with_virtual_host_per_service():
    entries = (
        ServiceEntry(service("a", cluster_ip="10.0.0.1")),
        ServiceEntry(service("b", namespace="prod", cluster_ip="10.0.0.2")),
    )
    out = translate(
        mesh(*entries), Settings(listener_port_offset=10000, listener_address="127.0.0.1")
    )
    [listener] = [decode(r) for r in out.resources[LISTENER].values()]
    assert listener.name == "port:80"
    assert listener.address.socket_address.port_value == 10080
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.rds.route_config_name == "http:80"
    route = decode(out.resources[ROUTE]["http:80"])
    hosts = {v.name: list(v.domains) for v in route.virtual_hosts}
    assert hosts["prod/b"] == [
        "b",
        "b:80",
        "b.prod",
        "b.prod:80",
        "b.prod.svc",
        "b.prod.svc:80",
        "b.prod.svc.cluster.local",
        "b.prod.svc.cluster.local:80",
        "10.0.0.2",
        "10.0.0.2:80",
    ]
    assert route.virtual_hosts[0].routes[0].route.cluster == "default/a:http"


def test_short_name_shared_across_namespaces_goes_to_default_only_and_domains_stay_unique():
    entries = (
        ServiceEntry(service("web", "default", cluster_ip="10.0.0.1")),
        ServiceEntry(service("web", "prod", cluster_ip="10.0.0.2")),
        ServiceEntry(service("web", "qa", cluster_ip="10.0.0.2")),
    )
    out = translate(mesh(*entries), Settings())
    route = decode(out.resources[ROUTE]["http:80"])
    domains = [d for v in route.virtual_hosts for d in v.domains]
    assert len(domains) == len(set(domains))
    by_host = {v.name: set(v.domains) for v in route.virtual_hosts}
    assert "web" in by_host["default/web"] and "web" not in by_host["prod/web"]
    assert "10.0.0.2" in by_host["prod/web"] and "10.0.0.2" not in by_host["qa/web"]
    assert any(p.field == "spec.clusterIP" and "qa/web" in p.object for p in out.problems)


def test_headless_service_gets_cluster_and_virtual_host_by_name():
    out = translate(
        mesh(ServiceEntry(service("db", cluster_ip=None, headless=True), (group("10.1.0.9"),))),
        Settings(),
    )
    assert "default/db:http" in out.resources[CLUSTER]
    [vhost] = decode(out.resources[ROUTE]["http:80"]).virtual_hosts
    assert "db.default.svc.cluster.local" in vhost.domains
    assert not any(d[0].isdigit() for d in vhost.domains)


def test_translation_is_deterministic_and_consistent():
    entries = [
        ServiceEntry(service(f"s{i}", cluster_ip=f"10.0.0.{i}"), (group(f"10.1.0.{i}"),))
        for i in range(1, 20)
    ]
    one = translate(mesh(*entries), Settings())
    two = translate(mesh(*reversed(entries)), Settings())
    assert Snapshot.build(one.resources).versions == Snapshot.build(two.resources).versions
    assert Snapshot.build(one.resources).inconsistencies() == []


def test_only_the_changed_service_is_translated_again():
    entries = {
        f"s{i}": ServiceEntry(service(f"s{i}", cluster_ip=f"10.0.0.{i}"), (group("10.1.0.1"),))
        for i in range(1, 50)
    }
    translator = Translator(Settings())
    first = translator.translate(mesh(*entries.values()))
    assert first.translated == 49
    entries["s7"] = ServiceEntry(entries["s7"].service, (group("10.1.0.2"),))
    second = translator.translate(mesh(*entries.values()))
    assert second.translated == 1
    changed = [
        name
        for name, r in second.resources[ENDPOINT].items()
        if first.resources[ENDPOINT][name].version != r.version
    ]
    assert changed == ["default/s7:http"]
    # Unchanged resources are the very same objects: serialized once, shared.
    assert (
        second.resources[CLUSTER]["default/s1:http"] is first.resources[CLUSTER]["default/s1:http"]
    )


def test_per_type_clients_get_config_sources_naming_the_server_cluster():
    from xds.server.views import for_api_type

    out = translate(mesh(ServiceEntry(service("web"), (group("10.1.0.1"),))), Settings())
    cluster = decode(for_api_type(out.resources[CLUSTER]["default/web:http"], "DELTA_GRPC", "cp"))
    source = cluster.eds_cluster_config.eds_config.api_config_source
    assert source.api_type == source.DELTA_GRPC
    assert source.grpc_services[0].envoy_grpc.cluster_name == "cp"
    listener = decode(for_api_type(out.resources[LISTENER]["port:80"], "GRPC", "cp"))
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.rds.config_source.api_config_source.api_type == source.GRPC
    assert manager.rds.route_config_name == "http:80"
    assignment = out.resources[ENDPOINT]["default/web:http"]
    assert for_api_type(assignment, "GRPC", "cp") is assignment


def test_every_service_kind_is_translated():
    entries = (
        ServiceEntry(service("np", type="NodePort"), (group("10.1.0.1"),)),
        ServiceEntry(service("lb", type="LoadBalancer"), (group("10.1.0.2"),)),
        ServiceEntry(
            service("ext", cluster_ip=None, type="ExternalName", external_name="db.example.com")
        ),
    )
    out = translate(mesh(*entries), Settings())
    for name in ("default/np:http", "default/lb:http"):
        assert decode(out.resources[CLUSTER][name]).type == cluster_pb2.Cluster.EDS
    external = decode(out.resources[CLUSTER]["default/ext:http"])
    assert external.type == cluster_pb2.Cluster.LOGICAL_DNS
    [locality] = external.load_assignment.endpoints
    address = locality.lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("db.example.com", 80)
    assert "default/ext:http" not in out.resources[ENDPOINT]  # DNS, not EDS
    domains = [d for v in decode(out.resources[ROUTE]["http:80"]).virtual_hosts for d in v.domains]
    assert "ext.default.svc.cluster.local" in domains
    assert Snapshot.build(out.resources).inconsistencies() == []


def test_hand_encoded_assignments_are_protobufs_deterministic_bytes() -> None:
    import random

    from google.protobuf import wrappers_pb2

    from xds._pb.envoy.config.core.v3 import address_pb2, base_pb2
    from xds._pb.envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
    from xds.translate import encode_assignment

    rng = random.Random(3)
    for _ in range(200):
        localities = [
            (
                rng.choice(["", "eu", "région-ü"]),
                rng.choice(["", "a", "zone-" + "z" * rng.randint(0, 200)]),
                rng.choice(["", "east", "cluster-" + "c" * rng.randint(0, 200)]),
                [
                    (
                        (
                            f"127.0.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
                            rng.randint(0, 65535),
                        ),
                        rng.choice([0, health_check_pb2.HEALTHY, health_check_pb2.DRAINING]),
                    )
                    for _ in range(rng.randint(0, 40))
                ],
            )
            for _ in range(rng.randint(0, 3))
        ]
        name = rng.choice(["", "ns/s:http", "n" * 300])
        message = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        for region, zone, sub_zone, endpoints in localities:
            message.endpoints.append(
                endpoint_components_pb2.LocalityLbEndpoints(
                    locality=base_pb2.Locality(region=region, zone=zone, sub_zone=sub_zone),
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(
                                    socket_address=address_pb2.SocketAddress(
                                        address=address, port_value=port
                                    )
                                )
                            ),
                            health_status=health,  # type: ignore[arg-type]
                        )
                        for (address, port), health in endpoints
                    ],
                    # gRPC drops a locality without a weight: its HEALTHY endpoints, at least 1.
                    load_balancing_weight=wrappers_pb2.UInt32Value(
                        value=max(1, sum(h == health_check_pb2.HEALTHY for _, h in endpoints))
                    ),
                )
            )
        assert encode_assignment(name, localities) == message.SerializeToString(deterministic=True)
