"""Kubernetes-shaped objects in, `xds.model` values out: conversion, validation and assembly.

This module owns the meaning of the Kubernetes objects the control plane reads (`Service` v1,
`EndpointSlice` discovery.k8s.io/v1, `Endpoints` v1), given as plain dicts exactly as the API's JSON
or a YAML manifest spells them (camelCase). It does no I/O, so the manifest-file source and the
Kubernetes API source share it.

Input is read as kubectl reads it: a `List` and every typed `<Kind>List` (`ServiceList`, as the API
returns it, its items without `kind` and `apiVersion`) stand for their items; every other kind
(Deployment, ConfigMap, Namespace, custom resources, a Knative `Service` of another API group) is
skipped with a debug note, since a chart or `kubectl get all` output mixes them in freely.

Bad input never raises: it becomes a `Problem` naming where the object is (a file and document
index such as `demo.yaml#2`, or an API path), which object (`Service default/web`) and which field
(`spec.ports[1].port`). Like the API server, an object with any error is rejected whole; warnings
leave it served.

The three steps:

- `convert_object(obj, location)` converts one API object (a `List` is expanded);
- `convert_documents(docs, location, previous)` converts the documents of one file, and keeps the
  last good version of an object that was valid in `previous` and is invalid now (in two steps for
  a source that converts only the documents that changed: `convert_document` for each, then
  `join_documents`);
- `assemble(converted)` joins the conversions of every location into one `Mesh`, resolving which
  endpoint objects belong to which Service and which of two same-named objects wins (`Assembly`
  does the same one changed location at a time, and says which Services changed).
"""

from __future__ import annotations

import logging
import re
import reprlib
import socket
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple, TypeGuard

from xds.model import (
    Endpoint,
    EndpointGroup,
    EndpointPort,
    Mesh,
    Problem,
    Service,
    ServiceEntry,
    ServiceKey,
    ServicePort,
    error,
    warning,
)

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_NAMESPACE = "default"
KEEPING = "keeping its last good version"

API_VERSIONS: Mapping[str, str] = {
    "Service": "v1",
    "Endpoints": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
}
# Kinds without a namespace, named without one in notes. Custom resources cannot be known; their
# convention is a `Cluster` prefix (ClusterIssuer, ClusterPolicy).
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "APIService",
        "CertificateSigningRequest",
        "ComponentStatus",
        "CSIDriver",
        "CSINode",
        "CustomResourceDefinition",
        "FlowSchema",
        "GatewayClass",
        "IngressClass",
        "MutatingWebhookConfiguration",
        "Namespace",
        "Node",
        "PersistentVolume",
        "PriorityClass",
        "PriorityLevelConfiguration",
        "RuntimeClass",
        "StorageClass",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ValidatingWebhookConfiguration",
        "VolumeAttachment",
    }
)
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
# spec.trafficDistribution values (Kubernetes 1.31 and 1.34); all keep traffic close by zone here.
TRAFFIC_DISTRIBUTIONS = ("PreferClose", "PreferSameZone", "PreferSameNode")
PROTOCOLS = ("TCP", "UDP", "SCTP")

# The API server's name rules. Names end up inside cluster names (`ns/name:port`) and Envoy stats
# names, so letting a `/` or `:` through would make those ambiguous.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_IANA_SVC_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


class ObjectId(NamedTuple):
    """The identity of an object, as the API server sees it: two objects with one id are one."""

    # A tuple, not a dataclass: a change to a big file hashes every id of it, and tuples hash in C.

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ManifestObject:
    """One valid object, converted.

    `service_key` is the Service this object is (for a Service) or feeds (for an EndpointSlice, the
    one its `kubernetes.io/service-name` label names; for Endpoints, the one of the same name).
    """

    id: ObjectId
    location: str
    service_key: ServiceKey
    service: Service | None = None
    groups: tuple[EndpointGroup, ...] = ()


@dataclass(frozen=True, slots=True)
class Converted:
    """What one location (a file, an API path) holds: its valid objects, its problems, and the
    objects of other kinds it skipped (described as `Deployment default/web`)."""

    location: str
    objects: tuple[ManifestObject, ...] = ()
    problems: tuple[Problem, ...] = ()
    skipped: tuple[str, ...] = ()


@dataclass(slots=True)
class _Result:
    """The outcome of converting one object, before keep-last-good decides what is served."""

    id: ObjectId | None
    location: str
    problems: list[Problem]
    object: ManifestObject | None = None
    skipped: str | None = None  # the description of an object of a kind not read

    @property
    def rejected(self) -> bool:
        return any(p.severity == "error" for p in self.problems)


def convert_object(obj: object, location: str) -> Converted:
    """Convert one API object (a `List` is expanded into its items), `location` used verbatim."""
    results: list[_Result] = []
    _convert(obj, location, results)
    return _collect(location, results)


