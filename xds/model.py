"""The mesh as the control plane sees it: immutable Services and their endpoints.

Sources (manifest files, the Kubernetes API) build these plain frozen dataclasses; translation
reads them and never anything else. Being frozen and made of tuples, every value compares by
content, which is what lets translation skip a Service whose inputs did not change.
"""

from __future__ import annotations

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


def _frozen(mapping: Mapping[ServiceKey, ServiceEntry]) -> Mapping[ServiceKey, ServiceEntry]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Mesh:
    """An immutable snapshot of every Service the control plane serves."""

    entries: Mapping[ServiceKey, ServiceEntry] = field(default_factory=dict)
    keys: tuple[ServiceKey, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", _frozen(self.entries))
        object.__setattr__(self, "keys", tuple(sorted(self.entries)))

    def __iter__(self) -> Iterator[ServiceEntry]:
        """Entries in key order, so everything built from a mesh is deterministic."""
        entries = self.entries
        return (entries[key] for key in self.keys)

    def __len__(self) -> int:
        return len(self.entries)


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
