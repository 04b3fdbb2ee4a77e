"""Versioned snapshots of resources, their consistency check, and the signal that wakes streams.

A Snapshot is immutable: streams read whichever one was current when they woke, and never see one
half-published. The cache refuses a snapshot that would leave Envoy waiting for a resource that
does not exist (a cluster without its endpoints, a listener without its routes) and keeps the last
good one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from xds.resources import (
    SNAPSHOT_TYPES,
    Resource,
    format_version,
    type_digest,
    version_share,
)

log = logging.getLogger(__name__)

# Names of changed resources (added, changed or removed), by type URL: what one publish changed.
Changes = Mapping[str, frozenset[str]]
# How many publishes' change sets the cache remembers: a stream that fell further behind looks at
# everything it subscribes to once, as it would without change sets.
CHANGES_KEPT = 64


class SnapshotLike(Protocol):
    """What a stream reads of a snapshot: a Snapshot, or a client's view of one that rewrites some
    types (`xds.server.views.SnapshotView`)."""

    @property
    def trace_context(self) -> object: ...

    def of_type(self, type_url: str) -> Mapping[str, Resource]: ...

    def version(self, type_url: str) -> str: ...


@dataclass(frozen=True)
class Snapshot:
    resources: Mapping[str, Mapping[str, Resource]] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    # The tracing context of the change that produced this snapshot (opaque here): pushes of it
    # join that trace.
    trace_context: object = field(default=None, compare=False)
    # Each type's version as a number: the XOR of its resources' shares (`version_share`), so that
    # a derived snapshot's versions follow what changed.
    digests: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, resources: Mapping[str, Mapping[str, Resource]], trace_context: object = None
    ) -> Snapshot:
        frozen = {url: MappingProxyType(dict(items)) for url, items in resources.items()}
        digests = {url: type_digest(items.values()) for url, items in frozen.items()}
        versions = {url: format_version(digest) for url, digest in digests.items()}
        return cls(
            MappingProxyType(frozen),
            MappingProxyType(versions),
            trace_context,
            MappingProxyType(digests),
        )

    def derive(
        self,
        resources: Mapping[str, Mapping[str, Resource]],
        names: Changes,
        trace_context: object = None,
    ) -> tuple[Snapshot, Changes]:
        """The snapshot of `resources`, given that only the `names` (by type) may differ from this
        one: the types `names` leaves out keep this snapshot's mappings, and versions follow the
        changed resources alone. `resources`' mappings are taken as they are (never copied): the
        caller must not change them after. Returns the snapshot and the names that do differ."""
        mappings = dict(self.resources)
        digests = dict(self.digests)
        versions = dict(self.versions)
        differ: dict[str, frozenset[str]] = {}
        for type_url, candidates in names.items():
            old = self.of_type(type_url)
            new = resources.get(type_url, _EMPTY)
            digest = digests.get(type_url, 0)
            changed = set()
            for name in candidates:
                before, after = old.get(name), new.get(name)
                if before is after or (
                    before is not None and after is not None and before.version == after.version
                ):
                    continue
                if before is not None:
                    digest ^= version_share(name, before.version)
                if after is not None:
                    digest ^= version_share(name, after.version)
                changed.add(name)
            if not changed and type_url in mappings:
                continue
            mappings[type_url] = new if isinstance(new, MappingProxyType) else MappingProxyType(new)
            digests[type_url] = digest
            versions[type_url] = format_version(digest)
            if changed:
                differ[type_url] = frozenset(changed)
        snapshot = Snapshot(
            MappingProxyType(mappings),
            MappingProxyType(versions),
            trace_context,
            MappingProxyType(digests),
        )
        return snapshot, differ

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, _EMPTY)

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, "")

    def inconsistencies(self) -> list[str]:
        """Every reference to a resource that the snapshot does not hold, as readable lines."""
        missing: list[str] = []
        for type_url in SNAPSHOT_TYPES:
            for resource in self.of_type(type_url).values():
                missing.extend(self._dangling(resource))
        return missing

    def _dangling(self, resource: Resource) -> Iterator[str]:
        for ref_type, ref_name in resource.refs:
            if ref_name not in self.of_type(ref_type):
                yield (
                    f"{resource.type_url.rsplit('.', 1)[-1]} {resource.name!r} refers to "
                    f"{ref_type.rsplit('.', 1)[-1]} {ref_name!r}, which does not exist"
                )

    @functools.cached_property
    def size(self) -> int:
        """Bytes of every resource: asked per scrape and per traced publish, counted once."""
        return sum(len(r.any_bytes) for items in self.resources.values() for r in items.values())


_EMPTY: Mapping[str, Resource] = MappingProxyType({})


class _Referrers:
    """How many resources of the published snapshot refer to each (type, name): what tells, when
    a change removes a resource, whether one that did not change still needs it."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        for items in snapshot.resources.values():
            for resource in items.values():
                for ref_type, ref_name in resource.refs:
                    self._bump(ref_type, ref_name, 1)

    def _bump(self, ref_type: str, ref_name: str, step: int) -> None:
        counts = self.counts.setdefault(ref_type, {})
        count = counts.get(ref_name, 0) + step
        if count:
            counts[ref_name] = count
        else:
            counts.pop(ref_name, None)

    def apply(self, delta: Mapping[tuple[str, str], int]) -> None:
        """Count in a published change (its `delta`)."""
        for (ref_type, ref_name), step in delta.items():
            self._bump(ref_type, ref_name, step)

    def consistent(
        self, after: Snapshot, changes: Changes, delta: Mapping[tuple[str, str], int]
    ) -> bool:
        """Whether `after`, which differs from this count's snapshot in `changes` only (making
        `delta` to the counts), refers to nothing it lacks: the changed resources' references must
        resolve, and a removed resource must be referred to by nothing once `delta` is counted."""
        for type_url, names in changes.items():
            new = after.of_type(type_url)
            for name in names:
                resource = new.get(name)
                if resource is None:
                    held = self.counts.get(type_url, {}).get(name, 0)
                    if held + delta.get((type_url, name), 0) > 0:
                        return False
                elif any(ref not in after.of_type(url) for url, ref in resource.refs):
                    return False
        return True


