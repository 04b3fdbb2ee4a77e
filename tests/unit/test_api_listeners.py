"""Proxyless gRPC's view of the mesh: API listeners by target name, served only to clients that
name them; locality weights; NOT_FOUND for names the snapshot lacks (xRFC TP3)."""

from __future__ import annotations

from google.protobuf import json_format

from tests.unit.test_translate import group, mesh, service
from xds._pb.envoy.config.core.v3 import health_check_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Cache, Snapshot
from xds.config import Settings
from xds.model import Endpoint, EndpointGroup, EndpointPort, ServiceEntry, ServicePort
from xds.resources import API_LISTENER, CLUSTER, ENDPOINT, LISTENER, ROUTE, decode
from xds.server.delta import DeltaStream
from xds.server.index import SubscriptionIndex
from xds.server.sotw import SotwStream
from xds.server.views import Variant, Views
from xds.translate import Translator, for_scope, translate

GRPC = ServicePort(50051, "grpc", "grpc")
TCP = ServicePort(6379, "redis", "redis")


def echo(*addresses: str, namespace: str = "demo", **kw: object) -> ServiceEntry:
    return ServiceEntry(
        service("echo", namespace, ports=(GRPC, TCP), cluster_ip="10.96.0.10", **kw),
        (
            EndpointGroup(
                "EndpointSlice demo/echo",
                (EndpointPort(9000, "grpc"), EndpointPort(6379, "redis")),
                tuple(Endpoint(a) for a in addresses),
            ),
        ),
    )


TARGETS = {
    "echo.demo:50051",
    "echo.demo.svc:50051",
    "echo.demo.svc.cluster.local:50051",
    "10.96.0.10:50051",
}


def test_every_http_family_port_gets_an_api_listener_per_target_taking_the_port_routes():
    out = translate(mesh(echo("10.1.0.1")), Settings())
    api = out.resources[API_LISTENER]
    assert set(api) == TARGETS  # not the TCP port, not the short name
    for name, resource in api.items():
        listener = decode(resource)
        assert resource.type_url == LISTENER and listener.name == name
        manager = hcm_pb2.HttpConnectionManager()
        assert listener.api_listener.api_listener.Unpack(manager)
        assert manager.rds.route_config_name == "http:50051"
        assert manager.rds.config_source.HasField("ads")
        assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
        assert resource.refs == ((ROUTE, "http:50051"),)
    # Envoy's listeners hold no API listener; the route configuration has the target's domain.
    assert all(not decode(r).HasField("api_listener") for r in out.resources[LISTENER].values())
    route = json_format.MessageToDict(decode(out.resources[ROUTE]["http:50051"]))
    assert {d for vhost in route["virtualHosts"] for d in vhost["domains"]} >= TARGETS


def test_an_ipv6_cluster_ip_target_is_bracketed():
    entry = ServiceEntry(service("v6", ports=(GRPC,), cluster_ip="fd00::10"), ())
    out = translate(mesh(entry), Settings())
    assert "[fd00::10]:50051" in out.resources[API_LISTENER]


def test_a_cluster_ip_target_passes_between_services_in_either_order():
    """The ClusterIP's API listener follows the IP's owner, whichever Service is translated first
    (a removal must not undo the other's set)."""
    for first, second in (("a", "b"), ("b", "a")):
        translator = Translator(Settings())
        older = ServiceEntry(service(first, ports=(GRPC,), cluster_ip="10.0.0.9"), ())
        translator.translate(mesh(older))
        newer = ServiceEntry(service(second, ports=(GRPC,), cluster_ip="10.0.0.9"), ())
        out = translator.translate(mesh(newer))  # `first` gone, `second` takes the IP
        assert "10.0.0.9:50051" in out.resources[API_LISTENER]
        assert f"{second}.default:50051" in out.resources[API_LISTENER]


def test_the_port_routes_stay_for_api_listeners_when_envoy_cannot_listen_on_the_port():
    out = translate(mesh(echo("10.1.0.1")), Settings(listener_port_offset=60000))
    assert "port:50051" not in out.resources[LISTENER]
    assert "http:50051" in out.resources[ROUTE]
    assert Snapshot.build(out.resources).inconsistencies() == []