def convert_documents(
    docs: Iterable[object], location: str, previous: Converted | None = None
) -> Converted:
    """Convert the documents of one file; each is located as `location#index` (index from 0).

    With `previous` (the last conversion of the same location), an object that is rejected now but
    was served from `previous` stays served in its previous form, and its errors say so. An object
    that is gone from the documents is gone, and an object whose id cannot be read (no name, no
    kind) cannot be matched, so nothing is kept for it.
    """
    documents = (convert_document(doc, location, index) for index, doc in enumerate(docs))
    return join_documents(documents, location, previous)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A `_Result` as it leaves the converter, kept for reuse."""

    id: ObjectId | None
    location: str
    problems: tuple[Problem, ...]
    object: ManifestObject | None
    skipped: str | None

    def moved(self, old: str, new: str) -> _Outcome:
        obj = self.object
        return _Outcome(
            self.id,
            _moved(self.location, old, new),
            tuple(replace(p, location=_moved(p.location, old, new)) for p in self.problems),
            None if obj is None else replace(obj, location=_moved(obj.location, old, new)),
            self.skipped,
        )


@dataclass(frozen=True, slots=True)
class ConvertedDocument:
    """Document `index` of the file at `location`, converted, before keep-last-good (which looks
    at the whole file, see `join_documents`).

    A file source converts a document once per text and keeps the result: `at(index)` is the same
    conversion for the same text found at another index.
    """

    location: str
    index: int
    outcomes: tuple[_Outcome, ...] = ()

    def at(self, index: int) -> ConvertedDocument:
        if index == self.index or not self.outcomes:
            return self if index == self.index else ConvertedDocument(self.location, index)
        old, new = f"{self.location}#{self.index}", f"{self.location}#{index}"
        return ConvertedDocument(
            self.location, index, tuple(o.moved(old, new) for o in self.outcomes)
        )


def convert_document(doc: object, location: str, index: int) -> ConvertedDocument:
    """Convert document `index` of the file at `location` (see `convert_documents`)."""
    results: list[_Result] = []
    # An empty document (a trailing `---`) is nothing, not an error.
    if doc is not None:
        _convert(doc, f"{location}#{index}", results)
    return ConvertedDocument(
        location,
        index,
        tuple(_Outcome(r.id, r.location, tuple(r.problems), r.object, r.skipped) for r in results),
    )


def join_documents(
    documents: Iterable[ConvertedDocument], location: str, previous: Converted | None = None
) -> Converted:
    """The conversion of the file at `location` from its documents' (in order), with
    keep-last-good from `previous` as `convert_documents` has it."""
    outcomes = [o for document in documents for o in document.outcomes]
    if previous is not None and any(o.object is None and o.id is not None for o in outcomes):
        # Something may be kept from `previous`: the general way, one mutable result each.
        results = [
            _Result(o.id, o.location, list(o.problems), o.object, o.skipped) for o in outcomes
        ]
        _keep_last_good(results, previous)
        return _collect(location, results)
    # Nothing to keep: no allocation per object, which a big file would pay on every change.
    return Converted(
        location,
        tuple(o.object for o in outcomes if o.object is not None),
        tuple(p for o in outcomes for p in o.problems),
        tuple(o.skipped for o in outcomes if o.skipped is not None),
    )


def _moved(location: str, old: str, new: str) -> str:
    """`location` with the document prefix `old` (`demo.yaml#3`) replaced by `new`."""
    if location == old or location.startswith(old + "/"):
        return new + location[len(old) :]
    return location


def assemble(converted: Iterable[Converted]) -> tuple[Mesh, list[Problem]]:
    """Join the conversions of many locations into one Mesh, with the problems of the joining.

    Locations are taken in sorted order, so that of two objects with the same id in different
    places the same one wins on every run and every replica: the first, and the later one gets an
    error. Each Service gets the endpoint groups of its EndpointSlices, or, when it has none, of its
    Endpoints object: a cluster keeps both for most Services (the Endpoints controller and the
    EndpointSlice controllers write the same endpoints), so reading both would count each endpoint
    twice. Endpoint objects that feed no Service get a warning.
    """
    by_location: dict[str, Converted] = {}
    for conversion in converted:
        same = by_location.get(conversion.location)
        if same is not None:
            # Two conversions of one location are read as one, in the order given.
            conversion = Converted(
                conversion.location,
                same.objects + conversion.objects,
                same.problems + conversion.problems,
                same.skipped + conversion.skipped,
            )
        by_location[conversion.location] = conversion
    assembly = Assembly()
    mesh = assembly.update(by_location)
    return mesh, list(assembly.problems)


# The precedence of an object among those claiming its id: its location, then its position there.
_Claim = tuple[str, int, ManifestObject]
_SLICES, _ENDPOINTS = 0, 1


class Assembly:
    """The conversions of every location, joined into a Mesh one change at a time.

    `update` takes the locations that changed and recomputes only the object ids they hold or held
    and the Services those feed, then derives the new Mesh from the previous one, so a change costs
    what it touched rather than what the mesh holds. The outcome is exactly `assemble`'s for the
    same conversions (which is this class, used once): the same entries, the same problems in the
    same order.

    Not thread-safe: a source calls it under its own lock.
    """

    def __init__(self) -> None:
        self._conversions: dict[str, Converted] = {}
        # Every object claiming an id, in precedence order; the first is served.
        self._claims: dict[ObjectId, list[_Claim]] = {}
        self._served: dict[ObjectId, ManifestObject] = {}
        self._services: dict[ServiceKey, Service] = {}
        # The served EndpointSlices (_SLICES) and Endpoints (_ENDPOINTS) by the Service they feed.
        self._feeders: tuple[dict[ServiceKey, dict[ObjectId, ManifestObject]], ...] = ({}, {})
        self._duplicates: dict[ObjectId, list[tuple[tuple[str, int], Problem]]] = {}
        self._orphans: tuple[dict[ServiceKey, tuple[Problem, ...]], ...] = ({}, {})
        self._problems: tuple[Problem, ...] = ()
        self.mesh = Mesh()

    @property
    def problems(self) -> tuple[Problem, ...]:
        """The problems of joining the current conversions, in `assemble`'s order."""
        return self._problems

    @property
    def conversions(self) -> Mapping[str, Converted]:
        return self._conversions

    def update(self, changes: Mapping[str, Converted | None]) -> Mesh:
        """Apply the new conversions of the locations in `changes` (None: the location is gone)
        and return the Mesh derived from the previous one: its `changed` is exactly the keys whose
        entry differs."""
        affected: set[ObjectId] = set()
        for location, conversion in changes.items():
            before = self._conversions.get(location)
            if before is conversion:
                continue
            if conversion is None:
                del self._conversions[location]
            else:
                self._conversions[location] = conversion
            affected.update(self._reclaim(location, before, conversion))
        if not affected:
            return self.mesh

        keys: set[ServiceKey] = set()
        problems_moved = False
        for oid in affected:
            claims = self._claims.get(oid)
            winner = claims[0][2] if claims else None
            served = self._served.pop(oid, None)
            if served is not winner:
                if served is not None:
                    keys.add(served.service_key)
                    self._unserve(served)
                if winner is not None:
                    keys.add(winner.service_key)
                    self._serve(winner)
                    self._served[oid] = winner
            elif winner is not None:
                self._served[oid] = winner
            problems_moved |= self._recheck_duplicates(oid, claims)

        entries: dict[ServiceKey, ServiceEntry | None] = {}
        for key in keys:
            entries[key] = self._entry(key)
            problems_moved |= self._recheck_orphans(key)
        if problems_moved:
            self._problems = self._collect_problems()
        if not self.mesh and any(e is not None for e in entries.values()):
            # A first build: one table, no history worth keeping.
            self.mesh = Mesh({k: e for k, e in entries.items() if e is not None})
        else:
            self.mesh = self.mesh.derive(entries)
        return self.mesh

    def _reclaim(
        self, location: str, before: Converted | None, after: Converted | None
    ) -> Iterator[ObjectId]:
        """Replace the claims of `location`; yield the ids whose claims from it changed."""
        old_objects = before.objects if before is not None else ()
        new_objects = after.objects if after is not None else ()
        if len(old_objects) == len(new_objects):
            yield from self._reclaim_in_place(location, old_objects, new_objects)
            return
        old = _claims_by_id(old_objects)
        new = _claims_by_id(new_objects)
        for oid in old.keys() | new.keys():
            mine = new.get(oid)
            # Compared by identity first (tuples do): unchanged objects cost a pointer comparison.
            if old.get(oid) == mine:
                continue
            others = [c for c in self._claims.get(oid, ()) if c[0] != location]
            if mine is not None:
                others.extend((location, position, obj) for position, obj in mine)
                others.sort(key=_precedence)
            if others:
                self._claims[oid] = others
            else:
                self._claims.pop(oid, None)
            yield oid

    def _reclaim_in_place(
        self,
        location: str,
        old_objects: tuple[ManifestObject, ...],
        new_objects: tuple[ManifestObject, ...],
    ) -> Iterator[ObjectId]:
        """`_reclaim` for a location whose objects did not move: an edit to a big file leaves
        all but a few as they were, the very same objects, and only positions that differ are
        looked at (no per-object allocation, which at ten thousand objects costs more in garbage
        collection than the comparison)."""
        differing = {
            position
            for position, (old, new) in enumerate(zip(old_objects, new_objects, strict=True))
            if old is not new
        }
        ids = {old_objects[p].id for p in differing} | {new_objects[p].id for p in differing}
        for oid in ids:
            claims = [
                c for c in self._claims.get(oid, ()) if c[0] != location or c[1] not in differing
            ]
            claims.extend(
                (location, p, new_objects[p]) for p in differing if new_objects[p].id == oid
            )
            claims.sort(key=_precedence)
            if claims:
                self._claims[oid] = claims
            else:
                self._claims.pop(oid, None)
            yield oid

    def _serve(self, obj: ManifestObject) -> None:
        if obj.service is not None:
            self._services[obj.service_key] = obj.service
        else:
            table = self._feeders[_SLICES if obj.id.kind == "EndpointSlice" else _ENDPOINTS]
            table.setdefault(obj.service_key, {})[obj.id] = obj

    def _unserve(self, obj: ManifestObject) -> None:
        if obj.service is not None:
            del self._services[obj.service_key]
            return
        table = self._feeders[_SLICES if obj.id.kind == "EndpointSlice" else _ENDPOINTS]
        feeding = table[obj.service_key]
        del feeding[obj.id]
        if not feeding:
            del table[obj.service_key]

    def _recheck_duplicates(self, oid: ObjectId, claims: list[_Claim] | None) -> bool:
        """Recompute the errors of the objects `oid`'s winner beats; return whether they moved."""
        found: list[tuple[tuple[str, int], Problem]] = []
        if claims is not None and len(claims) > 1:
            first = claims[0][2]
            for location, position, obj in claims[1:]:
                problem = error(
                    str(obj.id),
                    "metadata.name",
                    f"is defined again (first at {first.location}, which is served); "
                    "this one is ignored",
                    obj.location,
                )
                found.append(((location, position), problem))
        before = self._duplicates.get(oid, [])
        if found == before:
            return False
        if found:
            self._duplicates[oid] = found
        else:
            del self._duplicates[oid]
        return True

    def _entry(self, key: ServiceKey) -> ServiceEntry | None:
        service = self._services.get(key)
        if service is None:
            return None
        feeding = self._feeders[_SLICES].get(key) or self._feeders[_ENDPOINTS].get(key) or {}
        # Sorted by id rather than by location, so that moving an object to another file does not
        # change the entry and make translation redo the Service.
        groups = tuple(g for oid in sorted(feeding) for g in feeding[oid].groups)
        return ServiceEntry(service, groups)

    def _recheck_orphans(self, key: ServiceKey) -> bool:
        """Recompute the warnings of endpoint objects for `key` that feed no Service; return
        whether they moved."""
        moved = False
        for table, orphans, field_path in (
            (self._feeders[_SLICES], self._orphans[_SLICES], _LABEL_PATH),
            (self._feeders[_ENDPOINTS], self._orphans[_ENDPOINTS], "metadata.name"),
        ):
            feeding = {} if key in self._services else table.get(key, {})
            found = tuple(
                warning(
                    str(oid),
                    field_path,
                    f"matches no Service (looked for Service {key})",
                    feeding[oid].location,
                )
                for oid in sorted(feeding)
            )
            if found == orphans.get(key, ()):
                continue
            moved = True
            if found:
                orphans[key] = found
            else:
                del orphans[key]
        return moved

    def _collect_problems(self) -> tuple[Problem, ...]:
        # Few problems as a rule: sorting them on a change that moved one is cheap.
        duplicates = sorted(
            (item for found in self._duplicates.values() for item in found),
            key=lambda item: item[0],
        )
        return (
            *(problem for _, problem in duplicates),
            *(p for key in sorted(self._orphans[_SLICES]) for p in self._orphans[_SLICES][key]),
            *(
                p
                for key in sorted(self._orphans[_ENDPOINTS])
                for p in self._orphans[_ENDPOINTS][key]
            ),
        )


