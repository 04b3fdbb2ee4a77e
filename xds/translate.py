"""Pure translation of the mesh into Envoy resources: deterministic, no I/O, no clock.

Names, in one place:

- Cluster and its ClusterLoadAssignment: `<namespace>/<service>:<port>`, where `<port>` is the
  Service port's name, or its number when unnamed. The EDS service name is the cluster name.
- Listener: `port:<port>`, one for each distinct Service port number whatever its protocol, bound
  to `Settings.listener_address` on `<port> + Settings.listener_port_offset`. An address can be
  bound by one listener only, so every Service on a port number shares its listener, each through
  filter chains of its own.
- RouteConfiguration: `http:<port>`, named by the listener's HttpConnectionManager through RDS,
  holding the virtual hosts of the port's HTTP (and undeclared) Services.
- Virtual host: `<namespace>/<service>`, one per Service in the route configuration of each of its
  port numbers.
- API listener (proxyless gRPC): named as a gRPC client names its target `xds:///<host>:<port>`,
  for every HTTP-family port (http, http2, grpc, undeclared): `svc.ns:port`, `svc.ns.svc:port`,
  `svc.ns.svc.<cluster domain>:port`, and `<ClusterIP>:port` (`[<ip>]:port` for IPv6) when the
  Service owns its ClusterIP. Each holds an HttpConnectionManager that takes the port's route
  configuration `http:<port>` over ADS (the one Envoy uses: its virtual hosts hold these
  domains) and the router. The short name is left out: `svc:port` could be a Service named
  `port`'s listener `port:<n>` in form, and a short name means a namespace only to DNS. They are
  kept under `API_LISTENER` in a snapshot, served only to clients that name them.

Each port keeps its protocol (`xds.protocols`): HTTP ports share the HttpConnectionManager of their
port; TLS ports are passed through, matched by SNI on the Service's host names; TCP ports go
through tcp_proxy; undeclared ports are detected (http_inspector: HTTP to the connection manager,
anything else to tcp_proxy). Bytes that are not HTTP carry no host name, so when several Services
share a port number they are told apart by the destination address, as a node proxy receiving
redirected traffic sees it: a Service's ClusterIP selects its chain (the `original_dst` listener
filter restores the address that iptables rewrote). Connections to any other address go to the
port's default: its HTTP connection manager for HTTP, and for the rest the first Service (by
namespace/name) that has no ClusterIP, else the first one. A Service that has no ClusterIP and is
not that default cannot be reached on the port, and gets a warning. TLS Services are also told
apart by SNI. UDP and SCTP ports are not proxied (an info note).

A virtual host's domains are `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<cluster domain>`, the short
name `svc` and the ClusterIP, each with and without `:<port>`. Envoy rejects a route configuration
in which two virtual hosts share a domain, so when several namespaces use the same name the short
name goes to the Service in `default` (else to none), and a ClusterIP to the first Service that
claims it.

Per-Service annotations (prefix `xds.dev/`):

- `lb-policy`: RANDOM, ROUND_ROBIN or LEAST_REQUEST, overriding `Settings.lb_policy`.
- `connect-timeout`: a duration such as `250ms` or `2s`, at most an hour.
- `cluster-patch`: a JSON object of Envoy `Cluster` fields (proto3 JSON or field names) merged into
  every cluster of the Service, for traffic policy this control plane does not model. Off unless
  the Service's namespace is in `Settings.cluster_patch_namespaces` (`xds serve
  --allow-cluster-patch NS`, `*` for all), at most 8 KiB, and limited to the fields of
  `PATCHABLE_CLUSTER_FIELDS` (connection limits, timeouts, outlier detection, load balancer
  tuning, DNS refresh: what Istio's DestinationRule lets a user set), with no typed extension
  config inside them. A patch can never change a cluster's name, discovery or endpoints, TLS,
  metadata or extensions, so a Service cannot take over or redirect another's cluster (one did, by
  patching `name`). Envoy validates the values and NACKs what it cannot accept.

Annotations are tenant-written: a value too long, invalid or refused is an error naming the Service
and `metadata.annotations["<annotation>"]` (and, in a patch, the offending field), and the Service
is served without it.

No route to the proxy's own node: an endpoint address (EndpointSlice, Endpoints) in a loopback
(127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10) or unspecified (0.0.0.0/8, ::) range,
IPv4-mapped forms included, is left out of its clusters with an error naming the object and the
address's field, unless `Settings.allowed_endpoint_ranges` (`--allow-endpoints CIDR`) covers it:
from a proxy, such an address reaches the proxy's node itself (Envoy's admin API, whose
`/quitquitquit` stops it; the cloud metadata service at 169.254.169.254). The same goes for an
ExternalName target that is an IP literal (in any form a resolver reads as one: `127.1`,
`2130706433`) or a name of the local host (`localhost`, `*.localhost`, `localhost.localdomain`,
`ip6-localhost`, ...; allowed only if both 127.0.0.1 and ::1 are): its clusters keep their names
and have no endpoint. Other host names are not resolved here (translation does no I/O, and Envoy
resolves them again at every DNS refresh, so an answer checked here could differ from the one
Envoy connects to): a DNS name that resolves to such an address is not caught here. Where
tenants may create ExternalName Services, the DNS the proxies use must not answer such addresses
for outside names (most resolvers can filter them: dnsmasq's --stop-dns-rebind, Unbound's
private-address).

The work is incremental: a Translator remembers each Service's output and translates again only
the Services whose inputs changed; route configurations are assembled by joining the virtual hosts'
serialized bytes.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import ipaddress
import itertools
import json
import operator
import re
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, TypeVar, cast

from google.protobuf import any_pb2, duration_pb2, json_format, wrappers_pb2
from google.protobuf.message import Message

from xds._pb.envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from xds._pb.envoy.config.core.v3 import (
    address_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
)
from xds._pb.envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from xds._pb.envoy.config.listener.v3 import (
    api_listener_pb2,
    listener_components_pb2,
    listener_pb2,
)
from xds._pb.envoy.config.route.v3 import route_components_pb2
from xds._pb.envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from xds._pb.envoy.extensions.filters.http.router.v3 import router_pb2
from xds._pb.envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from xds._pb.envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from xds._pb.envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds._pb.envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from xds._pb.envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from xds._pb.envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from xds._pb.envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from xds._pb.envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from xds._pb.envoy.type.v3 import percent_pb2
from xds.config import LB_POLICIES, Settings, parse_cidr
from xds.localities import LOCALITY_AWARE_ANNOTATION, LOCALITY_SALT, LocalityAware
from xds.model import (
    Endpoint,
    EndpointGroup,
    Mesh,
    Problem,
    Service,
    ServiceEntry,
    ServiceKey,
    ServicePort,
    error,
    info,
    warning,
)
from xds.protocols import Kind, PortProtocol, port_protocol
from xds.resources import (
    API_LISTENER,
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Resource,
    encode_len_field,
    encode_varint,
)
from xds.scopes import (
    EXPORT_TO_ANNOTATION,
    MAX_EXPORT_TO_CHARS,
    PRIVATE,
    Contributions,
    Exports,
    PortScope,
    RouteScope,
    ServiceScope,
    exports_text,
    fingerprint,
    parse_export_to,
    salt_of,
    service_scope,
)

# Locality-aware clusters leave failing endpoints at once, so that a zone whose backends fail
# (5xx responses, refused connections: both count as 5xx here) gives its traffic to the next
# priority: after 3 failures in a row an endpoint is ejected for 30 s (longer each time), and a
# whole zone may be (the default would keep 90 % of it in). Envoy's own defaults are 5 in a row,
# 10 s checks and 10 %.
_FAILOVER_DETECTION = outlier_detection_pb2.OutlierDetection(
    consecutive_5xx=wrappers_pb2.UInt32Value(value=3),
    interval=duration_pb2.Duration(seconds=1),
    base_ejection_time=duration_pb2.Duration(seconds=30),
    max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
)

ANNOTATION_PREFIX = "xds.dev/"
LB_POLICY_ANNOTATION = ANNOTATION_PREFIX + "lb-policy"
CONNECT_TIMEOUT_ANNOTATION = ANNOTATION_PREFIX + "connect-timeout"
CLUSTER_PATCH_ANNOTATION = ANNOTATION_PREFIX + "cluster-patch"

# Annotation sizes: a value is tenant-written (up to 256 KiB in Kubernetes) and is parsed on every
# translation of its Service, and quoted in problems.
MAX_SHORT_ANNOTATION_CHARS = 64
MAX_CLUSTER_PATCH_CHARS = 8192
# Beyond this a connect timeout is a typo (and Envoy's Duration has a range: a longer value would
# fail the whole translation, not just this Service).
MAX_CONNECT_TIMEOUT_S = 3600.0

# The top-level Cluster fields a cluster-patch may set: traffic policy, as Istio's DestinationRule
# allows (connection limits, outlier detection, load balancer tuning, timeouts), and nothing that
# says which cluster this is or where its traffic goes. Left out, and why:
# - name, alt_stat_name, type/cluster_type, eds_cluster_config, load_assignment, lb_subset_config,
#   original_dst_lb_config, upstream_bind_config, dns_resolvers, dns_resolution_config,
#   typed_dns_resolver_config: identity, discovery and destinations (`name` once took over
#   another namespace's cluster, `load_assignment` sent traffic to another namespace's pods);
# - transport_socket(_matches/_matcher), metadata: TLS origination names SDS secrets and files on
#   the proxy's node, and metadata selects transport sockets;
# - typed_extension_protocol_options, upstream_config, filters, load_balancing_policy, lrs_server,
#   health_checks: typed extensions (upstream HTTP filters, custom pools), load reporting to a
#   cluster by name, health checkers whose event loggers write files on the proxy's node; the
#   xds.dev/lb-policy annotation covers the balancer, and health comes from Kubernetes readiness;
# - the deprecated lb_policy, *_lb_config, max_requests_per_connection and *_protocol_options:
#   superseded by fields above or overridden by what this control plane sets.
PATCHABLE_CLUSTER_FIELDS = frozenset(
    {
        "connect_timeout",
        "per_connection_buffer_limit_bytes",
        "circuit_breakers",
        "outlier_detection",
        "common_lb_config",
        "upstream_connection_options",
        "close_connections_on_host_health_failure",
        "ignore_health_on_host_removal",
        "preconnect_policy",
        "track_timeout_budgets",
        # ExternalName clusters resolve their target with DNS; these tune how often and how.
        "dns_refresh_rate",
        "dns_failure_refresh_rate",
        "dns_jitter",
        "respect_dns_ttl",
        "dns_lookup_family",
    }
)

T = TypeVar("T")

# What http_inspector reports for HTTP/1.0, HTTP/1.1 and HTTP/2 with prior knowledge.
DETECTED_HTTP = ("http/1.0", "http/1.1", "h2c")


def cluster_name(key: ServiceKey, port: ServicePort) -> str:
    return f"{key.namespace}/{key.name}:{port.label}"


def listener_name(port: int) -> str:
    return f"port:{port}"


def route_name(port: int) -> str:
    return f"http:{port}"


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
        raise ValueError(f"{_show(text)} is not a duration like 250ms, 1.5s or 2m")
    return float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


@dataclass(frozen=True, slots=True)
class _ClusterOptions:
    lb_policy: str
    connect_timeout_s: float
    patch: cluster_pb2.Cluster | None
    # Under scoping, whom the Service's clusters and assignments are visible to.
    scope: ServiceScope | None = None
    # Whether the Service keeps its traffic close (`xds.localities`).
    locality_aware: bool = False


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


@dataclass(frozen=True)
class ServiceOutput:
    """Everything one Service contributes; reused as long as the Service's inputs are unchanged."""

    clusters: tuple[Resource, ...] = ()
    assignments: tuple[Resource, ...] = ()
    # (port number, serialized VirtualHost) for the route configuration of that port.
    virtual_hosts: tuple[tuple[int, bytes], ...] = ()
    # Every proxied port, for the listener of its port number.
    claims: tuple[PortClaim, ...] = ()
    # The API listeners of its HTTP-family ports, for proxyless gRPC clients.
    api_listeners: tuple[Resource, ...] = ()
    problems: tuple[Problem, ...] = ()
    # The namespaces besides its own the Service is exported to (`xds.scopes`).
    exports: Exports = PRIVATE


