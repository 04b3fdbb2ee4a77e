"""Each port keeps its protocol: classification, and the listener every mix of Services gets."""

from __future__ import annotations

import pytest

from tests.listeners import listener_chains, listener_filters
from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds._pb.envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from xds.cache import Snapshot
from xds.config import Settings
from xds.model import Mesh, Service, ServiceEntry, ServicePort
from xds.protocols import Kind, port_protocol
from xds.resources import CLUSTER, LISTENER, ROUTE, decode
from xds.translate import Translation, Translator, translate


def svc(
    name: str,
    port: int,
    port_name: str = "",
    app_protocol: str | None = None,
    cluster_ip: str | None = None,
    namespace: str = "default",
    protocol: str = "TCP",
    headless: bool = False,
) -> ServiceEntry:
    return ServiceEntry(
        Service(
            namespace,
            name,
            (ServicePort(port, port_name, port, protocol, app_protocol),),
            cluster_ip=cluster_ip,
            headless=headless,
        )
    )


def run(*entries: ServiceEntry, settings: Settings | None = None) -> Translation:
    out = translate(Mesh({e.service.key: e for e in entries}), settings or Settings())
    # Whatever the mix, the snapshot must hold together (every listener's routes and clusters).
    assert Snapshot.build(out.resources).inconsistencies() == []
    return out


@pytest.mark.parametrize(
    ("port_name", "app_protocol", "kind"),
    [
        ("", "http", Kind.HTTP),
        ("", "HTTP", Kind.HTTP),
        ("", "kubernetes.io/ws", Kind.HTTP),
        ("", "h2c", Kind.HTTP2),
        ("", "kubernetes.io/h2c", Kind.HTTP2),
        ("", "grpc", Kind.HTTP2),
        ("", "https", Kind.TLS),
        ("", "tls", Kind.TLS),
        ("", "kubernetes.io/wss", Kind.TLS),
        ("", "tcp", Kind.TCP),
        ("", "redis", Kind.TCP),
        ("", "mysql", Kind.TCP),
        ("", "postgresql", Kind.TCP),
        ("", "mongodb", Kind.TCP),
        ("", "kafka", Kind.TCP),
        ("", "amqp", Kind.TCP),
        ("http-web", None, Kind.HTTP),
        ("http2-api", None, Kind.HTTP2),
        ("grpc", None, Kind.HTTP2),
        ("grpc-api", None, Kind.HTTP2),
        ("https-admin", None, Kind.TLS),
        ("tls-db", None, Kind.TLS),
        ("tcp-raw", None, Kind.TCP),
        ("redis-cache", None, Kind.TCP),
        ("mysql", None, Kind.TCP),
        ("dns-tcp", None, Kind.TCP),
        ("", None, Kind.DETECT),
        ("web", None, Kind.DETECT),
        ("metrics", None, Kind.DETECT),
        ("httpd", None, Kind.DETECT),  # a prefix is a whole word before '-'
        # appProtocol first; one this table does not know leaves it to the name.
        ("http", "tcp", Kind.TCP),
        ("tcp-x", "example.com/custom", Kind.TCP),
        ("", "example.com/custom", Kind.DETECT),
    ],
)
def test_a_port_protocol_comes_from_app_protocol_then_name_then_detection(
    port_name: str, app_protocol: str | None, kind: Kind
) -> None:
    assert port_protocol(ServicePort(80, port_name, 80, "TCP", app_protocol)).kind is kind


def test_an_http_port_gets_the_connection_manager_alone() -> None:
    out = run(svc("web", 80, "http", cluster_ip="10.0.0.1"))
    assert listener_chains(out, 80) == [("*", "routes http:80")]
    assert listener_filters(out, 80) == []
    [vhost] = decode(out.resources[ROUTE]["http:80"]).virtual_hosts
    assert vhost.name == "default/web"
    listener = decode(out.resources[LISTENER]["port:80"])
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [u.upgrade_type for u in manager.upgrade_configs] == ["websocket"]