_LABEL_PATH = f'metadata.labels["{SERVICE_NAME_LABEL}"]'


def _claims_by_id(
    objects: tuple[ManifestObject, ...],
) -> dict[ObjectId, list[tuple[int, ManifestObject]]]:
    claims: dict[ObjectId, list[tuple[int, ManifestObject]]] = {}
    for position, obj in enumerate(objects):
        claims.setdefault(obj.id, []).append((position, obj))
    return claims


def _precedence(claim: _Claim) -> tuple[str, int]:
    return claim[0], claim[1]


def nothing_to_serve(converted: Iterable[Converted]) -> Problem:
    """The note for an input without a single Service, saying what it held instead."""
    conversions = list(converted)
    kinds = Counter(d.split(" ", 1)[0] for c in conversions for d in c.skipped)
    kinds.update(obj.id.kind for c in conversions for obj in c.objects)
    read = [f"{count} {kind}" for kind, count in sorted(kinds.items())]
    return warning(
        "input",
        "",
        "has no Service, so there is nothing to serve"
        + (f" (read: {', '.join(read)})" if read else " (no objects at all)"),
    )


def _collect(location: str, results: list[_Result]) -> Converted:
    objects = tuple(r.object for r in results if r.object is not None)
    problems = tuple(p for r in results for p in r.problems)
    skipped = tuple(r.skipped for r in results if r.skipped is not None)
    return Converted(location, objects, problems, skipped)