@dataclass(frozen=True)
class Translation:
    """The resources of one snapshot, by type URL then name, and what translation complained of.

    `resource_changes` names, by type, the resources that differ from those of the translation
    numbered `base` (the same translator's previous one); `base` is None for a first translation,
    whose changes are everything. A consumer that holds translation `base` may apply these changes
    and nothing else.
    """

    resources: Mapping[str, Mapping[str, Resource]]
    problems: tuple[Problem, ...] = ()
    # Services translated afresh in this run (the rest were reused): a measure of incremental work.
    translated: int = 0
    changed: tuple[ServiceKey, ...] = ()
    serial: int = 0
    base: int | None = None
    resource_changes: Mapping[str, frozenset[str]] = field(default_factory=dict)


class _Claims(NamedTuple):
    """Which ambiguous domains (short name, ClusterIP) a Service may use."""

    short_name: bool
    cluster_ip: bool


def _claims_of(
    key: ServiceKey, same_name: list[ServiceKey], same_ip: list[ServiceKey] | None
) -> _Claims:
    """A Service's claims, from the Services of its name and of its ClusterIP (each sorted): the
    short name goes to a Service alone with its name, else to the one in `default`; a ClusterIP to
    the first Service (by namespace/name) that claims it."""
    short = len(same_name) == 1 or key.namespace == "default"
    return _Claims(short, same_ip is not None and same_ip[0] == key)


def _ip_problems(ip: str, keys: list[ServiceKey]) -> tuple[Problem, ...]:
    return tuple(
        error(
            f"Service {other}",
            "spec.clusterIP",
            f"{ip} is already the ClusterIP of Service {keys[0]}; "
            "this Service is reachable by name only",
        )
        for other in keys[1:]
    )


def _cluster_ip(entry: ServiceEntry | None) -> str | None:
    """The ClusterIP a Service claims (None for none, or headless)."""
    if entry is None or entry.service.headless:
        return None
    return entry.service.cluster_ip or None


