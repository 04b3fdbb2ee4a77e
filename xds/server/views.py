"""What a client sees when it must not see the shared snapshot as it is: its view, derived from
the snapshot resource by resource and shared by every client of the same variant.

Two things make a variant (`Variant`):
- Clients without ADS (per-type streams): translation writes `ads {}` as the config source of
  every cluster's endpoints and every listener's routes, which is right for ADS clients. A client
  on per-type streams needs instead an `api_config_source` of its own API type (GRPC or
  DELTA_GRPC). Envoy does not implement the `self` config source that would say "the same
  server", so clusters and listeners are rewritten for such clients.
- Scoped clients (`xds.scopes`): every type is filtered to what the client's namespace may see,
  and listeners and route configurations are rebuilt from the visible Services.
- Clients that name their locality (`xds.localities`): the endpoints of Services that keep
  traffic close are prioritized by closeness to it.

Views are derived lazily, once a client of the variant asks, and only for the resources that
changed since the variant's last view; a resource left as it is keeps its shared bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds._pb.envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from xds._pb.envoy.config.listener.v3 import listener_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds.cache import Changes, Snapshot
from xds.localities import Locality
from xds.resources import (
    API_LISTENER,
    CLUSTER,
    ENDPOINT,
    LISTENER,
    SNAPSHOT_TYPES,
    Resource,
    decode,
    format_version,
    version_share,
)


class Variant(NamedTuple):
    """How a client's view differs from the snapshot: its per-type API type (GRPC, DELTA_GRPC;
    None for ADS), its scope (a namespace, "" for none named; None for mesh-wide) and its
    locality (None when its node names none)."""

    api_type: str | None = None
    scope: str | None = None
    locality: Locality | None = None

    @property
    def rewritten_types(self) -> tuple[str, ...]:
        if self.scope is not None:
            return SNAPSHOT_TYPES
        types = {CLUSTER, LISTENER, API_LISTENER} if self.api_type is not None else set()
        if self.locality is not None:
            types.add(ENDPOINT)
        return tuple(t for t in SNAPSHOT_TYPES if t in types)


# A resource as a variant's clients see it; None when they do not see it at all.
Rewrite = Callable[[Resource, Variant], Resource | None]
MESH_WIDE_ADS = Variant()


@dataclass(frozen=True)
class Scoping:
    """How clients are scoped (`xds.scopes`): the scope of a node, from its id and metadata (None:
    the whole mesh), and a resource as a scope sees it (None: not at all)."""

    scope_of: Callable[[str, Mapping[str, Any]], str | None]
    rewrite: Callable[[Resource, str], Resource | None]


class SnapshotView:
    """A snapshot as a client of one API type sees it; reads like a Snapshot."""

    def __init__(
        self,
        snapshot: Snapshot,
        serial: int | None,
        derive: Callable[[str], tuple[Mapping[str, Resource], str]],
        rewritten_types: tuple[str, ...],
    ) -> None:
        self.snapshot = snapshot
        self.serial = serial
        self._derive = derive
        self._rewritten = rewritten_types
        self._types: dict[str, tuple[Mapping[str, Resource], str]] = {}

    def _derived(self, type_url: str) -> tuple[Mapping[str, Resource], str]:
        if type_url not in self._types:
            self._types[type_url] = self._derive(type_url)
        return self._types[type_url]

    @property
    def trace_context(self) -> object:
        return self.snapshot.trace_context

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        if type_url not in self._rewritten:
            return self.snapshot.of_type(type_url)
        return self._derived(type_url)[0]

    def version(self, type_url: str) -> str:
        if type_url not in self._rewritten:
            return self.snapshot.version(type_url)
        return self._derived(type_url)[1]


@dataclass
class _Derived:
    """One variant's view of one type, as of one snapshot. Its dicts are never changed once a
    view has handed them out: a new snapshot's view copies them when something of it changed.

    A view that shows every resource of the snapshot as it is (a locality's view while no Service
    keeps traffic close, say) keeps no dicts at all (`same`): it hands out the snapshot's own
    mapping and version, and a change costs what changed, not a copy of the type."""

    serial: int | None
    # name -> version of the resource shown rewritten (a resource shown as it is is its own
    # record: `items[name] is resource`)
    originals: dict[str, str]
    items: dict[str, Resource]  # name -> the resource as shown
    digest: int  # XOR of the shown resources' version shares
    # Every resource of the snapshot shown as it is: `originals` and `items` are unused.
    same: bool = False


def _digest(snapshot: Snapshot, type_url: str) -> int:
    """The XOR of a type's version shares in a snapshot."""
    digest = snapshot.digests.get(type_url)
    if digest is None:
        digest = 0
        for name, resource in snapshot.of_type(type_url).items():
            digest ^= version_share(name, resource.version)
    return digest


# The names of a type that a variant may see in a snapshot (a superset), or None for all of them.
Candidates = Callable[[Snapshot, int | None, Variant, str], Iterable[str] | None]