def _keep_last_good(results: list[_Result], previous: Converted) -> None:
    # A rejected object has no conversion: most results are done with at the first test.
    rejected = [r for r in results if r.object is None and r.id is not None and r.rejected]
    if not rejected:
        return
    before = {obj.id: obj for obj in previous.objects}
    valid_now = {r.id for r in results if r.object is not None}
    for result in rejected:
        if result.id is None or result.id in valid_now:
            continue
        last_good = before.get(result.id)
        if last_good is None:
            continue
        # Located where the object is now, so later errors (a duplicate, say) point at the text
        # the user is looking at.
        result.object = replace(last_good, location=result.location)
        valid_now.add(result.id)
        result.problems = [
            replace(p, message=f"{p.message}; {KEEPING}") if p.severity == "error" else p
            for p in result.problems
        ]


class _Checker:
    """Collects the problems of one object, all of them, so that one pass tells the whole story."""

    __slots__ = ("obj", "location", "problems")

    def __init__(self, obj: str, location: str) -> None:
        self.obj = obj
        self.location = location
        self.problems: list[Problem] = []

    @property
    def failed(self) -> bool:
        return any(p.severity == "error" for p in self.problems)

    def has_error(self, path: str) -> bool:
        """Whether `path` itself already has an error, so as not to pile a second one on it."""
        return any(p.field == path and p.severity == "error" for p in self.problems)

    def error(self, field_path: str, message: str) -> None:
        self.problems.append(error(self.obj, field_path, message, self.location))

    def warning(self, field_path: str, message: str) -> None:
        self.problems.append(warning(self.obj, field_path, message, self.location))

    # Typed reads: each returns the value, or None after recording an error.

    def mapping(self, value: object, path: str, required: bool = False) -> Mapping[object, object]:
        # dict first: the abstract-class check costs more than the rest of a small object.
        if type(value) is dict or isinstance(value, Mapping):
            return value
        if value is not None:
            self.error(path, f"must be a mapping, got {_show(value)}")
        elif required:
            self.error(path, "is required")
        return {}

    def items(self, value: object, path: str) -> list[object]:
        if isinstance(value, list):
            return value
        if value is not None:
            self.error(path, f"must be a list, got {_show(value)}")
        return []

    def string(self, value: object, path: str) -> str | None:
        """An optional string; empty counts as absent, as the API server's defaulting does."""
        if value is None or value == "":
            return None
        if isinstance(value, str):
            return value
        self.error(path, f"must be a string, got {_show(value)}")
        return None

    def boolean(self, value: object, path: str) -> bool | None:
        if value is None or isinstance(value, bool):
            return value
        self.error(path, f"must be true or false, got {_show(value)}")
        return None

    def port(self, value: object, path: str) -> int | None:
        if _is_int(value) and 1 <= value <= 65535:
            return value
        self.error(path, f"must be an integer in 1..65535, got {_show(value)}")
        return None

    def protocol(self, value: object, path: str) -> str:
        if value is None:
            return "TCP"
        if value in PROTOCOLS:
            assert isinstance(value, str)
            return value
        self.error(path, f"must be one of {', '.join(PROTOCOLS)}, got {_show(value)}")
        return "TCP"

    def name(self, value: object, path: str, pattern: re.Pattern[str], rule: str) -> str:
        if not isinstance(value, str) or not value:
            self.error(path, f"must be a non-empty string, got {_show(value)}")
            return ""
        limit = 253 if pattern is _DNS1123_SUBDOMAIN else 63
        if len(value) > limit or not pattern.fullmatch(value):
            self.error(path, f"{value!r} is not a valid {rule} (at most {limit} characters)")
        return value