def _update_sorted(
    keys: list[ServiceKey], added: set[ServiceKey], removed: set[ServiceKey]
) -> list[ServiceKey]:
    """`keys` (sorted) with `added` and without `removed`: in place for a few, sorted afresh for
    many (a first translation adds thousands to one port)."""
    if len(added) + len(removed) > 32:
        present = set(keys)
        present.difference_update(removed)
        present.update(added)
        return sorted(present)
    for key in removed:
        index = bisect.bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            del keys[index]
    for key in added:
        index = bisect.bisect_left(keys, key)
        if index == len(keys) or keys[index] != key:
            keys.insert(index, key)
    return keys


class _Group:
    """Keys grouped by a value (a Service name, a ClusterIP), each group kept sorted; the changes
    of one run are gathered first and applied together."""

    def __init__(self) -> None:
        self.groups: dict[str, list[ServiceKey]] = {}
        self._added: dict[str, set[ServiceKey]] = defaultdict(set)
        self._removed: dict[str, set[ServiceKey]] = defaultdict(set)

    def move(self, key: ServiceKey, old: str | None, new: str | None) -> None:
        if old == new:
            return
        if old is not None:
            self._removed[old].add(key)
            self._added[old].discard(key)
        if new is not None:
            self._added[new].add(key)
            self._removed[new].discard(key)

    def apply(self) -> set[str]:
        """Apply the gathered changes; return the values whose groups changed."""
        touched = self._added.keys() | self._removed.keys()
        for value in touched:
            keys = _update_sorted(
                self.groups.get(value, []),
                self._added.get(value, set()),
                self._removed.get(value, set()),
            )
            if keys:
                self.groups[value] = keys
            else:
                self.groups.pop(value, None)
        self._added.clear()
        self._removed.clear()
        return touched


class _Run:
    """The changes of one translation run: per type, the names set or removed, written into
    copies of the previous run's dicts (copied on first write, so a Translation handed out is
    never changed)."""

    def __init__(self, resources: dict[str, dict[str, Resource]]) -> None:
        self._previous = resources
        self.resources = dict(resources)
        self.changed: dict[str, set[str]] = {}
        # Names a Service gave up and names Services set, by type: a name can pass from one
        # Service to another in a run (a ClusterIP's API listener), whichever is translated first.
        self._released: set[tuple[str, str]] = set()
        self._placed: set[tuple[str, str]] = set()

    def _writable(self, type_url: str) -> dict[str, Resource]:
        items = self.resources[type_url]
        if items is self._previous[type_url]:
            items = self.resources[type_url] = items.copy()
        return items

    def put(self, resource: Resource, kept_as: str | None = None) -> None:
        """Sets a resource, under its own type unless `kept_as` names another (API_LISTENER)."""
        type_url = kept_as or resource.type_url
        self._placed.add((type_url, resource.name))
        held = self.resources[type_url].get(resource.name)
        if held is not None and held.version == resource.version:
            return
        self._writable(type_url)[resource.name] = resource
        self.changed.setdefault(type_url, set()).add(resource.name)

    def remove(self, type_url: str, name: str) -> None:
        if name not in self.resources[type_url]:
            return
        del self._writable(type_url)[name]
        self.changed.setdefault(type_url, set()).add(name)

    def release(self, type_url: str, name: str) -> None:
        """A Service no longer sets this name: removed by `settle` unless one sets it meanwhile."""
        self._released.add((type_url, name))

    def settle(self) -> None:
        for type_url, name in self._released - self._placed:
            self.remove(type_url, name)
        self._released.clear()
        self._placed.clear()


def _by_port(pairs: Iterable[tuple[int, T]]) -> dict[int, tuple[T, ...]]:
    out: dict[int, list[T]] = {}
    for port, value in pairs:
        out.setdefault(port, []).append(value)
    return {port: tuple(values) for port, values in out.items()}


