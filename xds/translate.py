"""Pure translation of the mesh into Envoy resources: deterministic, no I/O, no clock.

Names, in one place:

- Cluster and its ClusterLoadAssignment: `<namespace>/<service>:<port>`, where `<port>` is the
  Service port's name, or its number when unnamed. The EDS service name is the cluster name.
- Listener: `http:<port>` for each distinct Service port number, bound to
  `Settings.listener_address` on `<port> + Settings.listener_port_offset`.
- RouteConfiguration: `http:<port>`, named by that listener's HttpConnectionManager through RDS.
- Virtual host: `<namespace>/<service>`, one per Service in the route configuration of each of its
  port numbers.
- TCP ports (appProtocol `tcp`, or a port name `tcp` / `tcp-*`): Listener `tcp:<port>` with a TCP
  proxy to the port's cluster. A TCP listener forwards to one Service only: when several claim a
  port, the first by namespace/name wins and the others get an error; an HTTP listener on the same
  port number wins over any TCP claim.

A port's protocol comes from its appProtocol, else its name's prefix (`http`, `http2`, `grpc`,
`h2c`, `tcp`), else HTTP; HTTP/2 ports get HTTP/2 upstream connections.

A virtual host's domains are `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<cluster domain>`, the short
name `svc` and the ClusterIP, each with and without `:<port>`. Envoy rejects a route configuration
in which two virtual hosts share a domain, so when several namespaces use the same name the short
name goes to the Service in `default` (else to none), and a ClusterIP to the first Service that
claims it.

Per-Service annotations (prefix `xds.dev/`):

- `lb-policy`: RANDOM, ROUND_ROBIN or LEAST_REQUEST, overriding `Settings.lb_policy`.
- `connect-timeout`: a duration such as `250ms` or `2s`.
- `cluster-patch`: a JSON object of Envoy `Cluster` fields (proto3 JSON names) merged into every
  cluster of the Service, for settings this control plane does not model. Envoy validates the result
  and NACKs what it cannot accept; the rest of the configuration is unaffected.

The work is incremental: a Translator remembers each Service's output and translates again only
the Services whose inputs changed; route configurations are assembled by joining the virtual hosts'
serialized bytes.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from google.protobuf import any_pb2, duration_pb2, json_format, wrappers_pb2
from google.protobuf.message import Message

from xds import resources
from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds._pb.envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
)
from xds._pb.envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from xds._pb.envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from xds._pb.envoy.config.route.v3 import route_components_pb2, route_pb2
from xds._pb.envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from xds._pb.envoy.extensions.filters.http.router.v3 import router_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds._pb.envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from xds._pb.envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from xds._pb.envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from xds._pb.envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from xds._pb.envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from xds._pb.envoy.type.v3 import percent_pb2
from xds.config import LB_POLICIES, Settings
from xds.model import (
    EndpointGroup,
    Mesh,
    Problem,
    Service,
    ServiceEntry,
    ServiceKey,
    ServicePort,
    error,
    warning,
)
from xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource, encode_len_field

ANNOTATION_PREFIX = "xds.dev/"
LB_POLICY_ANNOTATION = ANNOTATION_PREFIX + "lb-policy"
CONNECT_TIMEOUT_ANNOTATION = ANNOTATION_PREFIX + "connect-timeout"
CLUSTER_PATCH_ANNOTATION = ANNOTATION_PREFIX + "cluster-patch"

T = TypeVar("T")

HTTP2_PROTOCOLS = frozenset({"http2", "grpc", "h2c", "kubernetes.io/h2c", "grpc-web"})


def cluster_name(key: ServiceKey, port: ServicePort) -> str:
    return f"{key.namespace}/{key.name}:{port.label}"


def listener_name(port: int) -> str:
    return f"http:{port}"


def route_name(port: int) -> str:
    return f"http:{port}"


def tcp_listener_name(port: int) -> str:
    return f"tcp:{port}"


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _typed_policy(name: str, message: Message) -> cluster_pb2.LoadBalancingPolicy.Policy:
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(
            name=name, typed_config=_any(message)
        )
    )


def load_balancing_policy(policy: str) -> cluster_pb2.LoadBalancingPolicy:
    """The typed policy, then round_robin: proxyless gRPC clients take the first they support."""
    round_robin = _typed_policy(
        "envoy.load_balancing_policies.round_robin", round_robin_pb2.RoundRobin()
    )
    first = {
        "RANDOM": lambda: _typed_policy(
            "envoy.load_balancing_policies.random", random_pb2.Random()
        ),
        "LEAST_REQUEST": lambda: _typed_policy(
            "envoy.load_balancing_policies.least_request", least_request_pb2.LeastRequest()
        ),
        "ROUND_ROBIN": None,
    }[policy]
    policies = [round_robin] if first is None else [first(), round_robin]
    return cluster_pb2.LoadBalancingPolicy(policies=policies)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0}


def parse_duration(text: str) -> float:
    """`250ms`, `1.5s`, `2m` -> seconds. Raises ValueError with the accepted form."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 250ms, 1.5s or 2m")
    return float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def port_protocol(port: ServicePort) -> str:
    """`http`, `http2` or `tcp`: from appProtocol, else the port name's prefix, else HTTP."""
    for hint in (port.app_protocol or "", port.name.split("-", 1)[0]):
        hint = hint.lower()
        if hint in HTTP2_PROTOCOLS:
            return "http2"
        if hint in ("tcp", "http"):
            return hint
    return "http"