_LABEL_RULE = "DNS label (lowercase letters, digits and '-', starting and ending alphanumeric)"
_SERVICE_RULE = "Service name (a DNS label starting with a letter)"
_SUBDOMAIN_RULE = "DNS subdomain (dot-separated lowercase DNS labels)"


def _convert(obj: object, location: str, out: list[_Result]) -> None:
    if not isinstance(obj, Mapping):
        check = _Checker("document", location)
        check.error("", f"must be a Kubernetes object (a mapping), got {_show(obj)}")
        out.append(_Result(None, location, check.problems))
        return

    kind = obj.get("kind")
    api_version = obj.get("apiVersion")
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    namespace = metadata.get("namespace") if isinstance(metadata, Mapping) else None
    if namespace is None or namespace == "":
        namespace = DEFAULT_NAMESPACE
    described = _describe(kind, namespace, name)
    check = _Checker(described, location)

    if not isinstance(kind, str) or not kind:
        check.error("kind", f"must be a non-empty string, got {_show(kind)}")
        out.append(_Result(None, location, check.problems))
        return
    if kind == "List" or (kind.endswith("List") and "items" in obj):
        _convert_list(check, obj, kind, api_version, location, out)
        return
    expected = API_VERSIONS.get(kind)
    if expected is None or _group(api_version) != _group(expected):
        # Not ours: a Deployment, a ConfigMap, a custom resource, a Service of another API group.
        log.debug("%s: skipped %s (%s): not a kind read here", location, described, api_version)
        out.append(_Result(None, location, [], skipped=described))
        return
    if api_version != expected:
        check.error(
            "apiVersion", f"{kind} must have apiVersion {expected!r}, got {_show(api_version)}"
        )

    # The identity first: without it nothing else can be said about, or kept for, the object.
    if not isinstance(metadata, Mapping):
        check.error("metadata", f"must be a mapping with a name, got {_show(metadata)}")
        out.append(_Result(None, location, check.problems))
        return
    if not isinstance(name, str) or not name:
        check.error("metadata.name", f"must be a non-empty string, got {_show(name)}")
        out.append(_Result(None, location, check.problems))
        return
    if not isinstance(namespace, str):
        check.error("metadata.namespace", f"must be a string, got {_show(namespace)}")
        out.append(_Result(None, location, check.problems))
        return
    object_id = ObjectId(kind, namespace, name)
    result = _Result(object_id, location, check.problems)
    out.append(result)
    if check.failed:
        return

    check.name(namespace, "metadata.namespace", _DNS1123_LABEL, _LABEL_RULE)
    if kind == "Service":
        converted = _service(check, object_id, obj, metadata)
    elif kind == "EndpointSlice":
        converted = _endpoint_slice(check, object_id, obj, metadata)
    else:
        converted = _endpoints(check, object_id, obj)
    if converted is not None and not check.failed:
        result.object = converted


