"""The mesh as the control plane sees it: immutable Services and their endpoints.

Sources (manifest files, the Kubernetes API) build these plain frozen dataclasses; translation
reads them and never anything else. Being frozen and made of tuples, every value compares by
content, which is what lets translation skip a Service whose inputs did not change. A `Mesh` is
derived from the one before it with the entries a change touched, and says which keys those were,
so that a change costs what it changed from the source to the snapshot.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple


class ServiceKey(NamedTuple):
    # A tuple, not a dataclass: it is hashed and sorted on every rebuild, and tuples do both in C.
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of a Service's `spec.ports`."""

    port: int
    name: str = ""
    # int: a container port number; str: a container port name, resolved per endpoint group.
    target_port: int | str | None = None
    protocol: str = "TCP"
    app_protocol: str | None = None

    @property
    def label(self) -> str:
        """How a cluster name refers to this port: its name, or its number when unnamed."""
        return self.name or str(self.port)


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    # The allocated virtual IP; None when the manifest gives none or the Service is headless.
    cluster_ip: str | None = None
    headless: bool = False
    type: str = "ClusterIP"
    external_name: str | None = None
    # Sorted (key, value) pairs, so the Service stays hashable and compares by content.
    annotations: tuple[tuple[str, str], ...] = ()
    # `spec.trafficDistribution` (PreferClose, PreferSameZone, PreferSameNode), None when unset.
    traffic_distribution: str | None = None
    key: ServiceKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ServiceKey(self.namespace, self.name))

    def annotation(self, name: str) -> str | None:
        for key, value in self.annotations:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class EndpointPort:
    """A port of an EndpointSlice or Endpoints subset: named after the Service port it serves."""

    port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone: str | None = None
    region: str | None = None
    node_name: str | None = None
    hostname: str | None = None
    # EndpointSlice `hints.forZones`: the zones whose clients should use this endpoint.
    zone_hints: tuple[str, ...] = ()
    # The Kubernetes cluster it runs in, when the control plane reads several (`xds.sources.
    # clusters`); None with one.
    cluster: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointGroup:
    """Endpoints that share one port list: one EndpointSlice, or one subset of an Endpoints object.

    `source` names the object the group came from, so an error about its ports can point at it.
    """

    source: str
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """A Service with every endpoint group that belongs to it: the unit of translation."""

    service: Service
    groups: tuple[EndpointGroup, ...] = ()


# A derived mesh keeps its changes on top of the table it shares with its parent; past this many
# they are folded into a table of its own, so a lookup stays two probes and a derivation costs at
# most this many copies (the fold, once per this many changes, copies the table in C).
FOLD_AT = 1024

_generations = itertools.count(1)