class Translator:
    """Translates meshes into resources, remembering per-Service output between runs.

    A run looks at the Services that changed only: those the mesh says changed since the mesh this
    translator translated last (any other mesh is compared entry by entry), and those whose claims
    (short name, ClusterIP) a change moved. Listeners and route configurations are rebuilt for the
    ports whose claims or virtual hosts changed; the rest is kept, and so are the versions of what
    did not change. A first run is a run in which everything changed.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._destinations = _Destinations(settings.allowed_endpoint_ranges)
        self._serial = 0
        self._forget()

    def _forget(self) -> None:
        """Start again from nothing: the next run translates everything and reports no base."""
        self._fresh = True
        self._memo: dict[ServiceKey, tuple[ServiceEntry, _Claims, ServiceOutput]] = {}
        self._mesh_generation: int | None = None
        self._names = _Group()
        self._ips = _Group()
        self._ip_of: dict[ServiceKey, str] = {}
        self._ip_problems: dict[str, tuple[Problem, ...]] = {}
        self._service_problems: dict[ServiceKey, tuple[Problem, ...]] = {}
        # Per port number: the Services with a claim on it (sorted), their claims and their
        # virtual hosts (already framed as RouteConfiguration field 2).
        self._port_keys: dict[int, list[ServiceKey]] = {}
        self._port_claims: dict[int, dict[ServiceKey, tuple[PortClaim, ...]]] = {}
        self._port_hosts: dict[int, dict[ServiceKey, bytes]] = {}
        # With scoping: each Service's exports (when it has any), and per port number the
        # fingerprint of each claimant's claims and exports, XORed into the listener's salt.
        self._exports: dict[ServiceKey, Exports] = {}
        self._port_prints: dict[int, dict[ServiceKey, int]] = {}
        # Per port number: the claims (and salt) a listener was built from, the listener and its
        # problems.
        self._listeners: dict[
            int, tuple[tuple[tuple[PortClaim, ...], bytes], Resource | None, tuple[Problem, ...]]
        ] = {}
        self._resources: dict[str, dict[str, Resource]] = {
            CLUSTER: {},
            ENDPOINT: {},
            LISTENER: {},
            ROUTE: {},
            API_LISTENER: {},
        }
        self._problems: tuple[Problem, ...] = ()

    def translate(self, mesh: Mesh) -> Translation:
        try:
            return self._translate(mesh)
        except BaseException:
            # A run that failed half-way leaves its state half-updated: the next one starts over.
            self._forget()
            raise

    def _translate(self, mesh: Mesh) -> Translation:
        if mesh.generation == self._mesh_generation:
            dirty: set[ServiceKey] = set()
        elif mesh.parent is not None and mesh.parent == self._mesh_generation:
            dirty = set(mesh.changed)
        else:
            dirty = self._compare(mesh)
        self._mesh_generation = mesh.generation
        base = None if self._fresh else self._serial
        self._fresh = False
        self._serial += 1
        run = _Run(self._resources)

        # Who may use which ambiguous domain: the groups of the changed Services' names and IPs.
        for key in dirty:
            entry = mesh.get(key)
            held = key in self._memo
            if held != (entry is not None):
                self._names.move(key, key.name if held else None, None if held else key.name)
            ip = _cluster_ip(entry)
            self._ips.move(key, self._ip_of.get(key), ip)
            if ip is None:
                self._ip_of.pop(key, None)
            else:
                self._ip_of[key] = ip
        names = self._names.apply()
        ips = self._ips.apply()
        problems_changed = False
        for ip in ips:
            keys = self._ips.groups.get(ip, [])
            found = _ip_problems(ip, keys) if len(keys) > 1 else ()
            if found != self._ip_problems.get(ip, ()):
                problems_changed = True
                if found:
                    self._ip_problems[ip] = found
                else:
                    self._ip_problems.pop(ip, None)
        look = set(dirty)
        for name in names:
            look.update(self._names.groups.get(name, ()))
        for ip in ips:
            look.update(self._ips.groups.get(ip, ()))

        # Translate the Services whose entry or claims changed; collect what their output moved.
        translated: list[ServiceKey] = []
        listener_ports: set[int] = set()
        route_ports: set[int] = set()
        for key in sorted(look):
            entry = mesh.get(key)
            previous = self._memo.get(key)
            if entry is None:
                if previous is None:
                    continue
                del self._memo[key]
                output = ServiceOutput()
            else:
                same_ip = self._ips.groups.get(self._ip_of.get(key, ""))
                claims = _claims_of(key, self._names.groups[key.name], same_ip)
                if (
                    previous is not None
                    and (previous[0] is entry or previous[0] == entry)
                    and previous[1] == claims
                ):
                    continue
                output = self._translate_service(entry, claims)
                self._memo[key] = (entry, claims, output)
                translated.append(key)
            before = previous[2] if previous is not None else ServiceOutput()
            problems_changed |= self._apply_output(
                key, before, output, run, listener_ports, route_ports
            )

        run.settle()
        for port in sorted(listener_ports):
            problems_changed |= self._rebuild_listener(port, run)
            route_ports.add(port)
        for port in sorted(route_ports):
            self._rebuild_route(port, run)

        if problems_changed:
            self._problems = self._collect_problems()
        self._resources = run.resources
        return Translation(
            resources={url: MappingProxyType(items) for url, items in run.resources.items()},
            problems=self._problems,
            translated=len(translated),
            changed=tuple(translated),
            serial=self._serial,
            base=base,
            resource_changes={url: frozenset(names) for url, names in run.changed.items()},
        )

    def _compare(self, mesh: Mesh) -> set[ServiceKey]:
        """The keys whose entry differs from the one last translated: a mesh of unknown parentage
        is compared whole."""
        memo = self._memo
        dirty = {key for key in memo if key not in mesh}
        for key, entry in mesh.entries.items():
            previous = memo.get(key)
            if previous is None or (previous[0] is not entry and previous[0] != entry):
                dirty.add(key)
        return dirty

    def _apply_output(
        self,
        key: ServiceKey,
        before: ServiceOutput,
        after: ServiceOutput,
        run: _Run,
        listener_ports: set[int],
        route_ports: set[int],
    ) -> bool:
        """Record what one Service's new output changes; return whether its problems changed."""
        for type_url, old, new in (
            (CLUSTER, before.clusters, after.clusters),
            (ENDPOINT, before.assignments, after.assignments),
            (API_LISTENER, before.api_listeners, after.api_listeners),
        ):
            for resource in new:
                run.put(resource, type_url)
            kept = {resource.name for resource in new}
            for resource in old:
                if resource.name not in kept:
                    run.release(type_url, resource.name)
        # Under scoping, exports are part of what a port's listener and routes are built from.
        exports_moved = self.settings.scoped and before.exports != after.exports
        if after.exports:
            self._exports[key] = after.exports
        else:
            self._exports.pop(key, None)
        if before.claims != after.claims or exports_moved:
            old_claims = _by_port((c.port, c) for c in before.claims)
            new_claims = _by_port((c.port, c) for c in after.claims)
            for port in old_claims.keys() | new_claims.keys():
                claims = new_claims.get(port)
                if claims == old_claims.get(port) and not exports_moved:
                    continue
                listener_ports.add(port)
                by_key = self._port_claims.setdefault(port, {})
                if claims is None:
                    del by_key[key]
                else:
                    by_key[key] = claims
                if self.settings.scoped:
                    prints = self._port_prints.setdefault(port, {})
                    if claims is None:
                        prints.pop(key, None)
                    else:
                        text = f"{key}|{exports_text(after.exports)}|{claims!r}"
                        prints[key] = fingerprint(text)
        if before.virtual_hosts != after.virtual_hosts or exports_moved:
            old_hosts = _by_port(before.virtual_hosts)
            new_hosts = _by_port(after.virtual_hosts)
            for port in old_hosts.keys() | new_hosts.keys():
                hosts = new_hosts.get(port)
                if hosts == old_hosts.get(port) and not exports_moved:
                    continue
                route_ports.add(port)
                framed = self._port_hosts.setdefault(port, {})
                if hosts is None:
                    del framed[key]
                else:
                    framed[key] = b"".join(encode_len_field(2, vhost) for vhost in hosts)
        if before.problems == after.problems:
            return False
        if after.problems:
            self._service_problems[key] = after.problems
        else:
            self._service_problems.pop(key, None)
        return True

    def _rebuild_listener(self, port: int, run: _Run) -> bool:
        """Rebuild the listener of a port whose claims changed; return whether its problems did."""
        by_key = self._port_claims.get(port, {})
        keys = self._port_keys.get(port, [])
        present = set(by_key)
        keys = _update_sorted(keys, present.difference(keys), set(keys).difference(present))
        name = listener_name(port)
        cached = self._listeners.get(port)
        old_problems = cached[2] if cached is not None else ()
        if not keys:
            self._port_keys.pop(port, None)
            self._port_claims.pop(port, None)
            self._port_prints.pop(port, None)
            self._listeners.pop(port, None)
            run.remove(LISTENER, name)
            return bool(old_problems)
        self._port_keys[port] = keys
        claims = tuple(itertools.chain.from_iterable(map(by_key.__getitem__, keys)))
        detail: PortScope | None = None
        salt = b""
        if self.settings.scoped:
            detail = PortScope(
                port,
                Contributions(
                    tuple(keys), tuple(map(by_key.__getitem__, keys)), self._exported_of(by_key)
                ),
            )
            salt = salt_of(_xor(self._port_prints.get(port, {}).values()))
        if cached is None or cached[0] != (claims, salt):
            built = port_listener(self.settings, port, claims, detail, salt)
            cached = ((claims, salt), *built)
            self._listeners[port] = cached
        _, listener, problems = cached
        if listener is None:
            run.remove(LISTENER, name)
        else:
            run.put(listener)
        return problems != old_problems

    def _rebuild_route(self, port: int, run: _Run) -> None:
        """The route configuration of a port: its HTTP Services' virtual hosts, in key order."""
        name = route_name(port)
        framed = self._port_hosts.get(port)
        if not framed:
            self._port_hosts.pop(port, None)
            run.remove(ROUTE, name)
            return
        # Kept even when the port has no Envoy listener (its port + offset is out of range): the
        # port's API listeners use it.
        keys = self._port_keys[port]
        hosts = (
            [framed[key] for key in keys if key in framed]
            if len(framed) < len(keys)
            else list(map(framed.__getitem__, keys))
        )
        # RouteConfiguration: name is field 1, virtual_hosts field 2 (repeated).
        body = encode_len_field(1, name.encode()) + b"".join(hosts)
        if not self.settings.scoped:
            run.put(Resource.from_bytes(ROUTE, name, body))
            return
        present = tuple(key for key in keys if key in framed) if len(framed) < len(keys) else keys
        exported = self._exported_of(framed)
        salt = salt_of(
            _xor(fingerprint(f"{key}|{exports_text(exports)}") for key, exports in exported.items())
        )
        detail = RouteScope(Contributions(tuple(present), tuple(hosts), exported))
        run.put(Resource.from_bytes(ROUTE, name, body, detail=detail, salt=salt))

    def _exported_of(self, by_key: Mapping[ServiceKey, object]) -> dict[ServiceKey, Exports]:
        """The exports of those of a port's Services that are exported anywhere (a few)."""
        exports = self._exports
        if len(exports) > len(by_key):
            return {key: exports[key] for key in by_key if key in exports}
        return {key: value for key, value in exports.items() if key in by_key}

    def _collect_problems(self) -> tuple[Problem, ...]:
        """Every problem, in the order of a whole walk: ClusterIP conflicts (by the first
        claimant), then each Service's in key order, then each listener's in port order."""
        problems: list[Problem] = []
        ips = self._ips.groups
        for ip in sorted(self._ip_problems, key=lambda ip: ips[ip][0]):
            problems.extend(self._ip_problems[ip])
        for key in sorted(self._service_problems):
            problems.extend(self._service_problems[key])
        for port in sorted(self._listeners):
            problems.extend(self._listeners[port][2])
        return tuple(problems)

    def _translate_service(self, entry: ServiceEntry, claims: _Claims) -> ServiceOutput:
        service = entry.service
        problems: list[Problem] = []
        options = self._cluster_options(service, problems)
        exports = _annotation(
            service,
            EXPORT_TO_ANNOTATION,
            _bounded(MAX_EXPORT_TO_CHARS, lambda value: parse_export_to(value, service.namespace)),
            problems,
            "visible to its own namespace only",
        )
        exports = exports if exports is not None else PRIVATE
        if self.settings.scoped:
            # Whom its resources are visible to rides along, and moves their versions when it moves.
            options = dataclasses.replace(options, scope=ServiceScope(service.key, exports))
        if self._locality_aware(entry, problems):
            options = dataclasses.replace(options, locality_aware=True)
        if service.type == "ExternalName":
            groups: tuple[EndpointGroup, ...] = ()
            external = self._external_target(service, problems)
        else:
            groups = self._vet_endpoints(entry, problems)
        clusters: list[Resource] = []
        assignments: list[Resource] = []
        virtual_hosts: list[tuple[int, bytes]] = []
        port_claims: list[PortClaim] = []
        api_listeners: list[Resource] = []
        for port in service.ports:
            if port.protocol != "TCP":
                problems.append(
                    info(
                        f"Service {service.key}",
                        f"spec.ports[{service.ports.index(port)}].protocol",
                        f"{port.protocol} ports are not proxied; port {port.port} is left out",
                    )
                )
                continue
            name = cluster_name(service.key, port)
            protocol = port_protocol(port)
            if service.type == "ExternalName" and external is not None:
                clusters.append(self._external_cluster(external, port, protocol, name, options))
            elif service.type == "ExternalName":
                # A refused target: the cluster stays (routes and tcp_proxy name it) with no
                # endpoint, as an EDS cluster whose assignment is empty (gRPC, unlike Envoy,
                # refuses a STATIC cluster).
                clusters.append(self._eds_cluster(protocol, name, options))
                assignments.append(self._assignment(service, (), port, name, problems, options))
            else:
                clusters.append(self._eds_cluster(protocol, name, options))
                assignments.append(self._assignment(service, groups, port, name, problems, options))
            port_claims.append(
                PortClaim(
                    port.port,
                    service.key,
                    name,
                    protocol,
                    service.cluster_ip if claims.cluster_ip else None,
                    self._host_names(service, claims) if protocol.kind is Kind.TLS else (),
                )
            )
            if not protocol.kind.speaks_http:
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
            api_listeners.extend(
                api_listener(target, port.port, options.scope)
                for target in self._targets(service, port, claims)
            )
        return ServiceOutput(
            clusters=tuple(clusters),
            assignments=tuple(assignments),
            virtual_hosts=tuple(virtual_hosts),
            claims=tuple(port_claims),
            api_listeners=tuple(api_listeners),
            problems=tuple(problems),
            exports=exports,
        )

    def _locality_aware(self, entry: ServiceEntry, problems: list[Problem]) -> bool:
        """Whether a Service keeps its traffic close (`xds.localities`): its annotation says so
        either way, else its trafficDistribution, its EndpointSlices' hints or the settings."""
        service = entry.service
        explicit = _annotation(
            service,
            LOCALITY_AWARE_ANNOTATION,
            _bounded(MAX_SHORT_ANNOTATION_CHARS, _true_or_false),
            problems,
            "deciding by spec.trafficDistribution and the EndpointSlice hints",
        )
        if explicit is not None:
            return explicit
        return (
            self.settings.locality_aware
            or service.traffic_distribution is not None
            or any(e.zone_hints for group in entry.groups for e in group.endpoints)
        )

    def _cluster_options(self, service: Service, problems: list[Problem]) -> _ClusterOptions:
        settings = self.settings
        lb_policy = _annotation(
            service,
            LB_POLICY_ANNOTATION,
            _bounded(MAX_SHORT_ANNOTATION_CHARS, _lb_policy),
            problems,
            f"using {settings.lb_policy}",
        )
        connect_timeout = _annotation(
            service,
            CONNECT_TIMEOUT_ANNOTATION,
            _bounded(MAX_SHORT_ANNOTATION_CHARS, _connect_timeout),
            problems,
            f"using {settings.connect_timeout_s}s",
        )
        patch = None
        raw_patch = service.annotation(CLUSTER_PATCH_ANNOTATION)
        if raw_patch is not None:
            allowed = settings.cluster_patch_namespaces
            if service.namespace in allowed or "*" in allowed:
                patch = _cluster_patch(service, raw_patch, problems)
            else:
                problems.append(
                    error(
                        f"Service {service.key}",
                        f'metadata.annotations["{CLUSTER_PATCH_ANNOTATION}"]',
                        f"cluster patches are not enabled for namespace {service.namespace} "
                        f"(xds serve --allow-cluster-patch {service.namespace}); ignored",
                    )
                )
        return _ClusterOptions(
            lb_policy or settings.lb_policy,
            settings.connect_timeout_s if connect_timeout is None else connect_timeout,
            patch,
        )

    def _finish_cluster(
        self, cluster: cluster_pb2.Cluster, protocol: PortProtocol, options: _ClusterOptions
    ) -> cluster_pb2.Cluster:
        cluster.connect_timeout.CopyFrom(_duration(options.connect_timeout_s))
        cluster.load_balancing_policy.CopyFrom(load_balancing_policy(options.lb_policy))
        if options.locality_aware:
            cluster.outlier_detection.CopyFrom(_FAILOVER_DETECTION)
            # Envoy merges host health changes for a second (update_merge_window) after the first:
            # the first endpoint ejected leaves at once, the others only a second later, and a
            # zone failing all at once kept half its traffic meanwhile (1,700 failed requests in
            # a test where 6 fail without the window). A zone's failover must not wait for it.
            cluster.common_lb_config.update_merge_window.CopyFrom(duration_pb2.Duration())
        protocol_options = _upstream_http(protocol.kind)
        if protocol_options is not None:
            cluster.typed_extension_protocol_options[
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ].CopyFrom(_any(protocol_options))
        if options.patch is not None:
            cluster.MergeFrom(options.patch)
        return cluster

    def _eds_cluster(self, protocol: PortProtocol, name: str, options: _ClusterOptions) -> Resource:
        cluster = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
                eds_config=_ads_source(), service_name=name
            ),
        )
        self._finish_cluster(cluster, protocol, options)
        return Resource.from_message(name, cluster, ((ENDPOINT, name),), *_marks(options.scope))

    def _assignment_marks(self, options: _ClusterOptions) -> tuple[object, bytes]:
        """An assignment's detail and salt: its scope, and whether it is locality-aware."""
        if not options.locality_aware:
            return _marks(options.scope)
        scope_salt = options.scope.salt if options.scope is not None else b""
        return LocalityAware(options.scope), scope_salt + LOCALITY_SALT

    def _external_cluster(
        self,
        target: str,
        port: ServicePort,
        protocol: PortProtocol,
        name: str,
        options: _ClusterOptions,
    ) -> Resource:
        # An ExternalName is a DNS alias (a CNAME): clients reach the external host on the
        # service port, each new connection at an address the name resolves to then. That is
        # LOGICAL_DNS, which gRPC's clients also take (they refuse STRICT_DNS).
        cluster = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.LOGICAL_DNS,
            dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED,
            load_assignment=endpoint_pb2.ClusterLoadAssignment(
                cluster_name=name,
                endpoints=[
                    endpoint_components_pb2.LocalityLbEndpoints(
                        lb_endpoints=[_lb_endpoint(target, port.port)]
                    )
                ],
            ),
        )
        self._finish_cluster(cluster, protocol, options)
        return Resource.from_message(name, cluster, (), *_marks(options.scope))

    def _external_target(self, service: Service, problems: list[Problem]) -> str | None:
        """The host an ExternalName Service's clusters resolve, or None (with an error) when it
        names the proxy's own node: `localhost` and its kin, or an IP literal in a refused range
        (in any form a resolver reads as IPv4: `127.1`, `2130706433`, `0x7f.1`). Other host names
        are resolved by Envoy, not here: translation does no I/O, and Envoy resolves again every
        DNS refresh, so an answer checked here could differ from the one Envoy uses (see the
        module docstring)."""
        target = service.external_name or ""
        host = target.removesuffix(".").lower()
        why: str | None = None
        allowance = "CIDR"
        if host in _LOCAL_HOST_NAMES or host.endswith(".localhost"):
            # It may resolve to either loopback address (a patch may set dns_lookup_family).
            if not all(self._destinations.allows(ip) for ip in _LOCAL_HOST_ADDRESSES):
                why = "names the local host, which " + _WHY_REFUSED["loopback"].removeprefix("is ")
                allowance = "127.0.0.1/32 --allow-endpoints ::1/128"
        else:
            packed = _packed_ipv4_literal(host)
            if packed is not None:
                why = self._destinations.refusal(packed)
        if why is None:
            return target
        problems.append(
            error(
                f"Service {service.key}",
                "spec.externalName",
                f"{_show(target)} {why}; its clusters have no endpoint (allow with "
                f"--allow-endpoints {allowance})",
            )
        )
        return None

    def _vet_endpoints(
        self, entry: ServiceEntry, problems: list[Problem]
    ) -> tuple[EndpointGroup, ...]:
        """The entry's endpoint groups without the addresses the proxy must not be sent to
        (loopback, link-local, unspecified, unless allowed), each refused with an error naming
        the EndpointSlice or Endpoints object and the address's field."""
        refusal = self._destinations.refusal_of_text
        vetted: list[EndpointGroup] | None = None
        subset = 0  # which subset of an Endpoints object (its groups come one after another)
        for index, group in enumerate(entry.groups):
            if index and group.source == entry.groups[index - 1].source:
                subset += 1
            else:
                subset = 0
            kept: list[Endpoint] | None = None
            for position, endpoint in enumerate(group.endpoints):
                why = refusal(endpoint.address)
                if why is None:
                    if kept is not None:
                        kept.append(endpoint)
                    continue
                if kept is None:
                    kept = list(group.endpoints[:position])
                problems.append(
                    error(
                        group.source,
                        _address_field(group, subset, position),
                        f"{_show(endpoint.address)} {why}; left out of Service {entry.service.key} "
                        "(allow with --allow-endpoints CIDR)",
                    )
                )
            if kept is not None and vetted is None:
                vetted = list(entry.groups[:index])
            if vetted is not None:
                vetted.append(
                    group if kept is None else EndpointGroup(group.source, group.ports, tuple(kept))
                )
        return entry.groups if vetted is None else tuple(vetted)

    def _assignment(
        self,
        service: Service,
        groups: tuple[EndpointGroup, ...],
        port: ServicePort,
        name: str,
        problems: list[Problem],
        options: _ClusterOptions,
    ) -> Resource:
        by_locality: dict[
            tuple[str, str, str], dict[tuple[str, int], health_check_pb2.HealthStatus]
        ] = defaultdict(dict)
        for group in groups:
            number = _resolve_port(service, port, group, problems)
            if number is None:
                continue
            for endpoint in group.endpoints:
                if endpoint.ready:
                    health = health_check_pb2.HEALTHY
                elif endpoint.serving and endpoint.terminating:
                    health = health_check_pb2.DRAINING
                else:
                    continue
                # The Kubernetes cluster an endpoint is in goes into its locality's sub-zone
                # (`xds.localities`): one locality per cluster, region and zone.
                locality = (endpoint.region or "", endpoint.zone or "", endpoint.cluster or "")
                existing = by_locality[locality].get((endpoint.address, number))
                # The same address in two slices (a slice being replaced): the healthier wins.
                if existing is None or health == health_check_pb2.HEALTHY:
                    by_locality[locality][(endpoint.address, number)] = health
        localities = [
            (region, zone, cluster, sorted(endpoints.items()))
            for (region, zone, cluster), endpoints in sorted(by_locality.items())
        ]
        body = encode_assignment(name, localities)
        return Resource.from_bytes(ENDPOINT, name, body, (), *self._assignment_marks(options))

    def _host_names(self, service: Service, claims: _Claims) -> tuple[str, ...]:
        """The DNS names clients use for the Service (also its TLS server names)."""
        key = service.key
        names = (
            f"{key.name}.{key.namespace}",
            f"{key.name}.{key.namespace}.svc",
            f"{key.name}.{key.namespace}.svc.{self.settings.cluster_domain}",
        )
        return (key.name, *names) if claims.short_name else names

    def _domains(self, service: Service, port: ServicePort, claims: _Claims) -> list[str]:
        bases = list(self._host_names(service, claims))
        ip = _host_ip(service, claims)
        if ip is not None:
            bases.append(ip)
        return [domain for base in bases for domain in (base, f"{base}:{port.port}")]

    def _targets(self, service: Service, port: ServicePort, claims: _Claims) -> list[str]:
        """The `host:port` targets a gRPC client may name the Service port by (its API listeners):
        its domains with the port but the short name."""
        hosts = list(self._host_names(service, _Claims(False, claims.cluster_ip)))
        ip = _host_ip(service, claims)
        if ip is not None:
            hosts.append(ip)
        return [f"{host}:{port.port}" for host in hosts]