def _convert_list(
    check: _Checker,
    obj: Mapping[object, object],
    kind: str,
    api_version: object,
    location: str,
    out: list[_Result],
) -> None:
    """A `List` (kubectl's, items of any kind) or a typed `<Kind>List` (the API's, whose items
    carry neither `kind` nor `apiVersion`: they are the list's)."""
    if kind == "List" and api_version != "v1":
        check.error("apiVersion", f"List must have apiVersion 'v1', got {_show(api_version)}")
    items = check.items(obj.get("items"), "items")
    out.append(_Result(None, location, check.problems))
    if check.failed:
        return
    item_kind = None if kind == "List" else kind.removesuffix("List")
    for index, item in enumerate(items):
        if item_kind is not None and isinstance(item, Mapping):
            item = {"kind": item_kind, "apiVersion": api_version, **item}
        _convert(item, f"{location}/items[{index}]", out)


def _group(api_version: object) -> str:
    """The API group of an apiVersion (`discovery.k8s.io/v1` -> `discovery.k8s.io`; core: "")."""
    if not isinstance(api_version, str):
        return ""
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def _service(
    check: _Checker, oid: ObjectId, obj: Mapping[object, object], metadata: Mapping[object, object]
) -> ManifestObject | None:
    check.name(oid.name, "metadata.name", _DNS1035_LABEL, _SERVICE_RULE)
    annotations = _string_map(check, metadata.get("annotations"), "metadata.annotations")
    _string_map(check, metadata.get("labels"), "metadata.labels")
    spec = check.mapping(obj.get("spec"), "spec")

    service_type = spec.get("type")
    if service_type is None:
        service_type = "ClusterIP"
    elif service_type not in SERVICE_TYPES:
        check.error(
            "spec.type", f"must be one of {', '.join(SERVICE_TYPES)}, got {_show(service_type)}"
        )
        service_type = "ClusterIP"
    assert isinstance(service_type, str)

    cluster_ip = check.string(spec.get("clusterIP"), "spec.clusterIP")
    headless = cluster_ip == "None"
    if headless:
        cluster_ip = None
        if service_type != "ClusterIP":
            check.error(
                "spec.clusterIP",
                f"'None' (headless) is only allowed for type ClusterIP, not {service_type}",
            )
    elif cluster_ip is not None:
        if not _is_ip(cluster_ip):
            check.error(
                "spec.clusterIP", f"must be an IP address, 'None' or empty, got {cluster_ip!r}"
            )
        elif service_type == "ExternalName":
            check.error("spec.clusterIP", "must be empty for type ExternalName")

    external_name = check.string(spec.get("externalName"), "spec.externalName")
    if service_type == "ExternalName":
        if external_name is None:
            check.error("spec.externalName", "is required for type ExternalName")
        elif not _DNS1123_SUBDOMAIN.fullmatch(external_name.removesuffix(".")):
            check.error("spec.externalName", f"{external_name!r} is not a valid {_SUBDOMAIN_RULE}")

    raw_ports = check.items(spec.get("ports"), "spec.ports")
    # The API server's rule: only headless and ExternalName Services may go without ports.
    portless_ok = service_type == "ExternalName" or headless
    said = check.has_error("spec") or check.has_error("spec.ports")
    if not raw_ports and not portless_ok and not said:
        check.error("spec.ports", "a Service needs at least one port")
    ports = _service_ports(check, raw_ports)
    traffic_distribution = check.string(spec.get("trafficDistribution"), "spec.trafficDistribution")
    if traffic_distribution is not None and traffic_distribution not in TRAFFIC_DISTRIBUTIONS:
        check.warning(
            "spec.trafficDistribution",
            f"must be one of {', '.join(TRAFFIC_DISTRIBUTIONS)}, got "
            f"{_show(traffic_distribution)}; ignored (traffic is not kept close)",
        )
        traffic_distribution = None

    if check.failed:
        return None
    service = Service(
        namespace=oid.namespace,
        name=oid.name,
        ports=ports,
        cluster_ip=cluster_ip,
        headless=headless,
        type=service_type,
        external_name=external_name,
        annotations=annotations,
        traffic_distribution=traffic_distribution,
    )
    return ManifestObject(oid, check.location, service.key, service=service)