def is_http2(port: ServicePort) -> bool:
    return port_protocol(port) == "http2"


@dataclass(frozen=True, slots=True)
class _ClusterOptions:
    lb_policy: str
    connect_timeout_s: float
    patch: cluster_pb2.Cluster | None


@dataclass(frozen=True)
class ServiceOutput:
    """Everything one Service contributes; reused as long as the Service's inputs are unchanged."""

    clusters: tuple[Resource, ...] = ()
    assignments: tuple[Resource, ...] = ()
    # (port number, serialized VirtualHost) for the route configuration of that port.
    virtual_hosts: tuple[tuple[int, bytes], ...] = ()
    # (port number, cluster name) of TCP ports, each wanting a TCP proxy listener of its own.
    tcp_ports: tuple[tuple[int, str], ...] = ()
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class Translation:
    """The resources of one snapshot, by type URL then name, and what translation complained of."""

    resources: Mapping[str, Mapping[str, Resource]]
    problems: tuple[Problem, ...] = ()
    # Services translated afresh in this run (the rest were reused): a measure of incremental work.
    translated: int = 0
    changed: tuple[ServiceKey, ...] = ()


class _Claims(NamedTuple):
    """Which ambiguous domains (short name, ClusterIP) a Service may use."""

    short_name: bool
    cluster_ip: bool


def _claims(mesh: Mesh) -> tuple[dict[ServiceKey, _Claims], list[Problem]]:
    by_name: dict[str, list[ServiceKey]] = defaultdict(list)
    by_ip: dict[str, list[ServiceKey]] = defaultdict(list)
    for entry in mesh:
        service = entry.service
        by_name[service.name].append(service.key)
        if service.cluster_ip and not service.headless:
            by_ip[service.cluster_ip].append(service.key)
    problems: list[Problem] = []
    short_owner: set[ServiceKey] = set()
    for keys in by_name.values():
        if len(keys) == 1:
            short_owner.add(keys[0])
        else:
            short_owner.update(k for k in keys if k.namespace == "default")
    ip_owner: set[ServiceKey] = set()
    for ip, keys in by_ip.items():
        ip_owner.add(keys[0])  # the mesh iterates in key order, so the first is deterministic
        for other in keys[1:]:
            problems.append(
                error(
                    f"Service {other}",
                    "spec.clusterIP",
                    f"{ip} is already the ClusterIP of Service {keys[0]}; "
                    "this Service is reachable by name only",
                )
            )
    claims = {key: _Claims(key in short_owner, key in ip_owner) for key in mesh.keys}
    return claims, problems