class Mesh:
    """An immutable snapshot of every Service the control plane serves.

    Built whole (`Mesh(entries)`) or derived from another mesh with the entries that changed
    (`mesh.derive(changes)`), which costs what changed: nothing is copied or sorted per Service.
    A derived mesh says what differs from its parent: `changed` (keys added, changed or removed)
    and `parent` (the parent's `generation`), so that a reader that has seen the parent may look
    at those keys only, and any other reader compares everything.
    """

    __slots__ = ("_base", "_overlay", "_size", "_keys", "generation", "parent", "changed")

    def __init__(self, entries: Mapping[ServiceKey, ServiceEntry] | None = None) -> None:
        self._base: dict[ServiceKey, ServiceEntry] = dict(entries or {})
        # Changes on top of `_base` (None: removed from it); never changed once built.
        self._overlay: dict[ServiceKey, ServiceEntry | None] = {}
        self._size = len(self._base)
        self._keys: tuple[ServiceKey, ...] | None = None
        self.generation = next(_generations)
        self.parent: int | None = None
        self.changed: frozenset[ServiceKey] = frozenset(self._base)

    def derive(self, changes: Mapping[ServiceKey, ServiceEntry | None]) -> Mesh:
        """This mesh with `changes` applied (an entry, or None to remove the key). Keys whose
        entry is already as given are no change; with no change at all, this mesh is returned."""
        overlay: dict[ServiceKey, ServiceEntry | None] | None = None
        size = self._size
        changed: list[ServiceKey] = []
        for key, entry in changes.items():
            before = self.get(key)
            if before is entry or (before is not None and entry is not None and before == entry):
                continue
            if overlay is None:
                overlay = dict(self._overlay)
            changed.append(key)
            size += (entry is not None) - (before is not None)
            if entry is None and key not in self._base:
                overlay.pop(key, None)
            else:
                overlay[key] = entry
        if overlay is None:
            return self
        derived = Mesh.__new__(Mesh)
        derived._base = self._base
        derived._overlay = overlay
        if len(overlay) > FOLD_AT:
            derived._fold()
        derived._size = size
        derived._keys = None
        derived.generation = next(_generations)
        derived.parent = self.generation
        derived.changed = frozenset(changed)
        return derived

    def _fold(self) -> None:
        base = self._base.copy()
        for key, entry in self._overlay.items():
            if entry is None:
                del base[key]
            else:
                base[key] = entry
        self._base, self._overlay = base, {}

    def get(self, key: ServiceKey) -> ServiceEntry | None:
        overlay = self._overlay
        if key in overlay:
            return overlay[key]
        return self._base.get(key)

    @property
    def entries(self) -> Mapping[ServiceKey, ServiceEntry]:
        """Every entry by key (read-only)."""
        if not self._overlay:
            return MappingProxyType(self._base)
        return _Entries(self)

    @property
    def keys(self) -> tuple[ServiceKey, ...]:
        """Every key, sorted: computed on first use (a full walk needs it, a change does not)."""
        keys = self._keys
        if keys is None:
            keys = self._keys = tuple(sorted(self._present()))
        return keys

    def _present(self) -> Iterator[ServiceKey]:
        overlay = self._overlay
        yield from (key for key in self._base if key not in overlay)
        yield from (key for key, entry in overlay.items() if entry is not None)

    def __iter__(self) -> Iterator[ServiceEntry]:
        """Entries in key order, so everything built from a mesh is deterministic."""
        get = self.get
        for key in self.keys:
            entry = get(key)
            assert entry is not None
            yield entry

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        return self._has(key)

    def _has(self, key: object) -> bool:
        overlay = self._overlay
        if key in overlay:
            return overlay[key] is not None
        return key in self._base

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mesh):
            return NotImplemented
        return len(self) == len(other) and dict(self.entries) == dict(other.entries)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Mesh({len(self)} services, generation {self.generation})"


class _Entries(Mapping[ServiceKey, ServiceEntry]):
    """A derived mesh's entries, read through its changes onto the table it shares."""

    __slots__ = ("_mesh",)

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def __getitem__(self, key: ServiceKey) -> ServiceEntry:
        entry = self._mesh.get(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def __contains__(self, key: object) -> bool:
        return self._mesh._has(key)

    def __iter__(self) -> Iterator[ServiceKey]:
        return self._mesh._present()

    def __len__(self) -> int:
        return len(self._mesh)


@dataclass(frozen=True, slots=True)
class Problem:
    """A clear complaint about one object of the input: where it is, which object, which field.

    Errors mean the object (or the part of it named by `field`) is not served; warnings mean it is
    served but probably not as its author meant.
    """

    severity: str  # "error", "warning" or "info"
    object: str  # e.g. "Service default/web"
    field: str  # a path like "spec.ports[0].port", or "" for the whole object
    message: str
    location: str = ""  # a file (and document index) or an API path

    def __str__(self) -> str:
        # No severity word: a log record or a printed line carries it once, as its level.
        where = f"{self.location}: " if self.location else ""
        at = f" field {self.field}" if self.field else ""
        return f"{where}{self.object}{at}: {self.message}"

    @property
    def level(self) -> int:
        """The `logging` level this problem is reported at."""
        return _LEVELS[self.severity]


_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}


def error(obj: str, field_path: str, message: str, location: str = "") -> Problem:
    return Problem("error", obj, field_path, message, location)


def warning(obj: str, field_path: str, message: str, location: str = "") -> Problem:
    return Problem("warning", obj, field_path, message, location)


def info(obj: str, field_path: str, message: str, location: str = "") -> Problem:
    """Worth knowing, nothing wrong: served as the input says (a UDP port left out, say)."""
    return Problem("info", obj, field_path, message, location)