def _service_ports(check: _Checker, raw_ports: list[object]) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    names: dict[str, int] = {}
    numbers: dict[tuple[int, str], int] = {}
    for index, raw in enumerate(raw_ports):
        at = f"spec.ports[{index}]"
        entry = check.mapping(raw, at, required=True)
        if check.has_error(at):
            continue
        name = entry.get("name")
        if name is None or name == "":
            name = ""
            if len(raw_ports) > 1:
                check.error(f"{at}.name", "is required when a Service has more than one port")
        else:
            name = check.name(name, f"{at}.name", _DNS1123_LABEL, _LABEL_RULE)
            if name in names:
                check.error(
                    f"{at}.name", f"{name!r} is already the name of spec.ports[{names[name]}]"
                )
            names.setdefault(name, index)
        number = check.port(entry.get("port"), f"{at}.port")
        protocol = check.protocol(entry.get("protocol"), f"{at}.protocol")
        if number is not None:
            if (number, protocol) in numbers:
                check.error(
                    f"{at}.port",
                    f"{number}/{protocol} is already used by "
                    f"spec.ports[{numbers[number, protocol]}]",
                )
            numbers.setdefault((number, protocol), index)
        target = _target_port(check, entry.get("targetPort"), f"{at}.targetPort")
        app_protocol = check.string(entry.get("appProtocol"), f"{at}.appProtocol")
        if number is not None:
            ports.append(ServicePort(number, name, target or number, protocol, app_protocol))
    return tuple(ports)


def _target_port(check: _Checker, value: object, path: str) -> int | str | None:
    if value is None:
        return None
    if _is_int(value):
        return check.port(value, path)
    if isinstance(value, str) and value:
        # A name refers to a container port by name: the API server's IANA_SVC_NAME rule.
        if len(value) <= 15 and _IANA_SVC_NAME.fullmatch(value) and re.search("[a-z]", value):
            return value
        check.error(
            path,
            f"{value!r} is not a valid port name (IANA_SVC_NAME: at most 15 "
            "lowercase letters, digits and single '-', with at least one letter)",
        )
        return None
    check.error(path, f"must be a port number in 1..65535 or a port name, got {_show(value)}")
    return None


def _endpoint_slice(
    check: _Checker, oid: ObjectId, obj: Mapping[object, object], metadata: Mapping[object, object]
) -> ManifestObject | None:
    check.name(oid.name, "metadata.name", _DNS1123_SUBDOMAIN, _SUBDOMAIN_RULE)
    labels = dict(_string_map(check, metadata.get("labels"), "metadata.labels"))
    label_path = f'metadata.labels["{SERVICE_NAME_LABEL}"]'
    service_name = labels.get(SERVICE_NAME_LABEL)
    said = check.has_error("metadata.labels") or check.has_error(label_path)
    if not service_name and not said:
        check.error(label_path, "is required: it names the Service this EndpointSlice belongs to")

    raw_type = obj.get("addressType")
    if raw_type == "FQDN":
        # Not an error (the API server takes it), but Envoy's EDS wants addresses; kube-proxy
        # ignores these slices too.
        check.warning("addressType", "FQDN endpoints are not supported; this slice is skipped")
        return None
    address_type = raw_type if isinstance(raw_type, str) and raw_type in ("IPv4", "IPv6") else None
    if address_type is None:
        check.error("addressType", f"must be IPv4, IPv6 or FQDN, got {_show(raw_type)}")

    endpoints: list[Endpoint] = []
    for index, raw in enumerate(check.items(obj.get("endpoints"), "endpoints")):
        at = f"endpoints[{index}]"
        entry = check.mapping(raw, at, required=True)
        if check.has_error(at):
            continue
        addresses = check.items(entry.get("addresses"), f"{at}.addresses")
        if not addresses and not check.has_error(f"{at}.addresses"):
            check.error(f"{at}.addresses", "needs at least one address")
        for a, address in enumerate(addresses):
            if not isinstance(address, str) or not _is_ip(address, address_type):
                check.error(
                    f"{at}.addresses[{a}]",
                    f"must be an {address_type or 'IP'} address, got {_show(address)}",
                )
        conditions = check.mapping(entry.get("conditions"), f"{at}.conditions")
        ready = check.boolean(conditions.get("ready"), f"{at}.conditions.ready")
        serving = check.boolean(conditions.get("serving"), f"{at}.conditions.serving")
        terminating = check.boolean(conditions.get("terminating"), f"{at}.conditions.terminating")
        zone = check.string(entry.get("zone"), f"{at}.zone")
        hints = check.mapping(entry.get("hints"), f"{at}.hints")
        zone_hints: list[str] = []
        for h, hint in enumerate(check.items(hints.get("forZones"), f"{at}.hints.forZones")):
            hint_at = f"{at}.hints.forZones[{h}]"
            name = check.string(check.mapping(hint, hint_at).get("name"), f"{hint_at}.name")
            if name is not None:
                zone_hints.append(name)
        node_name = check.string(entry.get("nodeName"), f"{at}.nodeName")
        hostname = check.string(entry.get("hostname"), f"{at}.hostname")
        if addresses and isinstance(addresses[0], str):
            # The API's meaning of absent conditions: unknown readiness counts as ready, serving
            # follows ready, and nothing is terminating unless it says so.
            ready = True if ready is None else ready
            endpoints.append(
                Endpoint(
                    address=addresses[0],
                    ready=ready,
                    serving=ready if serving is None else serving,
                    terminating=bool(terminating),
                    zone=zone,
                    node_name=node_name,
                    hostname=hostname,
                    zone_hints=tuple(zone_hints),
                )
            )
    ports = _endpoint_ports(check, obj.get("ports"), "ports")

    if check.failed or not service_name:
        return None
    group = EndpointGroup(str(oid), ports, tuple(endpoints))
    return ManifestObject(
        oid, check.location, ServiceKey(oid.namespace, service_name), groups=(group,)
    )