class Translator:
    """Translates meshes into resources, remembering per-Service output between runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._memo: dict[ServiceKey, tuple[ServiceEntry, _Claims, ServiceOutput]] = {}
        self._listeners: dict[int, Resource] = {}

    def translate(self, mesh: Mesh) -> Translation:
        claims, problems = _claims(mesh)
        memo: dict[ServiceKey, tuple[ServiceEntry, _Claims, ServiceOutput]] = {}
        changed: list[ServiceKey] = []
        for entry in mesh:
            key = entry.service.key
            previous = self._memo.get(key)
            if (
                previous is not None
                and (previous[0] is entry or previous[0] == entry)
                and previous[1] == claims[key]
            ):
                memo[key] = previous
                continue
            memo[key] = (entry, claims[key], self._translate_service(entry, claims[key]))
            changed.append(key)
        self._memo = memo

        clusters: dict[str, Resource] = {}
        assignments: dict[str, Resource] = {}
        virtual_hosts: dict[int, list[bytes]] = defaultdict(list)
        tcp_ports: dict[int, list[tuple[ServiceKey, str]]] = defaultdict(list)
        for key in mesh.keys:
            output = memo[key][2]
            problems.extend(output.problems)
            clusters.update((r.name, r) for r in output.clusters)
            assignments.update((r.name, r) for r in output.assignments)
            for port, vhost in output.virtual_hosts:
                virtual_hosts[port].append(vhost)
            for port, name in output.tcp_ports:
                tcp_ports[port].append((key, name))

        listeners: dict[str, Resource] = {}
        for port, claimants in sorted(tcp_ports.items()):
            winner = None if port in virtual_hosts else claimants[0]
            for key, name in claimants:
                if (key, name) == winner:
                    continue
                problems.append(
                    error(
                        f"Service {key}",
                        "spec.ports",
                        f"TCP port {port} is already served "
                        + (
                            "by the HTTP listener of that port"
                            if winner is None
                            else f"for Service {winner[0]} (a TCP port forwards to one Service)"
                        )
                        + f"; cluster {name} gets no listener",
                    )
                )
            if winner is not None:
                listener = self._tcp_listener(port, winner[1], problems)
                if listener is not None:
                    listeners[listener.name] = listener
        routes: dict[str, Resource] = {}
        for port in sorted(virtual_hosts):
            listener = self._listener(port, problems)
            if listener is None:
                continue
            listeners[listener.name] = listener
            name = route_name(port)
            # RouteConfiguration: name is field 1, virtual_hosts field 2 (repeated).
            body = encode_len_field(1, name.encode()) + b"".join(
                encode_len_field(2, vhost) for vhost in virtual_hosts[port]
            )
            routes[name] = Resource.from_bytes(ROUTE, name, body)
        return Translation(
            resources={
                CLUSTER: clusters,
                ENDPOINT: assignments,
                LISTENER: listeners,
                ROUTE: routes,
            },
            problems=tuple(problems),
            translated=len(changed),
            changed=tuple(changed),
        )

    def _address(self, name: str, port: int, problems: list[Problem]) -> address_pb2.Address | None:
        envoy_port = port + self.settings.listener_port_offset
        if envoy_port > 65535:
            problems.append(
                error(
                    f"Listener {name}",
                    "",
                    f"service port {port} + listener port offset "
                    f"{self.settings.listener_port_offset} is above 65535; not served",
                )
            )
            return None
        return address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=self.settings.listener_address, port_value=envoy_port
            )
        )

    def _tcp_listener(self, port: int, cluster: str, problems: list[Problem]) -> Resource | None:
        name = tcp_listener_name(port)
        address = self._address(name, port, problems)
        if address is None:
            return None
        proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=f"tcp_{port}", cluster=cluster)
        listener = _listener_with(name, address, "envoy.filters.network.tcp_proxy", proxy)
        return Resource.from_message(name, listener, refs=((CLUSTER, cluster),))

    def _listener(self, port: int, problems: list[Problem]) -> Resource | None:
        cached = self._listeners.get(port)
        if cached is not None:
            return cached
        name = listener_name(port)
        address = self._address(name, port, problems)
        if address is None:
            return None
        manager = hcm_pb2.HttpConnectionManager(
            stat_prefix=f"http_{port}",
            codec_type=hcm_pb2.HttpConnectionManager.AUTO,
            rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=route_name(port)),
            http_filters=[
                hcm_pb2.HttpFilter(
                    name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
                )
            ],
        )
        if self.settings.tracing_cluster:
            manager.tracing.CopyFrom(self._tracing())
        listener = _listener_with(
            name, address, "envoy.filters.network.http_connection_manager", manager
        )
        resource = Resource.from_message(name, listener, refs=((ROUTE, route_name(port)),))
        self._listeners[port] = resource
        return resource

    def _tracing(self) -> hcm_pb2.HttpConnectionManager.Tracing:
        """Request spans to an OTLP collector through the Envoy cluster named in the settings
        (the bootstrap defines it). Envoy propagates W3C trace context to the upstreams."""
        provider = opentelemetry_pb2.OpenTelemetryConfig(
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                    cluster_name=self.settings.tracing_cluster or ""
                ),
                timeout=_duration(1.0),
            ),
            service_name=self.settings.tracing_service_name,
        )
        return hcm_pb2.HttpConnectionManager.Tracing(
            provider=http_tracer_pb2.Tracing.Http(
                name="envoy.tracers.opentelemetry", typed_config=_any(provider)
            ),
            random_sampling=percent_pb2.Percent(value=self.settings.tracing_sampling_percent),
            spawn_upstream_span=wrappers_pb2.BoolValue(value=True),
        )

    def _translate_service(self, entry: ServiceEntry, claims: _Claims) -> ServiceOutput:
        service = entry.service
        problems: list[Problem] = []
        options = self._cluster_options(service, problems)
        clusters: list[Resource] = []
        assignments: list[Resource] = []
        virtual_hosts: list[tuple[int, bytes]] = []
        tcp_ports: list[tuple[int, str]] = []
        for port in service.ports:
            if port.protocol != "TCP":
                problems.append(
                    warning(
                        f"Service {service.key}",
                        f"spec.ports[{service.ports.index(port)}].protocol",
                        f"{port.protocol} ports are not proxied; port {port.port} is left out",
                    )
                )
                continue
            name = cluster_name(service.key, port)
            if service.type == "ExternalName":
                clusters.append(self._external_cluster(service, port, name, options))
            else:
                clusters.append(self._eds_cluster(port, name, options))
                assignments.append(self._assignment(entry, port, name, problems))
            if port_protocol(port) == "tcp":
                tcp_ports.append((port.port, name))
                continue
            vhost = route_components_pb2.VirtualHost(
                name=str(service.key),
                domains=self._domains(service, port, claims),
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=name),
                    )
                ],
            )
            virtual_hosts.append((port.port, vhost.SerializeToString(deterministic=True)))
        return ServiceOutput(
            tuple(clusters),
            tuple(assignments),
            tuple(virtual_hosts),
            tuple(tcp_ports),
            tuple(problems),
        )

    def _cluster_options(self, service: Service, problems: list[Problem]) -> _ClusterOptions:
        settings = self.settings
        lb_policy = _annotation(
            service, LB_POLICY_ANNOTATION, _lb_policy, problems, f"using {settings.lb_policy}"
        )
        connect_timeout = _annotation(
            service,
            CONNECT_TIMEOUT_ANNOTATION,
            parse_duration,
            problems,
            f"using {settings.connect_timeout_s}s",
        )
        patch = _annotation(service, CLUSTER_PATCH_ANNOTATION, _cluster_patch, problems, "ignored")
        return _ClusterOptions(
            lb_policy or settings.lb_policy,
            settings.connect_timeout_s if connect_timeout is None else connect_timeout,
            patch,
        )

    def _finish_cluster(
        self, cluster: cluster_pb2.Cluster, port: ServicePort, options: _ClusterOptions
    ) -> cluster_pb2.Cluster:
        cluster.connect_timeout.CopyFrom(_duration(options.connect_timeout_s))
        cluster.load_balancing_policy.CopyFrom(load_balancing_policy(options.lb_policy))
        if is_http2(port):
            protocol_options = http_protocol_options_pb2.HttpProtocolOptions(
                explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                    http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
                )
            )
            cluster.typed_extension_protocol_options[
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ].CopyFrom(_any(protocol_options))
        if options.patch is not None:
            cluster.MergeFrom(options.patch)
        return cluster

    def _eds_cluster(self, port: ServicePort, name: str, options: _ClusterOptions) -> Resource:
        cluster = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
                eds_config=_ads_source(), service_name=name
            ),
        )
        self._finish_cluster(cluster, port, options)
        return Resource.from_message(name, cluster, refs=((ENDPOINT, name),))

    def _external_cluster(
        self, service: Service, port: ServicePort, name: str, options: _ClusterOptions
    ) -> Resource:
        # An ExternalName is a DNS alias: clients reach the external host on the service port.
        target = port.port
        cluster = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.STRICT_DNS,
            dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED,
            load_assignment=endpoint_pb2.ClusterLoadAssignment(
                cluster_name=name,
                endpoints=[
                    endpoint_components_pb2.LocalityLbEndpoints(
                        lb_endpoints=[_lb_endpoint(service.external_name or "", target)]
                    )
                ],
            ),
        )
        self._finish_cluster(cluster, port, options)
        return Resource.from_message(name, cluster)

    def _assignment(
        self, entry: ServiceEntry, port: ServicePort, name: str, problems: list[Problem]
    ) -> Resource:
        by_locality: dict[tuple[str, str], dict[tuple[str, int], int]] = defaultdict(dict)
        for group in entry.groups:
            number = _resolve_port(entry.service, port, group, problems)
            if number is None:
                continue
            for endpoint in group.endpoints:
                if endpoint.ready:
                    health = health_check_pb2.HEALTHY
                elif endpoint.serving and endpoint.terminating:
                    health = health_check_pb2.DRAINING
                else:
                    continue
                locality = (endpoint.region or "", endpoint.zone or "")
                existing = by_locality[locality].get((endpoint.address, number))
                # The same address in two slices (a slice being replaced): the healthier wins.
                if existing is None or health == health_check_pb2.HEALTHY:
                    by_locality[locality][(endpoint.address, number)] = health
        assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        for (region, zone), endpoints in sorted(by_locality.items()):
            assignment.endpoints.append(
                endpoint_components_pb2.LocalityLbEndpoints(
                    locality=base_pb2.Locality(region=region, zone=zone),
                    lb_endpoints=[
                        _lb_endpoint(address, number, health)
                        for (address, number), health in sorted(endpoints.items())
                    ],
                )
            )
        return Resource.from_message(name, assignment)

    def _domains(self, service: Service, port: ServicePort, claims: _Claims) -> list[str]:
        key = service.key
        bases = [
            f"{key.name}.{key.namespace}",
            f"{key.name}.{key.namespace}.svc",
            f"{key.name}.{key.namespace}.svc.{self.settings.cluster_domain}",
        ]
        if claims.short_name:
            bases.insert(0, key.name)
        if claims.cluster_ip and service.cluster_ip:
            ip = service.cluster_ip
            bases.append(f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip)
        return [domain for base in bases for domain in (base, f"{base}:{port.port}")]


def _listener_with(
    name: str, address: address_pb2.Address, filter_name: str, config: Message
) -> listener_pb2.Listener:
    """A listener with one filter chain of one network filter."""
    network_filter = listener_components_pb2.Filter(name=filter_name, typed_config=_any(config))
    return listener_pb2.Listener(
        name=name,
        address=address,
        filter_chains=[listener_components_pb2.FilterChain(filters=[network_filter])],
    )


def _annotation(
    service: Service,
    name: str,
    parse: Callable[[str], T],
    problems: list[Problem],
    instead: str,
) -> T | None:
    """The parsed value of a Service annotation; None when absent or invalid (with an error
    naming the annotation and saying what is done `instead`)."""
    value = service.annotation(name)
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        problems.append(
            error(f"Service {service.key}", f'metadata.annotations["{name}"]', f"{exc}; {instead}")
        )
        return None


def _lb_policy(value: str) -> str:
    if value.upper() not in LB_POLICIES:
        raise ValueError(f"{value!r} is not one of {', '.join(LB_POLICIES)}")
    return value.upper()


def _cluster_patch(value: str) -> cluster_pb2.Cluster:
    try:
        return json_format.Parse(value, cluster_pb2.Cluster())
    except (json_format.ParseError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"not a JSON object of envoy.config.cluster.v3.Cluster fields: {exc}"
        ) from exc


def _resolve_port(
    service: Service, port: ServicePort, group: EndpointGroup, problems: list[Problem]
) -> int | None:
    """The endpoint port serving `port`: the group's port named like the Service port."""
    for candidate in group.ports:
        if candidate.name == port.name and candidate.protocol == port.protocol:
            return candidate.port
    wanted = f"named {port.name!r}" if port.name else "without a name"
    problems.append(
        error(
            group.source,
            "ports",
            f"has no {port.protocol} port {wanted} for Service {service.key} port {port.port} "
            f"(targetPort {port.target_port!r}); its endpoints are left out of cluster "
            f"{cluster_name(service.key, port)}",
        )
    )
    return None


