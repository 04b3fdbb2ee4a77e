"""Who may see a Service: its exports, and the details translation attaches to resources so that a
client's scoped view can be derived from the shared snapshot (`xds.translate.for_scope`).

Scoping (`Settings.scope = "namespace"`) gives each client the Services of its own namespace and
those exported to it; a client in `Settings.mesh_wide_namespaces` (node proxies) sees everything,
as every client does under the default `mesh` scope. A Service exports itself with the annotation
`xds.dev/export-to`: a comma-separated list of namespaces, `*` for every namespace, `.` for its own
(the default: a Service is private to its namespace). This is Istio's `exportTo` with the opposite
default, because under namespace scoping the point is that nothing leaks unless it is said.

The namespace of a client is the one its node claims (`claimed_namespace`); under mTLS
the node identity check has made that claim the client certificate's, otherwise it is the client's
word. A client that names no namespace sees only what is exported to `*`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from xds.cache import Changes, Snapshot
from xds.model import ServiceKey
from xds.resources import API_LISTENER, CLUSTER, ENDPOINT, Resource

EXPORT_TO_ANNOTATION = "xds.dev/export-to"
# Istio's node metadata keys for the proxy's namespace and service account.
NAMESPACE_KEY = "NAMESPACE"
SERVICE_ACCOUNT_KEY = "SERVICE_ACCOUNT"
EVERY_NAMESPACE = "*"
# A list of namespaces is bounded like any tenant-written value: 64 namespaces of 16 characters.
MAX_EXPORT_TO_CHARS = 1024
# A Kubernetes namespace name: a DNS label.
NAMESPACE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

T = TypeVar("T")
Exports = frozenset[str]
PRIVATE: Exports = frozenset()


def parse_export_to(value: str, own_namespace: str) -> Exports:
    """The namespaces (besides its own) a Service's `xds.dev/export-to` exports it to; raises
    ValueError naming the first entry that is not `*`, `.` or a namespace name."""
    exports: set[str] = set()
    for raw in value.split(","):
        entry = raw.strip()
        if entry == ".":
            continue
        if entry != EVERY_NAMESPACE and not NAMESPACE_NAME.fullmatch(entry):
            shown = repr(entry) if len(entry) <= 40 else repr(entry[:40]) + "..."
            raise ValueError(
                f"{shown} is not a namespace name, '.' (its own namespace) or '*' (every namespace)"
            )
        if entry != own_namespace:
            exports.add(entry)
    return frozenset(exports)


def visible(key: ServiceKey, exports: Exports, namespace: str) -> bool:
    """Whether the Service `key`, exported to `exports`, is visible to clients of `namespace`
    ("" for a client that names none)."""
    return key.namespace == namespace or EVERY_NAMESPACE in exports or namespace in exports


def node_namespace(node_id: str) -> str | None:
    """The namespace a node id names: Istio's `<type>~<ip>~<pod>.<ns>~<ns>.svc.<domain>` gives
    `<ns>`; otherwise `<name>.<ns>` gives the last label; a node id without a dot (`node-1`)
    names none. (A namespace is a DNS label: it has no dot, a pod name may.)"""
    parts = node_id.split("~")
    if len(parts) == 4:
        node_id = parts[2]
    name, dot, namespace = node_id.rpartition(".")
    if not dot or not name or not namespace:
        return None
    return namespace


def claimed_namespace(node_id: str, node_metadata: Mapping[str, Any] | None) -> str | None:
    """The namespace a node claims: its metadata's `NAMESPACE`, else the one its node id names;
    None when it names none, or when the two disagree."""
    from_id = node_namespace(node_id)
    from_metadata = metadata_text(node_metadata, NAMESPACE_KEY)
    if from_id is not None and from_metadata is not None and from_id != from_metadata:
        return None
    return from_metadata or from_id


def metadata_text(metadata: Mapping[str, Any] | None, key: str) -> str | None:
    value = (metadata or {}).get(key)
    return value if isinstance(value, str) and value else None


def scope_rule(
    mesh_wide_namespaces: Iterable[str],
) -> Callable[[str, Mapping[str, Any]], str | None]:
    """The scope of a node under namespace scoping: the namespace it claims ("" for none), or
    None (the whole mesh) when that namespace is one of `mesh_wide_namespaces`."""
    mesh_wide = frozenset(mesh_wide_namespaces)

    def scope_of(node_id: str, metadata: Mapping[str, Any]) -> str | None:
        namespace = claimed_namespace(node_id, metadata) or ""
        return None if namespace in mesh_wide else namespace

    return scope_of


def exports_text(exports: Exports) -> str:
    return ",".join(sorted(exports))


@dataclass(frozen=True, slots=True)
class ServiceScope:
    """The detail of a Service's cluster and its ClusterLoadAssignment."""

    key: ServiceKey
    exports: Exports

    def visible_to(self, namespace: str) -> bool:
        return visible(self.key, self.exports, namespace)

    @property
    def salt(self) -> bytes:
        """What stands for this detail in its resources' versions (never empty, so that a
        resource translated with scoping never shares a version with one translated without)."""
        return exports_text(self.exports).encode() or b"."