def _host_ip(service: Service, claims: _Claims) -> str | None:
    """The Service's ClusterIP as a URL host (IPv6 in brackets), when it owns it."""
    if not (claims.cluster_ip and service.cluster_ip):
        return None
    ip = service.cluster_ip
    return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip


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
    """The API listener a gRPC client asks for by its target `host:port` (module docstring)."""
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
    """The listener of one port number: a filter chain (or two) per way in, see the module
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


# Why an address is refused, by the kind of range it is in.
_WHY_REFUSED = {
    "loopback": "is a loopback address: from the proxy it reaches the proxy's own node (Envoy's "
    "admin API among others)",
    "link-local": "is a link-local address: from the proxy it reaches the node's link (the cloud "
    "metadata service at 169.254.169.254 among others)",
    "unspecified": "is an unspecified address: a connection to it reaches the proxy's own node",
    "invalid": "is not an IP address",
}
# Names that resolve to the local host whatever DNS says: RFC 6761's localhost (and *.localhost),
# and the loopback names of common /etc/hosts files.
_LOCAL_HOST_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
        "ip6-localhost",
        "ip6-loopback",
    }
)
_LOCAL_HOST_ADDRESSES = (socket.inet_pton(socket.AF_INET, "127.0.0.1"), bytes(15) + b"\x01")


def _local_kind(packed: bytes) -> str | None:
    """The refused range a packed IPv4 or IPv6 address is in: loopback (127.0.0.0/8, ::1),
    link-local (169.254.0.0/16, fe80::/10) or unspecified (0.0.0.0/8, which Linux connects
    locally, and ::); IPv4-mapped IPv6 addresses (::ffff:127.0.0.1) as their IPv4 address."""
    if len(packed) == 16:
        if packed[:12] == _MAPPED_PREFIX:
            return _local_kind(packed[12:])
        if packed[:15] == bytes(15) and packed[15] < 2:
            return "loopback" if packed[15] else "unspecified"
        if packed[0] == 0xFE and packed[1] & 0xC0 == 0x80:
            return "link-local"
        return None
    first = packed[0]
    if first == 127:
        return "loopback"
    if first == 169 and packed[1] == 254:
        return "link-local"
    if first == 0:
        return "unspecified"
    return None


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def _packed_ipv4_literal(host: str) -> bytes | None:
    """`host` as a packed address when a resolver would take it for one: inet_aton's forms
    (`127.0.0.1`, `127.1`, `2130706433`, `0x7f.1`) and IPv6 literals; None for a host name."""
    try:
        return socket.inet_aton(host)
    except (OSError, ValueError):
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, host.strip("[]"))
    except (OSError, ValueError):
        return None


class _Destinations:
    """Where the proxy may be sent: anywhere but its own node (loopback, link-local and
    unspecified addresses), except in the allowed ranges (`Settings.allowed_endpoint_ranges`)."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self._allowed = tuple(parse_cidr(cidr) for cidr in allowed)

    def refusal_of_text(self, address: str) -> str | None:
        """Why the proxy must not be sent to `address` (an IP literal), or None. Parsed with
        inet_pton, as Envoy parses it; this runs for every endpoint, so most addresses cost
        one parse and a look at their first bytes."""
        try:
            packed = socket.inet_pton(socket.AF_INET, address)
        except (OSError, ValueError):
            try:
                packed = socket.inet_pton(socket.AF_INET6, address)
            except (OSError, ValueError):
                return _WHY_REFUSED["invalid"]
        return self.refusal(packed)

    def refusal(self, packed: bytes) -> str | None:
        kind = _local_kind(packed)
        if kind is None or self.allows(packed):
            return None
        return _WHY_REFUSED[kind]

    def allows(self, packed: bytes) -> bool:
        if not self._allowed:
            return False
        addresses = [ipaddress.ip_address(packed)]
        if len(packed) == 16 and packed[:12] == _MAPPED_PREFIX:
            addresses.append(ipaddress.ip_address(packed[12:]))
        return any(
            address in network
            for address in addresses
            for network in self._allowed
            if network.version == address.version
        )


