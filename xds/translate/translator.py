"""The incremental translation of a mesh: `Translator` (per-Service output remembered between
runs, the claims of ambiguous domains, the per-port bookkeeping of claims and virtual hosts,
listener and route configuration rebuilds), the `Translation` it returns, a Service's
`ServiceOutput`, one-shot `translate()`, and `for_scope`, a resource as one namespace's clients see
it under scoping."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import ipaddress
import itertools
import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, TypeVar, cast

from google.protobuf import duration_pb2

from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds._pb.envoy.config.core.v3 import health_check_pb2
from xds._pb.envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from xds._pb.envoy.config.route.v3 import route_components_pb2
from xds.config import Settings
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
from xds.translate.clusters import (
    _FAILOVER_DETECTION,
    CLUSTER_PATCH_ANNOTATION,
    CONNECT_TIMEOUT_ANNOTATION,
    LB_POLICY_ANNOTATION,
    MAX_SHORT_ANNOTATION_CHARS,
    _annotation,
    _bounded,
    _cluster_patch,
    _ClusterOptions,
    _connect_timeout,
    _lb_policy,
    _true_or_false,
    _upstream_http,
    load_balancing_policy,
)
from xds.translate.common import _ads_source, _any, _duration, _marks, _show
from xds.translate.endpoints import (
    _LOCAL_HOST_ADDRESSES,
    _LOCAL_HOST_NAMES,
    _WHY_REFUSED,
    _address_field,
    _Destinations,
    _lb_endpoint,
    _packed_ipv4_literal,
    _resolve_port,
    encode_assignment,
)
from xds.translate.listeners import PortClaim, api_listener, port_listener
from xds.translate.names import cluster_name, listener_name, route_name

T = TypeVar("T")


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
        package docstring)."""
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


def _xor(numbers: Iterable[int]) -> int:
    return functools.reduce(operator.xor, numbers, 0)


def translate(mesh: Mesh, settings: Settings) -> Translation:
    """One-shot translation (no memory of earlier runs)."""
    return Translator(settings).translate(mesh)