def _lb_endpoint(
    address: str, port: int, health: int = health_check_pb2.UNKNOWN
) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=address, port_value=port)
            )
        ),
        health_status=health,
    )


def for_api_type(resource: Resource, api_type: str, xds_cluster: str) -> Resource:
    """The resource for a client on per-type streams of `api_type` (GRPC or DELTA_GRPC): its EDS or
    RDS config source names the control plane's cluster instead of ADS. Other types pass as is."""
    if resource.type_url not in (CLUSTER, LISTENER):
        return resource
    source = config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.ApiType.Value(api_type),
            transport_api_version=config_source_pb2.V3,
            grpc_services=[
                grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=xds_cluster)
                )
            ],
            set_node_on_first_message_only=True,
        ),
        resource_api_version=config_source_pb2.V3,
    )
    message = decode(resource)
    if isinstance(message, cluster_pb2.Cluster):
        if message.eds_cluster_config.eds_config.HasField("ads"):
            message.eds_cluster_config.eds_config.CopyFrom(source)
    else:
        for chain in message.filter_chains:
            for network_filter in chain.filters:
                manager = hcm_pb2.HttpConnectionManager()
                if not network_filter.typed_config.Unpack(manager):
                    continue
                if manager.rds.config_source.HasField("ads"):
                    manager.rds.config_source.CopyFrom(source)
                    network_filter.typed_config.Pack(manager)
    return Resource.from_message(resource.name, message, refs=resource.refs)


def translate(mesh: Mesh, settings: Settings) -> Translation:
    """One-shot translation (no memory of earlier runs)."""
    return Translator(settings).translate(mesh)


def decode(resource: Resource) -> Message:
    """The message behind a resource, for display and tests; the hot path never needs it."""
    message_type = {
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        LISTENER: listener_pb2.Listener,
        ROUTE: route_pb2.RouteConfiguration,
    }[resource.type_url]
    return message_type.FromString(resource.body)


def to_json(resources_by_type: Mapping[str, Mapping[str, Resource]]) -> dict[str, list[dict]]:
    """Resources as proto3 JSON, grouped by short type name (CDS, EDS, LDS, RDS)."""
    out: dict[str, list[dict]] = {}
    for type_url in resources.ADS_ORDER:
        items = resources_by_type.get(type_url, {})
        out[resources.SHORT_NAMES[type_url]] = [
            json_format.MessageToDict(decode(items[name])) for name in sorted(items)
        ]
    return out


__all__ = [
    "Translation",
    "Translator",
    "cluster_name",
    "decode",
    "listener_name",
    "route_name",
    "to_json",
    "translate",
]