def test_a_declared_tcp_port_gets_tcp_proxy_and_no_routes() -> None:
    out = run(svc("redis", 6379, "redis", cluster_ip="10.0.0.1"))
    assert listener_chains(out, 6379) == [("*", "tcp default/redis:redis")]
    assert listener_filters(out, 6379) == []
    assert out.resources[ROUTE] == {}


def test_an_undeclared_port_is_detected_http_to_routes_the_rest_to_tcp() -> None:
    out = run(
        svc("app", 6379, cluster_ip="10.0.0.1"), settings=Settings(protocol_detection_timeout_s=2)
    )
    assert listener_chains(out, 6379) == [
        ("http", "routes http:6379"),
        ("*", "tcp default/app:6379"),
    ]
    assert listener_filters(out, 6379) == ["http_inspector"]
    listener = decode(out.resources[LISTENER]["port:6379"])
    # A client that sends nothing (a server-first protocol) is proxied as TCP after the timeout,
    # not cut off.
    assert listener.listener_filters_timeout.seconds == 2
    assert listener.continue_on_listener_filters_timeout
    assert [v.name for v in decode(out.resources[ROUTE]["http:6379"]).virtual_hosts] == [
        "default/app"
    ]
    # HTTP/2 comes in as h2c and goes up as HTTP/2; HTTP/1 stays HTTP/1.
    cluster = decode(out.resources[CLUSTER]["default/app:6379"])
    assert isinstance(cluster, cluster_pb2.Cluster)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(options)
    assert options.HasField("use_downstream_protocol_config")


def test_tls_ports_are_passed_through_by_sni_never_to_the_connection_manager() -> None:
    out = run(
        svc("alpha", 8443, "https", cluster_ip="10.0.0.1"),
        svc("beta", 8443, "", "tls", cluster_ip="10.0.0.2", namespace="shop"),
    )
    assert listener_chains(out, 8443) == [
        ("ip 10.0.0.2", "tcp shop/beta:8443"),
        ("sni alpha tls", "tcp default/alpha:https"),
        ("sni beta tls", "tcp shop/beta:8443"),
        ("*", "tcp default/alpha:https"),
    ]
    assert listener_filters(out, 8443) == ["original_dst", "tls_inspector"]
    listener = decode(out.resources[LISTENER]["port:8443"])
    names = {tuple(c.filter_chain_match.server_names) for c in listener.filter_chains}
    assert (
        "alpha",
        "alpha.default",
        "alpha.default.svc",
        "alpha.default.svc.cluster.local",
    ) in names
    assert ("beta", "beta.shop", "beta.shop.svc", "beta.shop.svc.cluster.local") in names
    assert out.resources[ROUTE] == {}
    # No HTTP anywhere on a TLS port: its clusters carry no HTTP options either.
    cluster = decode(out.resources[CLUSTER]["default/alpha:https"])
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert not cluster.typed_extension_protocol_options


def test_tcp_services_sharing_a_port_are_told_apart_by_cluster_ip() -> None:
    out = run(
        svc("pg-a", 5432, "tcp", cluster_ip="10.0.0.5"),
        svc("pg-b", 5432, "postgres", cluster_ip="10.0.0.6"),
        svc("pg-c", 5432, "tcp", cluster_ip="fd00::7"),
    )
    assert listener_chains(out, 5432) == [
        ("ip 10.0.0.6", "tcp default/pg-b:postgres"),
        ("ip fd00::7", "tcp default/pg-c:tcp"),
        ("*", "tcp default/pg-a:tcp"),
    ]
    assert listener_filters(out, 5432) == ["original_dst"]
    listener = decode(out.resources[LISTENER]["port:5432"])
    assert listener.filter_chains[1].filter_chain_match.prefix_ranges[0].prefix_len.value == 128
    assert out.problems == ()


