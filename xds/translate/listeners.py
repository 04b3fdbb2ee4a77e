"""Listeners: the listener of a port number (`port_listener`: its filter chains for HTTP, TLS,
TCP and undeclared ports, listener filters and the HTTP connection manager with its tracing) from
the Services' claims on it (`PortClaim`), and the API listeners of proxyless gRPC clients
(`api_listener`). The rules are in the package docstring (`xds.translate`)."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from xds._pb.envoy.config.core.v3 import address_pb2, grpc_service_pb2
from xds._pb.envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from xds._pb.envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from xds._pb.envoy.extensions.filters.http.router.v3 import router_pb2
from xds._pb.envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from xds._pb.envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from xds._pb.envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds._pb.envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from xds._pb.envoy.type.v3 import percent_pb2
from xds.config import Settings
from xds.model import Problem, ServiceKey, error, warning
from xds.protocols import Kind, PortProtocol
from xds.resources import CLUSTER, LISTENER, ROUTE, Resource, encode_len_field
from xds.scopes import PortScope, ServiceScope
from xds.translate.common import _ads_source, _any, _duration, _marks
from xds.translate.names import listener_name, route_name

# What http_inspector reports for HTTP/1.0, HTTP/1.1 and HTTP/2 with prior knowledge.
DETECTED_HTTP = ("http/1.0", "http/1.1", "h2c")


@dataclass(frozen=True, slots=True)
class PortClaim:
    """What one Service port asks of the listener of its port number."""

    port: int
    service: ServiceKey
    cluster: str
    protocol: PortProtocol
    # The address that selects this Service's chains: its ClusterIP, when it owns it.
    cluster_ip: str | None
    # SNI names of a TLS port: the Service's host names.
    server_names: tuple[str, ...] = ()


@functools.lru_cache(maxsize=4096)
def _api_listener_field(port: int) -> bytes:
    """Listener.api_listener (field 19) of a port's API listeners: an HttpConnectionManager taking
    the port's route configuration over ADS, then the router, as gRPC requires. Serialized once
    per port: every API listener of the port differs only in its name."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"grpc_{port}",
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=route_name(port)),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    wrapper = api_listener_pb2.ApiListener(api_listener=_any(manager))
    return encode_len_field(19, wrapper.SerializeToString(deterministic=True))


@functools.lru_cache(maxsize=4096)
def _api_listener_refs(port: int) -> tuple[tuple[str, str], ...]:
    return ((ROUTE, route_name(port)),)


def api_listener(target: str, port: int, scope: ServiceScope | None = None) -> Resource:
    """The API listener a gRPC client asks for by its target `host:port` (package docstring)."""
    body = encode_len_field(1, target.encode()) + _api_listener_field(port)
    return Resource.from_bytes(LISTENER, target, body, _api_listener_refs(port), *_marks(scope))


def _address(
    settings: Settings, name: str, port: int, problems: list[Problem]
) -> address_pb2.Address | None:
    envoy_port = port + settings.listener_port_offset
    if envoy_port > 65535:
        problems.append(
            error(
                f"Listener {name}",
                "",
                f"service port {port} + listener port offset "
                f"{settings.listener_port_offset} is above 65535; not served",
            )
        )
        return None
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(
            address=settings.listener_address, port_value=envoy_port
        )
    )


def port_listener(
    settings: Settings,
    port: int,
    claims: tuple[PortClaim, ...],
    detail: PortScope | None = None,
    salt: bytes = b"",
) -> tuple[Resource | None, tuple[Problem, ...]]:
    """The listener of one port number: a filter chain (or two) per way in, see the package
    docstring for the rules. Claims come in namespace/name order, which makes it deterministic.
    """
    problems: list[Problem] = []
    name = listener_name(port)
    address = _address(settings, name, port, problems)
    if address is None:
        return None, tuple(problems)
    # One pass, comparing kinds by identity: a port may carry thousands of claims, and a scope's
    # view rebuilds its listener for every change of the port.
    raw: list[PortClaim] = []  # TCP and undeclared, in claim order
    tls: list[PortClaim] = []
    http = detected = False
    for claim in claims:
        kind = claim.protocol.kind
        if kind is Kind.TCP:
            raw.append(claim)
        elif kind is Kind.DETECT:
            raw.append(claim)
            http = detected = True
        elif kind is Kind.TLS:
            tls.append(claim)
        else:  # HTTP, HTTP2
            http = True
    # Where bytes that are not HTTP go when nothing else selects a chain: a Service without a
    # ClusterIP first, since nothing else could reach it (min() keeps the first of equals).
    candidates = raw or ([] if http else tls)
    fallback = min(candidates, key=lambda c: c.cluster_ip is not None) if candidates else None
    detect = (http and fallback is not None) or detected

    manager = _http_filter(settings, port) if http else None
    chains: list[listener_components_pb2.FilterChain] = []
    targets: dict[str, None] = {}  # the clusters tcp_proxy forwards to, in order

    def proxy(claim: PortClaim) -> listener_components_pb2.Filter:
        targets[claim.cluster] = None
        return _tcp_filter(claim)

    by_address = False
    for claim in raw + tls:
        if claim is fallback:
            continue
        if claim.cluster_ip is None:
            if claim.protocol.kind is not Kind.TLS:  # TLS has SNI to be told apart by
                problems.append(_unreachable(claim, fallback))
            continue
        by_address = True
        prefix = _cidr(claim.cluster_ip)
        if claim.protocol.kind is Kind.DETECT and manager is not None:
            chains.append(
                _chain(
                    manager,
                    listener_components_pb2.FilterChainMatch(
                        prefix_ranges=[prefix], application_protocols=DETECTED_HTTP
                    ),
                )
            )
        chains.append(
            _chain(
                proxy(claim),
                listener_components_pb2.FilterChainMatch(prefix_ranges=[prefix]),
            )
        )
    for claim in tls:
        chains.append(
            _chain(
                proxy(claim),
                listener_components_pb2.FilterChainMatch(
                    server_names=claim.server_names, transport_protocol="tls"
                ),
            )
        )
    if manager is not None and fallback is not None:
        chains.append(
            _chain(
                manager,
                listener_components_pb2.FilterChainMatch(application_protocols=DETECTED_HTTP),
            )
        )
        chains.append(_chain(proxy(fallback)))
    elif manager is not None:
        chains.append(_chain(manager))
    elif fallback is not None:
        chains.append(_chain(proxy(fallback)))

    listener = listener_pb2.Listener(name=name, address=address, filter_chains=chains)
    if by_address:
        listener.listener_filters.append(
            _listener_filter("envoy.filters.listener.original_dst", original_dst_pb2.OriginalDst())
        )
    if tls:
        listener.listener_filters.append(
            _listener_filter(
                "envoy.filters.listener.tls_inspector", tls_inspector_pb2.TlsInspector()
            )
        )
    if detect:
        listener.listener_filters.append(
            _listener_filter(
                "envoy.filters.listener.http_inspector", http_inspector_pb2.HttpInspector()
            )
        )
    if tls or detect:
        # Inspectors wait for the client's first bytes; a client that sends none (a
        # server-first protocol) is let through to the default chain after this long.
        listener.listener_filters_timeout.CopyFrom(_duration(settings.protocol_detection_timeout_s))
        listener.continue_on_listener_filters_timeout = True
        problems.extend(
            _waits_for_inspection(claim, settings.protocol_detection_timeout_s)
            for claim in claims
            if claim.protocol.server_first
        )
    refs = [(ROUTE, route_name(port))] if http else []
    refs.extend((CLUSTER, cluster) for cluster in targets)
    resource = Resource.from_message(name, listener, tuple(refs), detail, salt)
    return resource, tuple(problems)


