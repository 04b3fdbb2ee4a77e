"""What clients without ADS see: Clusters and Listeners whose EDS and RDS sources name the server.

Translation writes `ads {}` as the config source of every cluster's endpoints and every listener's
routes, which is right for ADS clients. A client on per-type streams needs instead an
`api_config_source` of its own API type (GRPC or DELTA_GRPC). Envoy does not implement the `self`
config source that would say "the same server", so those two types are rewritten for such clients:
lazily, only once a per-type client asks, and only for resources that changed since the last view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from xds.cache import Snapshot
from xds.resources import CLUSTER, LISTENER, Resource, type_version

Rewrite = Callable[[Resource, str], Resource]
REWRITTEN_TYPES = (CLUSTER, LISTENER)


class SnapshotView:
    """A snapshot as a client of one API type sees it; reads like a Snapshot."""

    def __init__(self, snapshot: Snapshot, derive: Callable[[str], Mapping[str, Resource]]) -> None:
        self.snapshot = snapshot
        self._derive = derive
        self._types: dict[str, tuple[Mapping[str, Resource], str]] = {}

    def _derived(self, type_url: str) -> tuple[Mapping[str, Resource], str]:
        if type_url not in self._types:
            items = self._derive(type_url)
            self._types[type_url] = (items, type_version(items.values()))
        return self._types[type_url]

    @property
    def trace_context(self) -> object:
        return self.snapshot.trace_context

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        if type_url not in REWRITTEN_TYPES:
            return self.snapshot.of_type(type_url)
        return self._derived(type_url)[0]

    def version(self, type_url: str) -> str:
        if type_url not in REWRITTEN_TYPES:
            return self.snapshot.version(type_url)
        return self._derived(type_url)[1]


class PerTypeViews:
    """Builds and remembers the views of each API type, reusing unchanged rewritten resources."""

    def __init__(self, rewrite: Rewrite) -> None:
        self._rewrite = rewrite
        self._views: dict[str, SnapshotView] = {}
        # (api type, resource type) -> name -> (original version, rewritten resource)
        self._memo: dict[tuple[str, str], dict[str, tuple[str, Resource]]] = {}

    def view(self, snapshot: Snapshot, api_type: str) -> SnapshotView:
        current = self._views.get(api_type)
        if current is None or current.snapshot is not snapshot:
            current = self._views[api_type] = SnapshotView(
                snapshot, lambda type_url: self._derive(snapshot, api_type, type_url)
            )
        return current

    def _derive(self, snapshot: Snapshot, api_type: str, type_url: str) -> Mapping[str, Resource]:
        previous = self._memo.get((api_type, type_url), {})
        memo: dict[str, tuple[str, Resource]] = {}
        for name, resource in snapshot.of_type(type_url).items():
            cached = previous.get(name)
            if cached is not None and cached[0] == resource.version:
                memo[name] = cached
            else:
                memo[name] = (resource.version, self._rewrite(resource, api_type))
        self._memo[(api_type, type_url)] = memo
        return MappingProxyType({name: rewritten for name, (_, rewritten) in memo.items()})