def _ref_delta(before: Snapshot, after: Snapshot, changes: Changes) -> dict[tuple[str, str], int]:
    """How a change moves the count of referrers of each (type, name) it touches."""
    delta: dict[tuple[str, str], int] = {}
    for type_url, names in changes.items():
        old, new = before.of_type(type_url), after.of_type(type_url)
        for name in names:
            for resource, step in ((old.get(name), -1), (new.get(name), 1)):
                if resource is not None:
                    for ref in resource.refs:
                        delta[ref] = delta.get(ref, 0) + step
    return delta


class Cache:
    """Holds the current snapshot and the event that fires when the next one is published."""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._changed = asyncio.Event()
        # Set by the first publish: until then there is nothing true to tell a client.
        self.initialized = asyncio.Event()
        self.published = 0  # also the serial number of the current snapshot
        self.refused = 0
        # (serial, what that publish changed) of the latest publishes.
        self._changes: deque[tuple[int, Changes]] = deque(maxlen=CHANGES_KEPT)
        self._referrers = _Referrers(self._snapshot)
        # The names in which the last resources offered (published or refused) may differ from the
        # current snapshot's; None when that is not known (a refused offer without its changes).
        self._behind: dict[str, frozenset[str]] | None = {}

    def changes_since(self, serial: int) -> Changes | None:
        """What the publishes after `serial` changed, up to the current snapshot; None when that is
        no longer known (a stream that fell too far behind must look at everything)."""
        if serial == self.published:
            return {}
        if not self._changes or self._changes[0][0] > serial + 1:
            return None
        merged: dict[str, frozenset[str]] = {}
        for published, changes in self._changes:
            if published > serial:
                for type_url, names in changes.items():
                    merged[type_url] = merged.get(type_url, frozenset()) | names
        return merged

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def watch(self) -> tuple[Snapshot, asyncio.Event]:
        """The current snapshot and the event that fires when it is replaced, read together so that
        a publish can never fall between them unseen."""
        return self._snapshot, self._changed

    def publish(
        self,
        resources: Mapping[str, Mapping[str, Resource]],
        trace_context: object = None,
        changes: Changes | None = None,
    ) -> bool:
        """Publish `resources` unless they refer to something they lack; return whether they are
        served now (also when they equal the current snapshot).

        `changes`, when given, names by type every resource that may differ from the resources of
        the previous call (published or refused), and every type it leaves out is as it was then:
        the snapshot, its versions and its consistency check then cost what changed, and the
        mappings of `resources` are kept as they are, so the caller must never change them after
        (a `Translation` never does). Without it, everything is copied and compared.
        """
        previous = self._snapshot
        names: dict[str, frozenset[str]] | None = None
        delta: dict[tuple[str, str], int] | None = None
        if changes is not None and self._behind is not None:
            names = dict(self._behind)
            for type_url, given in changes.items():
                names[type_url] = names.get(type_url, frozenset()) | given
            snapshot, differ = previous.derive(resources, names, trace_context)
            delta = _ref_delta(previous, snapshot, differ)
            consistent = self._referrers.consistent(snapshot, differ, delta)
        else:
            snapshot = Snapshot.build(resources, trace_context)
            differ = _changes(previous, snapshot)
            consistent = not snapshot.inconsistencies()
        if not consistent:
            self.refused += 1
            self._behind = names
            missing = snapshot.inconsistencies()  # the refusal's reasons, by name
            log.error(
                "snapshot refused, still serving the previous one: %s%s",
                "; ".join(missing[:5]),
                f" (and {len(missing) - 5} more)" if len(missing) > 5 else "",
            )
            return False
        self._behind = {}
        if not differ and self.initialized.is_set():
            return True
        self._snapshot = snapshot
        if delta is None:
            self._referrers = _Referrers(snapshot)
        else:
            self._referrers.apply(delta)
        self.published += 1
        self._changes.append((self.published, differ))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self.initialized.set()
        return True


def _changes(before: Snapshot, after: Snapshot) -> Changes:
    """The names whose resource differs between two snapshots, by type (only types that differ)."""
    out: dict[str, frozenset[str]] = {}
    for type_url in after.resources.keys() | before.resources.keys():
        if before.version(type_url) == after.version(type_url):
            continue
        old, new = before.of_type(type_url), after.of_type(type_url)
        names = set(old.keys() ^ new.keys())
        names.update(
            name
            for name, resource in new.items()
            if (held := old.get(name)) is not None
            and held is not resource
            and held.version != resource.version
        )
        out[type_url] = frozenset(names)
    return out
