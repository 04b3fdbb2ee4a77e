"""What clients without ADS see: Clusters and Listeners whose EDS and RDS sources name the server.

Translation writes `ads {}` as the config source of every cluster's endpoints and every listener's
routes, which is right for ADS clients. A client on per-type streams needs instead an
`api_config_source` of its own API type (GRPC or DELTA_GRPC). Envoy does not implement the `self`
config source that would say "the same server", so those two types are rewritten for such clients:
lazily, only once a per-type client asks, and only for resources that changed since the last view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from xds.cache import Changes, Snapshot
from xds.resources import CLUSTER, LISTENER, Resource, format_version, version_share

Rewrite = Callable[[Resource, str], Resource]
REWRITTEN_TYPES = (CLUSTER, LISTENER)


class SnapshotView:
    """A snapshot as a client of one API type sees it; reads like a Snapshot."""

    def __init__(
        self,
        snapshot: Snapshot,
        serial: int | None,
        derive: Callable[[str], tuple[Mapping[str, Resource], str]],
    ) -> None:
        self.snapshot = snapshot
        self.serial = serial
        self._derive = derive
        self._types: dict[str, tuple[Mapping[str, Resource], str]] = {}

    def _derived(self, type_url: str) -> tuple[Mapping[str, Resource], str]:
        if type_url not in self._types:
            self._types[type_url] = self._derive(type_url)
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


@dataclass
class _Derived:
    """One API type's rewritten resources of one type, as of one snapshot."""

    serial: int | None
    originals: dict[str, str]  # name -> version of the resource rewritten
    items: dict[str, Resource]  # name -> rewritten
    digest: int  # XOR of the rewritten resources' version shares


class PerTypeViews:
    """Builds and remembers the views of each API type. A new snapshot's view rewrites only the
    resources its publishes changed (from `changes_since`, when the serials are known), or else
    those whose version differs."""

    def __init__(
        self, rewrite: Rewrite, changes_since: Callable[[int], Changes | None] | None = None
    ) -> None:
        self._rewrite = rewrite
        self._changes_since = changes_since
        self._views: dict[str, SnapshotView] = {}
        self._derived: dict[tuple[str, str], _Derived] = {}

    def view(self, snapshot: Snapshot, api_type: str, serial: int | None = None) -> SnapshotView:
        current = self._views.get(api_type)
        if current is None or current.snapshot is not snapshot:
            current = self._views[api_type] = SnapshotView(
                snapshot,
                serial,
                lambda type_url: self._derive(snapshot, serial, api_type, type_url),
            )
        return current

    def _derive(
        self, snapshot: Snapshot, serial: int | None, api_type: str, type_url: str
    ) -> tuple[Mapping[str, Resource], str]:
        available = snapshot.of_type(type_url)
        previous = self._derived.get((api_type, type_url))
        names: Iterable[str] = available.keys() | (previous.originals if previous else {}).keys()
        if previous is not None and serial is not None and previous.serial is not None:
            changes = self._changes_since(previous.serial) if self._changes_since else None
            if changes is not None:
                names = changes.get(type_url, frozenset())
        if previous is None:
            previous = _Derived(serial, {}, {}, 0)
        derived = _Derived(
            serial, previous.originals.copy(), previous.items.copy(), previous.digest
        )
        for name in names:
            resource = available.get(name)
            if resource is not None and derived.originals.get(name) == resource.version:
                continue
            old = derived.items.pop(name, None)
            derived.originals.pop(name, None)
            if old is not None:
                derived.digest ^= version_share(name, old.version)
            if resource is not None:
                rewritten = self._rewrite(resource, api_type)
                derived.originals[name] = resource.version
                derived.items[name] = rewritten
                derived.digest ^= version_share(name, rewritten.version)
        self._derived[(api_type, type_url)] = derived
        return MappingProxyType(derived.items), format_version(derived.digest)