def _http_filter(settings: Settings, port: int) -> listener_components_pb2.Filter:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"http_{port}",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=route_name(port)),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
        # WebSocket upgrades pass on every HTTP port, as in Istio: Kubernetes' `ws` and
        # `wss` appProtocols, and undeclared ports, carry them.
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
    )
    if settings.tracing_cluster:
        manager.tracing.CopyFrom(_tracing(settings))
    return listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=_any(manager)
    )


def _tracing(settings: Settings) -> hcm_pb2.HttpConnectionManager.Tracing:
    """Request spans to an OTLP collector through the Envoy cluster named in the settings
    (the bootstrap defines it). Envoy propagates W3C trace context to the upstreams."""
    provider = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                cluster_name=settings.tracing_cluster or ""
            ),
            timeout=_duration(1.0),
        ),
        service_name=settings.tracing_service_name,
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        provider=http_tracer_pb2.Tracing.Http(
            name="envoy.tracers.opentelemetry", typed_config=_any(provider)
        ),
        random_sampling=percent_pb2.Percent(value=settings.tracing_sampling_percent),
        spawn_upstream_span=wrappers_pb2.BoolValue(value=True),
    )


def _chain(
    network_filter: listener_components_pb2.Filter,
    match: listener_components_pb2.FilterChainMatch | None = None,
) -> listener_components_pb2.FilterChain:
    chain = listener_components_pb2.FilterChain(filters=[network_filter])
    if match is not None:
        chain.filter_chain_match.CopyFrom(match)
    return chain


def _tcp_filter(claim: PortClaim) -> listener_components_pb2.Filter:
    proxy = tcp_proxy_pb2.TcpProxy(
        stat_prefix=f"tcp_{claim.port}_{claim.service.namespace}_{claim.service.name}",
        cluster=claim.cluster,
    )
    return listener_components_pb2.Filter(
        name="envoy.filters.network.tcp_proxy", typed_config=_any(proxy)
    )


def _listener_filter(name: str, config: Message) -> listener_components_pb2.ListenerFilter:
    return listener_components_pb2.ListenerFilter(name=name, typed_config=_any(config))


def _cidr(ip: str) -> address_pb2.CidrRange:
    length = 128 if ipaddress.ip_address(ip).version == 6 else 32
    return address_pb2.CidrRange(
        address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=length)
    )


def _unreachable(claim: PortClaim, fallback: PortClaim | None) -> Problem:
    taken = f" Service {fallback.service} takes its connections" if fallback else ""
    return warning(
        f"Service {claim.service}",
        "spec.clusterIP",
        f"port {claim.port} ({claim.protocol.declared or 'undeclared'}) cannot be told apart "
        f"from the other Services on port {claim.port}: it has no ClusterIP to match the "
        f"destination by, and its traffic is not HTTP.{taken}; cluster {claim.cluster} is "
        "served but no listener reaches it",
    )


def _waits_for_inspection(claim: PortClaim, timeout_s: float) -> Problem:
    return warning(
        f"Service {claim.service}",
        "spec.ports",
        f"port {claim.port} speaks {claim.protocol.declared}, whose server speaks first, but "
        f"other Services on port {claim.port} need TLS or protocol detection, which waits for the "
        f"client's first bytes: its connections start only after {timeout_s:g}s; give it a port "
        "number of its own, or declare the protocols of the others",
    )