class Contributions(Generic[T]):
    """What each Service contributes to a resource shared by several namespaces, found by a scope
    in the time of what it sees: a namespace's Services are a run of the sorted keys, and the few
    exported ones are located once. Built from what translation already holds, without a loop in
    Python over the Services."""

    __slots__ = ("keys", "values", "exported", "_everywhere", "_to")

    def __init__(
        self,
        keys: tuple[ServiceKey, ...],
        values: tuple[T, ...],
        exported: Mapping[ServiceKey, Exports],
    ) -> None:
        self.keys = keys  # sorted
        self.values = values  # each key's contribution
        self.exported = exported  # the keys exported anywhere, with their exports
        # Positions of the keys exported to every namespace, and to each namespace named.
        everywhere: list[int] = []
        to: dict[str, list[int]] = {}
        for key, exports in exported.items():
            position = bisect.bisect_left(keys, key)
            if EVERY_NAMESPACE in exports:
                everywhere.append(position)
            else:
                for namespace in exports:
                    to.setdefault(namespace, []).append(position)
        self._everywhere = sorted(everywhere)
        self._to = to

    def visible_to(self, namespace: str) -> list[T]:
        """The contributions of the Services visible to `namespace`, in key order."""
        keys, values = self.keys, self.values
        low = bisect.bisect_left(keys, ServiceKey(namespace, ""))
        high = bisect.bisect_left(keys, ServiceKey(namespace + "\0", ""))
        others = [p for p in self._everywhere if not low <= p < high]
        others.extend(p for p in self._to.get(namespace, ()) if not low <= p < high)
        if not others:
            return list(values[low:high])
        return [values[position] for position in sorted({*range(low, high), *others})]


@dataclass(frozen=True, slots=True)
class PortScope:
    """The detail of a port's listener: each claimant Service's claims
    (`xds.translate.PortClaim`), from which a scope's listener is rebuilt."""

    port: int
    claims: Contributions[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class RouteScope:
    """The detail of a port's route configuration: each Service's virtual hosts on the port,
    framed as RouteConfiguration fields."""

    hosts: Contributions[bytes]


def service_scope(detail: object) -> ServiceScope | None:
    """The Service scope a resource's detail carries: the detail itself, or the one a detail of
    another concern holds as its `scope` (`xds.localities.LocalityAware`)."""
    if isinstance(detail, ServiceScope):
        return detail
    inner = getattr(detail, "scope", None)
    return inner if isinstance(inner, ServiceScope) else None


def fingerprint(text: str) -> int:
    """A stable 128-bit number for a detail's text, combined with XOR into a salt."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "big")


def salt_of(print_xor: int) -> bytes:
    return print_xor.to_bytes(16, "big")


class ScopeIndex:
    """Which Services' clusters, assignments and API listeners each namespace owns, and which are
    exported, kept up to date with the cache's change sets: a scope's first view looks at what it
    may see, not at the whole mesh. A resource without a scope detail (not a Service's) is a
    candidate for all."""

    TYPES = (CLUSTER, ENDPOINT, API_LISTENER)

    def __init__(self, changes_since: Callable[[int], Changes | None] | None = None) -> None:
        self._changes_since = changes_since
        self.snapshot: Snapshot | None = None
        self.serial: int | None = None
        self._owner: dict[str, dict[str, str]] = {url: {} for url in self.TYPES}
        self._by_namespace: dict[str, dict[str, set[str]]] = {url: {} for url in self.TYPES}
        self._exported: dict[str, dict[str, ServiceScope | None]] = {url: {} for url in self.TYPES}

    def candidates(
        self, snapshot: Snapshot, serial: int | None, type_url: str, namespace: str
    ) -> Iterable[str] | None:
        """The names of `type_url` in `snapshot` that `namespace` may see (a superset), or None
        when the index cannot tell (a type it does not index, a snapshot older than its own)."""
        if type_url not in self.TYPES or not self._move_to(snapshot, serial):
            return None
        own = self._by_namespace[type_url].get(namespace, ())
        exported = [
            name
            for name, scope in self._exported[type_url].items()
            if scope is None or (scope.key.namespace != namespace and scope.visible_to(namespace))
        ]
        return itertools.chain(own, exported)

    def _move_to(self, snapshot: Snapshot, serial: int | None) -> bool:
        if snapshot is self.snapshot:
            return True
        if serial is not None and self.serial is not None and serial < self.serial:
            return False
        changes = None
        if serial is not None and self.serial is not None and self._changes_since is not None:
            changes = self._changes_since(self.serial)
        for type_url in self.TYPES:
            available = snapshot.of_type(type_url)
            if changes is None:
                self._owner[type_url].clear()
                self._by_namespace[type_url].clear()
                self._exported[type_url].clear()
                names: Iterable[str] = available.keys()
            else:
                names = changes.get(type_url, ())
            for name in names:
                self._place(type_url, name, available.get(name))
        self.snapshot, self.serial = snapshot, serial
        return True

    def _place(self, type_url: str, name: str, resource: Resource | None) -> None:
        owner = self._owner[type_url].pop(name, None)
        if owner is not None:
            names = self._by_namespace[type_url][owner]
            names.discard(name)
            if not names:
                del self._by_namespace[type_url][owner]
        self._exported[type_url].pop(name, None)
        if resource is None:
            return
        scope = service_scope(resource.detail)
        if scope is None or scope.exports:
            self._exported[type_url][name] = scope
        if scope is not None:
            self._owner[type_url][name] = scope.key.namespace
            self._by_namespace[type_url].setdefault(scope.key.namespace, set()).add(name)
