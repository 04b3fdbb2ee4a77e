"""The corpus under tests/data (objects as kubectl, the API server and helm give them) read by the
manifest source and translated: what every port must become, and nothing else reported."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.listeners import Chain, listener_chains, listener_filters
from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds._pb.envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from xds.cache import Snapshot
from xds.config import Settings
from xds.model import Problem
from xds.resources import CLUSTER, ENDPOINT, LISTENER, Resource, decode
from xds.sources.files import ManifestSource
from xds.translate import Translation, translate

DATA = Path(__file__).parent.parent / "data"


def read(*names: str) -> tuple[Translation, list[Problem]]:
    source = ManifestSource([DATA / name for name in names])
    source.reload()
    # The corpus's endpoints (and one ExternalName, localhost) are on loopback: refused unless
    # allowed.
    loopback = Settings(allowed_endpoint_ranges=("127.0.0.0/8", "::1/128"))
    out = translate(source.mesh(), loopback)
    assert Snapshot.build(out.resources).inconsistencies() == []
    return out, [*source.problems(), *out.problems]


def ports(out: Translation) -> list[int]:
    return sorted(int(name.split(":")[1]) for name in out.resources[LISTENER])


def endpoints(out: Translation, cluster: str) -> list[str]:
    assignment = decode(out.resources[ENDPOINT][cluster])
    return sorted(
        f"{lb.endpoint.address.socket_address.address}:{lb.endpoint.address.socket_address.port_value}"
        for locality in assignment.endpoints  # type: ignore[attr-defined]
        for lb in locality.lb_endpoints
    )


def upstream_http2(resource: Resource) -> bool:
    cluster = decode(resource)
    assert isinstance(cluster, cluster_pb2.Cluster)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    packed = cluster.typed_extension_protocol_options.get(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    )
    return (
        packed is not None and packed.Unpack(options) and options.HasField("explicit_http_config")
    )


HTTP_ONLY: list[Chain] = [("*", "routes http:{port}")]


def tcp(cluster: str) -> list[Chain]:
    return [("*", f"tcp {cluster}")]


def detected(cluster: str) -> list[Chain]:
    return [("http", "routes http:{port}"), ("*", f"tcp {cluster}")]


def tls(service: str, cluster: str) -> list[Chain]:
    return [(f"sni {service} tls", f"tcp {cluster}"), ("*", f"tcp {cluster}")]


# protocols.yaml: one Service per rule (namespace `protocols`), port -> (listener filters, chains).
PROTOCOL_RULES: dict[int, tuple[list[str], list[Chain]]] = {
    # appProtocol
    8101: ([], HTTP_ONLY),  # http
    8102: (["tls_inspector"], tls("ap-https", "protocols/ap-https:main")),  # https
    8103: ([], HTTP_ONLY),  # h2c
    8104: ([], HTTP_ONLY),  # kubernetes.io/h2c
    8105: ([], HTTP_ONLY),  # kubernetes.io/ws
    8106: (["tls_inspector"], tls("ap-k8s-wss", "protocols/ap-k8s-wss:main")),  # kubernetes.io/wss
    8107: ([], HTTP_ONLY),  # grpc
    8108: ([], tcp("protocols/ap-tcp:main")),
    8109: (["tls_inspector"], tls("ap-tls", "protocols/ap-tls:main")),
    8110: ([], tcp("protocols/ap-redis:main")),
    8111: ([], tcp("protocols/ap-mysql:main")),
    8112: ([], tcp("protocols/ap-postgresql:main")),
    8113: ([], tcp("protocols/ap-mongodb:main")),
    8114: ([], tcp("protocols/ap-kafka:main")),
    8115: ([], tcp("protocols/ap-amqp:main")),
    # An appProtocol nobody knows, on a port named `main`: detected.
    8116: (["http_inspector"], detected("protocols/ap-custom:main")),
    # Port names
    8201: ([], HTTP_ONLY),  # http-web
    8202: ([], HTTP_ONLY),  # http2-api
    8203: ([], HTTP_ONLY),  # grpc-api
    8204: (["tls_inspector"], tls("name-https-admin", "protocols/name-https-admin:https-admin")),
    8205: (["tls_inspector"], tls("name-tls-db", "protocols/name-tls-db:tls-db")),
    8206: ([], tcp("protocols/name-tcp-raw:tcp-raw")),
    8207: ([], tcp("protocols/name-redis-cache:redis-cache")),
    8208: ([], tcp("protocols/name-mysql-main:mysql-main")),
    8209: ([], tcp("protocols/name-mongo-docs:mongo-docs")),
    8210: (["http_inspector"], detected("protocols/name-unnamed:8210")),  # no name
    8211: (["http_inspector"], detected("protocols/name-web:web")),  # `web`: no known prefix
    # The TCP port of a Service whose other port is UDP (514, left out).
    601: (["http_inspector"], detected("protocols/syslog:syslog-tcp")),
    # Sharing a port: told apart by ClusterIP, TLS by SNI too.
    5432: (
        ["original_dst"],
        [
            ("ip 127.0.13.51", "tcp protocols/shared-pg-users:tcp-postgres"),
            ("*", "tcp protocols/shared-pg-orders:tcp-postgres"),
        ],
    ),
    8443: (
        ["original_dst", "tls_inspector"],
        [
            ("ip 127.0.13.53", "tcp protocols/shared-tls-b:https"),
            ("sni shared-tls-a tls", "tcp protocols/shared-tls-a:https"),
            ("sni shared-tls-b tls", "tcp protocols/shared-tls-b:https"),
            ("*", "tcp protocols/shared-tls-a:https"),
        ],
    ),
    # HTTP and TCP on one port: detection tells them apart; the TCP one is the default for bytes.
    9000: (["http_inspector"], detected("protocols/shared-9000-tcp:tcp")),
    # A headless TCP Service has no address to be matched by: it is the default, the other is
    # reached by its ClusterIP.
    7000: (
        ["original_dst"],
        [
            ("ip 127.0.13.56", "tcp protocols/shared-7000-tcp:tcp"),
            ("*", "tcp protocols/shared-7000-headless:tcp"),
        ],
    ),
}


@pytest.mark.parametrize("port", sorted(PROTOCOL_RULES))
def test_each_protocol_rule_gives_its_listener(port: int) -> None:
    out, _ = read("protocols.yaml")
    filters, chains = PROTOCOL_RULES[port]
    assert listener_filters(out, port) == filters
    assert listener_chains(out, port) == [
        (match, target.format(port=port)) for match, target in chains
    ]


def test_the_protocol_corpus_has_a_listener_for_every_rule_and_no_more() -> None:
    out, problems = read("protocols.yaml")
    assert ports(out) == sorted(PROTOCOL_RULES)
    # The only note: the UDP port left out. Everything else is served as declared.
    assert [(p.severity, p.object, p.field) for p in problems] == [
        ("info", "Service protocols/syslog", "spec.ports[0].protocol")
    ]
    # HTTP/2 where declared (h2c, kubernetes.io/h2c, grpc, http2-, grpc-), nothing for TLS/TCP.
    http2 = {name for name, r in out.resources[CLUSTER].items() if upstream_http2(r)}
    assert http2 == {
        "protocols/ap-h2c:main",
        "protocols/ap-k8s-h2c:main",
        "protocols/ap-grpc:main",
        "protocols/name-http2-api:http2-api",
        "protocols/name-grpc-api:grpc-api",
    }


def test_kubectl_get_all_namespaces_list() -> None:
    out, problems = read("kubectl-get-svc-endpointslices-A.yaml")
    # kube-dns: DNS over UDP is left out with a note, over TCP proxied as bytes.
    assert [(p.severity, str(p)) for p in problems] == [
        (
            "info",
            "Service kube-system/kube-dns field spec.ports[0].protocol: "
            "UDP ports are not proxied; port 53 is left out",
        )
    ]
    assert listener_chains(out, 53) == tcp("kube-system/kube-dns:dns-tcp")
    # The API server and ingress-nginx's https ports: passed through by SNI, never HTTP.
    assert listener_filters(out, 443) == ["original_dst", "tls_inspector"]
    chains_443 = listener_chains(out, 443)
    assert ("sni kubernetes tls", "tcp default/kubernetes:https") in chains_443
    assert (
        "sni ingress-nginx-controller tls",
        "tcp ingress-nginx/ingress-nginx-controller:https",
    ) in chains_443
    assert not any(target.startswith("routes") for _, target in chains_443)
    # The guestbook's redis (6379, no port name): detected, so RESP reaches redis.
    assert listener_filters(out, 6379) == ["original_dst", "http_inspector"]
    assert ("ip 127.0.10.32", "tcp default/redis-leader:6379") in listener_chains(out, 6379)
    # MySQL, declared by its port name: plain TCP, no inspection to wait for.
    assert listener_filters(out, 3306) == ["original_dst"]
    assert ("*", "tcp db/mysql-headless:mysql") in listener_chains(out, 3306)
    # gRPC mid-rollout: both slices' endpoints, each on its own target port.
    assert listener_chains(out, 50051) == [("*", "routes http:50051")]
    assert endpoints(out, "shop/productcatalog:grpc") == [
        "127.0.20.50:50051",
        "127.0.20.51:50051",
        "127.0.20.52:50052",
    ]
    # Ready and terminating endpoints are served, the one neither ready nor serving is not.
    assert len(endpoints(out, "default/frontend:80")) == 3


def test_typed_lists_as_the_api_server_returns_them() -> None:
    out, problems = read("servicelist.json", "endpointslicelist.json")
    assert [p.severity for p in problems] == ["info"]  # kube-dns's UDP port
    assert sorted(out.resources[CLUSTER]) == [
        "default/kubernetes:https",
        "kube-system/kube-dns:dns-tcp",
        "kube-system/kube-dns:metrics",
        "realtime/chat:ws",
        "realtime/presence:grpc",
        "realtime/presence:metrics",
        "realtime/web:http",
    ]
    # Every Service got its endpoints from the EndpointSliceList.
    assert all(endpoints(out, name) for name in out.resources[ENDPOINT])
    assert listener_chains(out, 8080) == [("*", "routes http:8080")]  # kubernetes.io/ws
    assert listener_chains(out, 9090) == [("*", "routes http:9090")]  # kubernetes.io/h2c
    assert listener_filters(out, 443) == ["tls_inspector"]


def test_helm_output_with_other_kinds_mixed_in(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="xds.sources.manifests"):
        out, problems = read("helm-rendered.yaml")
    assert problems == []
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    # Every kind the control plane does not read is skipped with a debug note; cluster-scoped
    # ones are named without a namespace; the Knative Service is not a core Service.
    assert any("skipped Namespace webapp " in m for m in skipped)
    assert any("skipped ClusterRole demo-mychart-node-reader " in m for m in skipped)
    assert any("skipped Service webapp/demo-mychart-thumbnailer (serving" in m for m in skipped)
    assert len(skipped) == 19
    assert any("skipped Deployment webapp/" in m for m in skipped)
    assert sorted(out.resources[CLUSTER]) == [
        "webapp/demo-mychart-api:https",
        "webapp/demo-mychart-cache-headless:tcp-redis",
        "webapp/demo-mychart-cache:tcp-redis",
        "webapp/demo-mychart-web:web",
    ]
    assert listener_chains(out, 443) == tls("demo-mychart-api", "webapp/demo-mychart-api:https")
    assert listener_chains(out, 80) == [
        ("http", "routes http:80"),
        ("*", "tcp webapp/demo-mychart-web:web"),
    ]
    assert listener_chains(out, 6379) == [
        ("ip 127.0.12.21", "tcp webapp/demo-mychart-cache:tcp-redis"),
        ("*", "tcp webapp/demo-mychart-cache-headless:tcp-redis"),
    ]