def test_every_locality_has_a_weight_of_its_healthy_endpoints():
    draining = {"ready": False, "serving": True, "terminating": True}
    entry = ServiceEntry(
        service("web"),
        (
            group("10.1.0.1", "10.1.0.2", zone="a"),
            group("10.1.0.3", zone="b", **draining),
        ),
    )
    out = translate(mesh(entry), Settings())
    assignment = decode(out.resources[ENDPOINT]["default/web:http"])
    weights = {
        locality.locality.zone: (
            locality.load_balancing_weight.value,
            [e.health_status for e in locality.lb_endpoints],
        )
        for locality in assignment.endpoints
    }
    assert weights == {
        "a": (2, [health_check_pb2.HEALTHY] * 2),
        # Only draining: no share of new traffic, yet a weight gRPC accepts.
        "b": (1, [health_check_pb2.DRAINING]),
    }
    assert all(locality.priority == 0 for locality in assignment.endpoints)


def lds(names: tuple[str, ...] = (), nonce: str = "", version: str = "") -> bytes:
    return discovery_pb2.DiscoveryRequest(
        type_url=LISTENER, resource_names=names, response_nonce=nonce, version_info=version
    ).SerializeToString()


def listeners_of(response: object) -> list[str]:
    return sorted(r.name for r in response.resources)  # type: ignore[attr-defined]


def test_a_wildcard_subscriber_never_gets_api_listeners_and_a_named_one_only_its_names():
    snap = Cache()
    assert snap.publish(translate(mesh(echo("10.1.0.1")), Settings()).resources)
    snapshot = snap.snapshot
    envoy, grpc_client = SotwStream(), SotwStream()
    [to_envoy] = envoy.on_message(lds(), snapshot)
    assert listeners_of(to_envoy) == ["port:50051", "port:6379"]
    [to_grpc] = grpc_client.on_message(lds(("echo.demo:50051",)), snapshot)
    assert listeners_of(to_grpc) == ["echo.demo:50051"]
    assert to_grpc.missing == ()
    parsed = discovery_pb2.DiscoveryResponse.FromString(to_grpc.encode())
    assert not parsed.resource_errors
    # Envoy asks for one by name next to its wildcard: it gets that one, not the others.
    both = DeltaStream()
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=LISTENER, resource_names_subscribe=["*", "10.96.0.10:50051"]
    )
    [delta] = both.on_request(request, snapshot)
    assert listeners_of(delta) == ["10.96.0.10:50051", "port:50051", "port:6379"]


def test_api_listener_changes_reach_only_named_subscribers():
    cache = Cache()
    translator = Translator(Settings())
    assert cache.publish(translator.translate(mesh(echo("10.1.0.1"))).resources)
    envoy, grpc_client = SotwStream(), SotwStream()
    [first] = envoy.on_message(lds(), cache.snapshot)
    envoy.on_message(lds((), first.nonce, first.version), cache.snapshot)
    [named] = grpc_client.on_message(lds(("echo.demo:50051",)), cache.snapshot)
    grpc_client.on_message(lds(("echo.demo:50051",), named.nonce, named.version), cache.snapshot)
    index = SubscriptionIndex()
    index.subscribe(1, LISTENER, frozenset(), True)
    index.subscribe(2, LISTENER, frozenset({"echo.demo:50051"}), False)

    # The Service loses its ClusterIP: one API listener goes, Envoy's listeners stay the same.
    serial = cache.published
    moved = ServiceEntry(service("echo", "demo", ports=(GRPC, TCP), cluster_ip=None), ())
    translation = translator.translate(mesh(moved))
    assert cache.publish(translation.resources, changes=translation.resource_changes)
    changes = cache.changes_since(serial)
    assert changes is not None and "10.96.0.10:50051" in changes[API_LISTENER]
    api_only = {API_LISTENER: changes[API_LISTENER]}
    assert index.concerned(api_only) == set()  # nobody names it
    index.subscribe(2, LISTENER, frozenset({"echo.demo:50051", "10.96.0.10:50051"}), False)
    assert index.concerned(api_only) == {2}
    assert envoy.on_snapshot(cache.snapshot, api_only) == []