class Views:
    """Builds and remembers the views of each variant. A new snapshot's view rewrites only the
    resources its publishes changed (from `changes_since`, when the serials are known); a first
    view, or one that fell behind, looks at the `candidates` (default: every resource of the type).
    """

    def __init__(
        self,
        rewrite: Rewrite,
        changes_since: Callable[[int], Changes | None] | None = None,
        candidates: Candidates | None = None,
    ) -> None:
        self._rewrite = rewrite
        self._changes_since = changes_since
        self._candidates = candidates
        self._views: dict[Variant, SnapshotView] = {}
        self._derived: dict[tuple[Variant, str], _Derived] = {}

    def view(self, snapshot: Snapshot, variant: Variant, serial: int | None = None) -> SnapshotView:
        current = self._views.get(variant)
        if current is None or current.snapshot is not snapshot:
            current = self._views[variant] = SnapshotView(
                snapshot,
                serial,
                lambda type_url: self._derive(snapshot, serial, variant, type_url),
                variant.rewritten_types,
            )
        return current

    def release(self, variant: Variant) -> None:
        """Forget a variant no client uses any more (its next client derives it afresh)."""
        self._views.pop(variant, None)
        for type_url in variant.rewritten_types:
            self._derived.pop((variant, type_url), None)

    def _derive(
        self, snapshot: Snapshot, serial: int | None, variant: Variant, type_url: str
    ) -> tuple[Mapping[str, Resource], str]:
        available = snapshot.of_type(type_url)
        previous = self._derived.get((variant, type_url))
        names: Iterable[str] | None = None
        if previous is not None and serial is not None and previous.serial is not None:
            changes = self._changes_since(previous.serial) if self._changes_since else None
            if changes is not None:
                names = changes.get(type_url, frozenset())
        if names is None:
            found = (
                self._candidates(snapshot, serial, variant, type_url) if self._candidates else None
            )
            look = set(available.keys() if found is None else found)
            if previous is not None:
                look.update(previous.items.keys(), previous.originals.keys())
            names = look
        if previous is None:
            previous = _Derived(serial, {}, {}, 0)
        elif previous.same:
            kept = self._still_same(snapshot, serial, variant, type_url, names)
            if kept is not None:
                return kept
            # Something is shown rewritten or hidden now: the view keeps its own dicts again,
            # starting from the snapshot's mapping but for the names to look at.
            items = dict(available)
            digest = _digest(snapshot, type_url)
            for name in names:
                resource = items.pop(name, None)
                if resource is not None:
                    digest ^= version_share(name, resource.version)
            previous = _Derived(serial, {}, items, digest)
        derived = _Derived(serial, previous.originals, previous.items, previous.digest)
        copied = False
        for name in names:
            resource = available.get(name)
            held = derived.items.get(name)
            if resource is not None and (
                held is resource or derived.originals.get(name) == resource.version
            ):
                continue
            if held is None and resource is None:
                continue
            if not copied:
                derived.originals, derived.items = derived.originals.copy(), derived.items.copy()
                copied = True
            derived.originals.pop(name, None)
            if held is not None:
                del derived.items[name]
                derived.digest ^= version_share(name, held.version)
            if resource is None:
                continue
            shown = self._rewrite(resource, variant)
            if shown is None:
                continue
            derived.items[name] = shown
            derived.digest ^= version_share(name, shown.version)
            if shown is not resource:
                derived.originals[name] = resource.version
        if not derived.originals and len(derived.items) == len(available):
            # Every resource as it is, none hidden: the snapshot's own mapping stands for it.
            self._derived[(variant, type_url)] = _Derived(serial, {}, {}, 0, same=True)
            return available, snapshot.version(type_url)
        self._derived[(variant, type_url)] = derived
        return MappingProxyType(derived.items), format_version(derived.digest)

    def _still_same(
        self,
        snapshot: Snapshot,
        serial: int | None,
        variant: Variant,
        type_url: str,
        names: Iterable[str],
    ) -> tuple[Mapping[str, Resource], str] | None:
        """The view of a type that showed every resource as it is, if it still does after
        these names changed (None when one of them is now rewritten or hidden)."""
        available = snapshot.of_type(type_url)
        for name in names:
            resource = available.get(name)
            if resource is not None and self._rewrite(resource, variant) is not resource:
                return None
        self._derived[(variant, type_url)] = _Derived(serial, {}, {}, 0, same=True)
        return available, snapshot.version(type_url)


def for_api_type(resource: Resource, api_type: str, xds_cluster: str) -> Resource:
    """The resource for a client on per-type streams of `api_type` (GRPC or DELTA_GRPC): its EDS or
    RDS config source names the control plane's cluster instead of ADS. Other types pass as is."""
    if resource.type_url not in (CLUSTER, LISTENER):
        return resource
    source = config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=api_type,
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
    elif isinstance(message, listener_pb2.Listener):
        configs = [f.typed_config for chain in message.filter_chains for f in chain.filters]
        if message.HasField("api_listener"):
            configs.append(message.api_listener.api_listener)
        for config in configs:
            manager = hcm_pb2.HttpConnectionManager()
            if not config.Unpack(manager):
                continue
            if manager.rds.config_source.HasField("ads"):
                manager.rds.config_source.CopyFrom(source)
                config.Pack(manager)
    return Resource.from_message(resource.name, message, refs=resource.refs)