def _endpoints(
    check: _Checker, oid: ObjectId, obj: Mapping[object, object]
) -> ManifestObject | None:
    check.name(oid.name, "metadata.name", _DNS1123_SUBDOMAIN, _SUBDOMAIN_RULE)
    groups: list[EndpointGroup] = []
    for index, raw in enumerate(check.items(obj.get("subsets"), "subsets")):
        at = f"subsets[{index}]"
        subset = check.mapping(raw, at, required=True)
        endpoints: list[Endpoint] = []
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for a, raw_address in enumerate(check.items(subset.get(key), f"{at}.{key}")):
                where = f"{at}.{key}[{a}]"
                address = check.mapping(raw_address, where, required=True)
                if check.has_error(where):
                    continue
                ip = address.get("ip")
                if not isinstance(ip, str) or not _is_ip(ip):
                    check.error(f"{where}.ip", f"must be an IP address, got {_show(ip)}")
                    continue
                endpoints.append(
                    Endpoint(
                        address=ip,
                        ready=ready,
                        serving=ready,
                        hostname=check.string(address.get("hostname"), f"{where}.hostname"),
                        node_name=check.string(address.get("nodeName"), f"{where}.nodeName"),
                    )
                )
        ports = _endpoint_ports(check, subset.get("ports"), f"{at}.ports")
        groups.append(EndpointGroup(str(oid), ports, tuple(endpoints)))

    if check.failed:
        return None
    return ManifestObject(
        oid, check.location, ServiceKey(oid.namespace, oid.name), groups=tuple(groups)
    )


def _endpoint_ports(check: _Checker, value: object, path: str) -> tuple[EndpointPort, ...]:
    ports: list[EndpointPort] = []
    names: dict[str, int] = {}
    for index, raw in enumerate(check.items(value, path)):
        at = f"{path}[{index}]"
        entry = check.mapping(raw, at, required=True)
        if check.has_error(at):
            continue
        name = entry.get("name")
        if name is None or name == "":
            name = ""
        else:
            name = check.name(name, f"{at}.name", _DNS1123_LABEL, _LABEL_RULE)
        if name in names:
            check.error(f"{at}.name", f"{name!r} is already the name of {path}[{names[name]}]")
        names.setdefault(name, index)
        protocol = check.protocol(entry.get("protocol"), f"{at}.protocol")
        app_protocol = check.string(entry.get("appProtocol"), f"{at}.appProtocol")
        number = entry.get("port")
        if number is None:
            # The API allows a port without a number ("all ports"), which a cluster cannot use.
            check.warning(f"{at}.port", "has no port number; this port is skipped")
            continue
        number = check.port(number, f"{at}.port")
        if number is not None:
            ports.append(EndpointPort(number, name, protocol, app_protocol))
    return tuple(ports)


def _string_map(check: _Checker, value: object, path: str) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for key, item in check.mapping(value, path).items():
        if not isinstance(key, str):
            check.error(path, f"keys must be strings, got {_show(key)}")
        elif not isinstance(item, str):
            check.error(f'{path}["{key}"]', f"must be a string, got {_show(item)}")
        else:
            pairs.append((key, item))
    return tuple(sorted(pairs))


def _describe(kind: object, namespace: object, name: object) -> str:
    what = kind if isinstance(kind, str) and kind else "object"
    if not isinstance(name, str) or not name:
        return f"{what} (unnamed)"
    if what in CLUSTER_SCOPED_KINDS or what.startswith("Cluster"):
        return f"{what} {name}"
    return f"{what} {namespace if isinstance(namespace, str) else '?'}/{name}"


def _is_int(value: object) -> TypeGuard[int]:
    # YAML's `true` is an int to Python; to the API server it is not a port number.
    return isinstance(value, int) and not isinstance(value, bool)


_FAMILIES: Mapping[str | None, tuple[socket.AddressFamily, ...]] = {
    "IPv4": (socket.AF_INET,),
    "IPv6": (socket.AF_INET6,),
    None: (socket.AF_INET, socket.AF_INET6),
}


def _is_ip(value: str, family: str | None = None) -> bool:
    # inet_pton is the strict C parser (no leading zeros, no zone index, as the API server wants)
    # and ten times faster than ipaddress, which matters at ten thousand endpoints.
    for af in _FAMILIES[family]:
        try:
            socket.inet_pton(af, value)
        except (OSError, ValueError):
            continue
        return True
    return False


_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "list",
    dict: "mapping",
}


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxstring = 40
_SHORT_REPR.maxother = 40


def _show(value: object) -> str:
    """A value as an error message shows it: short, with its YAML type."""
    if value is None:
        return "nothing"
    # reprlib: bounded in depth and length, so a value nested a thousand deep (which a plain
    # repr() would recurse into until RecursionError) costs no more than a short one.
    text = _SHORT_REPR.repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({_TYPE_NAMES.get(type(value), type(value).__name__)})"