def test_names_the_snapshot_lacks_are_reported_not_found_but_endpoints_are_answered_empty():
    cache = Cache()
    assert cache.publish(translate(mesh(echo("10.1.0.1")), Settings()).resources)
    stream = SotwStream()
    [response] = stream.on_message(lds(("nope.demo:50051", "echo.demo:50051")), cache.snapshot)
    assert listeners_of(response) == ["echo.demo:50051"]
    parsed = discovery_pb2.DiscoveryResponse.FromString(response.encode())
    [error] = parsed.resource_errors
    assert error.resource_name.name == "nope.demo:50051"
    assert error.error_detail.code == 5  # NOT_FOUND
    assert "does not exist" in error.error_detail.message
    for type_url in (CLUSTER, ROUTE):
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=["missing"])
        [answer] = stream.on_message(request.SerializeToString(), cache.snapshot)
        assert answer.missing == ("missing",)
    eds = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["missing"])
    [empty] = stream.on_message(eds.SerializeToString(), cache.snapshot)
    assert empty.missing == () and [r.name for r in empty.resources] == ["missing"]


def test_delta_reports_a_missing_name_once_and_sends_it_when_it_appears():
    cache = Cache()
    translator = Translator(Settings())
    assert cache.publish(translator.translate(mesh()).resources)
    stream = DeltaStream()
    subscribe = discovery_pb2.DeltaDiscoveryRequest(
        type_url=LISTENER, resource_names_subscribe=["echo.demo:50051"]
    )
    [first] = stream.on_request(subscribe, cache.snapshot)
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(first.encode())
    assert [e.resource_name.name for e in parsed.resource_errors] == ["echo.demo:50051"]
    ack = discovery_pb2.DeltaDiscoveryRequest(type_url=LISTENER, response_nonce=first.nonce)
    assert stream.on_request(ack, cache.snapshot) == []
    assert stream.on_snapshot(cache.snapshot) == []  # reported once, not on every look
    serial = cache.published
    translation = translator.translate(mesh(echo("10.1.0.1")))
    assert cache.publish(translation.resources, changes=translation.resource_changes)
    [appeared] = stream.on_snapshot(cache.snapshot, cache.changes_since(serial))
    assert listeners_of(appeared) == ["echo.demo:50051"] and appeared.missing == ()


def test_scoped_clients_see_the_api_listeners_of_the_services_they_may_see():
    settings = Settings(scope="namespace")
    out = translate(mesh(echo("10.1.0.1", namespace="team-a")), settings)
    api = out.resources[API_LISTENER]["echo.team-a:50051"]
    assert for_scope(api, "team-a", settings) is api
    assert for_scope(api, "team-b", settings) is None
    cache = Cache()
    assert cache.publish(out.resources)
    views = Views(lambda resource, variant: for_scope(resource, variant.scope or "", settings))
    assert set(views.view(cache.snapshot, Variant(None, "team-a")).of_type(API_LISTENER)) == {
        "echo.team-a:50051",
        "echo.team-a.svc:50051",
        "echo.team-a.svc.cluster.local:50051",
        "10.96.0.10:50051",
    }
    team_b = views.view(cache.snapshot, Variant(None, "team-b"))
    assert dict(team_b.of_type(API_LISTENER)) == {}
    # team-b naming team-a's target is told it does not exist.
    [response] = SotwStream().on_message(lds(("echo.team-a:50051",)), team_b)
    assert response.resources == () and response.missing == ("echo.team-a:50051",)


def test_clients_naming_the_same_targets_share_one_encoding():
    from xds.server.stream import SHARED

    cache = Cache()
    assert cache.publish(translate(mesh(echo("10.1.0.1")), Settings()).resources)
    built = SHARED.built
    for _ in range(50):
        [response] = SotwStream().on_message(lds(("echo.demo:50051",)), cache.snapshot)
        assert response.complete
        response.encode()
    assert SHARED.built - built <= 1  # one (or none, if an earlier test built it): not 50