def test_http_and_tcp_services_on_one_port_share_it_through_detection() -> None:
    out = run(
        svc("web", 9000, "http", cluster_ip="10.0.0.1"),
        svc("raw", 9000, "tcp", cluster_ip="10.0.0.2"),
        svc("app", 9000, cluster_ip="10.0.0.3"),  # undeclared
    )
    # The first by namespace/name takes what is not HTTP and matches no address.
    assert listener_chains(out, 9000) == [
        ("ip 10.0.0.2", "tcp default/raw:tcp"),
        ("http", "routes http:9000"),
        ("*", "tcp default/app:9000"),
    ]
    assert listener_filters(out, 9000) == ["original_dst", "http_inspector"]
    hosts = [v.name for v in decode(out.resources[ROUTE]["http:9000"]).virtual_hosts]
    assert hosts == ["default/app", "default/web"]  # the TCP Service has no virtual host


def test_what_cannot_be_told_apart_is_reported_and_the_same_whatever_the_order() -> None:
    entries = [
        svc("ip", 7000, "tcp", cluster_ip="10.0.0.9"),
        svc("zeta", 7000, "tcp", headless=True),
        svc("alpha", 7000, "tcp", headless=True, namespace="other"),
    ]
    out = run(*entries)
    assert out.problems == run(*reversed(entries)).problems
    # Nothing but the default can reach a Service without a ClusterIP: the first of those
    # (by namespace/name) is the default, so only one is lost.
    assert listener_chains(out, 7000) == [
        ("ip 10.0.0.9", "tcp default/ip:tcp"),
        ("*", "tcp default/zeta:tcp"),
    ]
    [problem] = out.problems
    assert (problem.severity, problem.object, problem.field) == (
        "warning",
        "Service other/alpha",
        "spec.clusterIP",
    )
    assert "cannot be told apart" in problem.message and "default/zeta" in problem.message
    assert "other/alpha:tcp" in out.resources[CLUSTER]  # still served: a fix is one edit away


def test_a_declared_server_first_protocol_is_warned_where_inspection_would_delay_it() -> None:
    alone = run(svc("db", 3306, "mysql", cluster_ip="10.0.0.1"))
    assert listener_filters(alone, 3306) == [] and alone.problems == ()
    shared = run(
        svc("db", 3306, "mysql", cluster_ip="10.0.0.1"),
        svc("other", 3306, cluster_ip="10.0.0.2"),
    )
    [problem] = shared.problems
    assert problem.object == "Service default/db" and "server speaks first" in problem.message


def test_udp_ports_are_left_out_with_an_info_note() -> None:
    entry = ServiceEntry(
        Service(
            "kube-system",
            "kube-dns",
            (
                ServicePort(53, "dns", 53, "UDP"),
                ServicePort(53, "dns-tcp", 53, "TCP"),
                ServicePort(9153, "metrics", 9153, "TCP"),
            ),
            cluster_ip="10.96.0.10",
        )
    )
    out = run(entry)
    assert sorted(out.resources[CLUSTER]) == [
        "kube-system/kube-dns:dns-tcp",
        "kube-system/kube-dns:metrics",
    ]
    assert listener_chains(out, 53) == [("*", "tcp kube-system/kube-dns:dns-tcp")]
    assert listener_chains(out, 9153) == [
        ("http", "routes http:9153"),
        ("*", "tcp kube-system/kube-dns:metrics"),
    ]
    [note] = out.problems
    assert (note.severity, note.field) == ("info", "spec.ports[0].protocol")


def test_a_listener_is_rebuilt_only_when_the_services_of_its_port_change() -> None:
    translator = Translator(Settings())
    web = svc("web", 80, "http", cluster_ip="10.0.0.1")
    db = svc("db", 5432, "tcp", cluster_ip="10.0.0.2")
    first = translator.translate(Mesh({e.service.key: e for e in (web, db)}))
    moved = svc("db", 5432, "tcp", cluster_ip="10.0.0.3")
    second = translator.translate(Mesh({e.service.key: e for e in (web, moved)}))
    assert second.resources[LISTENER]["port:80"] is first.resources[LISTENER]["port:80"]
    assert second.resources[LISTENER]["port:5432"] == first.resources[LISTENER]["port:5432"]
    other = svc("db2", 5432, "tcp", cluster_ip="10.0.0.4")
    third = translator.translate(Mesh({e.service.key: e for e in (web, moved, other)}))
    assert third.resources[LISTENER]["port:5432"] != second.resources[LISTENER]["port:5432"]