def _address_field(group: EndpointGroup, subset: int, position: int) -> str:
    """The field of an endpoint's address in the object its group came from (the sources keep
    an EndpointSlice's endpoints in order, and an Endpoints subset's ready addresses first)."""
    if group.source.startswith("Endpoints "):
        ready = sum(1 for endpoint in group.endpoints if endpoint.ready)
        if position < ready:
            return f"subsets[{subset}].addresses[{position}].ip"
        return f"subsets[{subset}].notReadyAddresses[{position - ready}].ip"
    return f"endpoints[{position}].addresses[0]"


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


def _upstream_http(kind: Kind) -> http_protocol_options_pb2.HttpProtocolOptions | None:
    """HTTP/2 to the upstream of a declared HTTP/2 port; on a detected port the protocol the client
    spoke (h2c in, HTTP/2 out); nothing for the rest (HTTP/1.1, or bytes)."""
    options = http_protocol_options_pb2.HttpProtocolOptions
    if kind is Kind.HTTP2:
        return options(
            explicit_http_config=options.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
    if kind is Kind.DETECT:
        return options(
            use_downstream_protocol_config=options.UseDownstreamHttpConfig(
                http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
            )
        )
    return None


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


def _true_or_false(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"{_show(value)} is not true or false")
    return lowered == "true"


def _lb_policy(value: str) -> str:
    if value.upper() not in LB_POLICIES:
        raise ValueError(f"{_show(value)} is not one of {', '.join(LB_POLICIES)}")
    return value.upper()


def _show(value: str, limit: int = 40) -> str:
    """A value quoted for a message, cut short: annotations are tenant-written and up to 256 KiB."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _bounded(limit: int, parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse`, refusing values longer than `limit` characters before looking at them."""

    def parse_bounded(value: str) -> T:
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters long, more than the {limit} allowed")
        return parse(value)

    return parse_bounded


def _connect_timeout(value: str) -> float:
    seconds = parse_duration(value)
    if not 0 < seconds <= MAX_CONNECT_TIMEOUT_S:
        raise ValueError(f"{value!r} is not in (0s, {MAX_CONNECT_TIMEOUT_S:g}s]")
    return seconds


_CLUSTER_FIELDS = {
    **{f.name: f for f in cluster_pb2.Cluster.DESCRIPTOR.fields},
    **{f.json_name: f for f in cluster_pb2.Cluster.DESCRIPTOR.fields},
}
_TYPED_CONFIGS = ("google.protobuf.Any", "envoy.config.core.v3.TypedExtensionConfig")


def _typed_configs(message: Message, path: str = "") -> Iterable[str]:
    """The paths of the typed (Any) configs set anywhere in `message`: they can carry any
    extension, so a patch may not set one even inside a field it may patch."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            continue  # no patchable field is a map of messages
        typed = descriptor.message_type.full_name in _TYPED_CONFIGS
        repeated = descriptor.is_repeated
        for index, item in enumerate(value if repeated else (value,)):
            at = f"{path}.{descriptor.json_name}" + (f"[{index}]" if repeated else "")
            if typed:
                yield at
            else:
                yield from _typed_configs(item, at)


def _cluster_patch(
    service: Service, value: str, problems: list[Problem]
) -> cluster_pb2.Cluster | None:
    """The cluster-patch annotation as a Cluster holding only patchable fields, or None with an
    error for each field refused (the whole patch is then ignored: half a patch is a
    configuration nobody wrote)."""
    where = f'metadata.annotations["{CLUSTER_PATCH_ANNOTATION}"]'
    refused: list[Problem] = []

    def refuse(field_path: str, message: str) -> None:
        refused.append(
            error(f"Service {service.key}", where + field_path, f"{message}; the patch is ignored")
        )

    if len(value) > MAX_CLUSTER_PATCH_CHARS:
        refuse(
            "", f"is {len(value)} characters long, more than the {MAX_CLUSTER_PATCH_CHARS} allowed"
        )
    else:
        try:
            data = json.loads(value)
        except (ValueError, RecursionError) as exc:
            data = None
            refuse("", f"is not JSON: {exc}")
        if data is not None and not isinstance(data, dict):
            refuse("", "must be a JSON object of envoy.config.cluster.v3.Cluster fields")
        elif isinstance(data, dict):
            for key in data:
                descriptor = _CLUSTER_FIELDS.get(key)
                if descriptor is None:
                    refuse(f".{key}", "is not a field of envoy.config.cluster.v3.Cluster")
                elif descriptor.name not in PATCHABLE_CLUSTER_FIELDS:
                    refuse(
                        f".{key}",
                        "may not be patched: a patch may set only "
                        + ", ".join(sorted(PATCHABLE_CLUSTER_FIELDS)),
                    )
            if not refused:
                cluster = cluster_pb2.Cluster()
                try:
                    json_format.ParseDict(data, cluster)
                except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
                    refuse("", f"is not a valid envoy.config.cluster.v3.Cluster: {exc}")
                else:
                    for path in _typed_configs(cluster):
                        refuse(path, "is a typed extension config, which a patch may not set")
                    if not refused:
                        return cluster
    problems.extend(refused)
    return None


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


# A socket address this short keeps every enclosing length (up to the LbEndpoint's: socket + 6
# bytes, + 2 for health) within one varint byte.
_SHORT_SOCKET = 120


def encode_assignment(
    name: str,
    localities: Sequence[tuple[str, str, str, Sequence[tuple[tuple[str, int], int]]]],
) -> bytes:
    """A ClusterLoadAssignment, serialized by hand: the biggest part of a build is endpoints, and
    framing their few fields directly costs a fraction of building messages. The bytes are those
    of protobuf's deterministic serialization (fields in number order, defaults left out), which
    `tests/unit/test_translate.py` checks. `localities`: (region, zone, sub-zone, [((address,
    port), health)]), in order.

    Every locality carries a `load_balancing_weight`: its number of HEALTHY endpoints, at least 1.
    gRPC's clients drop a locality without one, and split traffic between localities by weight
    before round_robin within each, so weighting by endpoints gives every endpoint an equal share,
    as Envoy's own balancing does (Envoy reads locality weights only when a cluster asks). DRAINING
    endpoints count for nothing: gRPC picks none of them, as Envoy does not. The priority is 0,
    the default (so not on the wire)."""
    out = [encode_len_field(1, name.encode())] if name else []  # cluster_name
    for region, zone, sub_zone, endpoints in localities:
        locality = b""
        if region:
            locality += encode_len_field(1, region.encode())  # Locality.region
        if zone:
            locality += encode_len_field(2, zone.encode())  # Locality.zone
        if sub_zone:
            locality += encode_len_field(3, sub_zone.encode())  # Locality.sub_zone
        body = [encode_len_field(1, locality)]  # LocalityLbEndpoints.locality
        healthy = 0
        for (address, port), health in endpoints:
            healthy += health == health_check_pb2.HEALTHY
            # SocketAddress: address = 2, port_value = 3; in Address.socket_address (1), in
            # Endpoint.address (1), in LbEndpoint.endpoint (1); LbEndpoint.health_status = 2.
            raw = address.encode()
            socket = b"\x12" + encode_varint(len(raw)) + raw
            if port:
                socket += b"\x18" + encode_varint(port)
            size = len(socket)
            if size < _SHORT_SOCKET:
                # Every length below fits in one byte: frame the three levels at once.
                lb_endpoint = bytes((10, size + 4, 10, size + 2, 10, size)) + socket
            else:
                lb_endpoint = encode_len_field(1, encode_len_field(1, encode_len_field(1, socket)))
            if health:
                lb_endpoint += b"\x10" + encode_varint(health)
            body.append(encode_len_field(2, lb_endpoint))  # LocalityLbEndpoints.lb_endpoints
        # LocalityLbEndpoints.load_balancing_weight (3): UInt32Value{value (1)}.
        body.append(encode_len_field(3, b"\x08" + encode_varint(max(healthy, 1))))
        out.append(encode_len_field(2, b"".join(body)))  # ClusterLoadAssignment.endpoints
    return b"".join(out)


def _lb_endpoint(
    address: str, port: int, health: health_check_pb2.HealthStatus = health_check_pb2.UNKNOWN
) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=address, port_value=port)
            )
        ),
        health_status=health,
    )


def for_scope(resource: Resource, namespace: str, settings: Settings) -> Resource | None:
    """The resource as clients of `namespace` see it under namespace scoping (`xds.scopes`), or
    None when nothing of it is visible to them: a Service's cluster and endpoints as they are; a
    port's listener and route configuration rebuilt from the visible Services alone (the shared
    resource itself when every Service on the port is visible). A resource without a scope detail
    (translated without scoping) passes as it is."""
    detail = resource.detail
    scope = service_scope(detail)
    if scope is not None:
        return resource if scope.visible_to(namespace) else None
    if isinstance(detail, PortScope):
        shown = cast(list[tuple[PortClaim, ...]], detail.claims.visible_to(namespace))
        if not shown:
            return None
        if len(shown) == len(detail.claims.keys):
            return resource
        listener, _ = port_listener(settings, detail.port, tuple(itertools.chain(*shown)))
        return listener
    if isinstance(detail, RouteScope):
        hosts = detail.hosts.visible_to(namespace)
        if not hosts:
            return None
        if len(hosts) == len(detail.hosts.keys):
            return resource
        body = encode_len_field(1, resource.name.encode()) + b"".join(hosts)
        return Resource.from_bytes(ROUTE, resource.name, body)
    return resource


def _marks(scope: ServiceScope | None) -> tuple[ServiceScope | None, bytes]:
    """A Service resource's detail and salt: its scope under scoping, nothing without."""
    return (scope, scope.salt) if scope is not None else (None, b"")


def _xor(numbers: Iterable[int]) -> int:
    return functools.reduce(operator.xor, numbers, 0)


def translate(mesh: Mesh, settings: Settings) -> Translation:
    """One-shot translation (no memory of earlier runs)."""
    return Translator(settings).translate(mesh)


__all__ = [
    "Translation",
    "Translator",
    "cluster_name",
    "for_scope",
    "listener_name",
    "route_name",
    "translate",
]
