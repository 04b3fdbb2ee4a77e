"""Versioned snapshots of resources, their consistency check, and the signal that wakes streams.

A Snapshot is immutable: streams read whichever one was current when they woke, and never see one
half-published. The cache refuses a snapshot that would leave Envoy waiting for a resource that
does not exist (a cluster without its endpoints, a listener without its routes) and keeps the last
good one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from xds.resources import ADS_ORDER, Resource, type_version

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

    @classmethod
    def build(
        cls, resources: Mapping[str, Mapping[str, Resource]], trace_context: object = None
    ) -> Snapshot:
        frozen = {url: MappingProxyType(dict(items)) for url, items in resources.items()}
        versions = {url: type_version(items.values()) for url, items in frozen.items()}
        return cls(MappingProxyType(frozen), MappingProxyType(versions), trace_context)

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, MappingProxyType({}))

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, "")

    def inconsistencies(self) -> list[str]:
        """Every reference to a resource that the snapshot does not hold, as readable lines."""
        missing = []
        for type_url in ADS_ORDER:
            for resource in self.of_type(type_url).values():
                for ref_type, ref_name in resource.refs:
                    if ref_name not in self.of_type(ref_type):
                        missing.append(
                            f"{resource.type_url.rsplit('.', 1)[-1]} {resource.name!r} refers to "
                            f"{ref_type.rsplit('.', 1)[-1]} {ref_name!r}, which does not exist"
                        )
        return missing

    @property
    def size(self) -> int:
        return sum(len(r.any_bytes) for items in self.resources.values() for r in items.values())


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
        self, resources: Mapping[str, Mapping[str, Resource]], trace_context: object = None
    ) -> bool:
        snapshot = Snapshot.build(resources, trace_context)
        missing = snapshot.inconsistencies()
        if missing:
            self.refused += 1
            log.error(
                "snapshot refused, still serving the previous one: %s%s",
                "; ".join(missing[:5]),
                f" (and {len(missing) - 5} more)" if len(missing) > 5 else "",
            )
            return False
        if snapshot.versions == self._snapshot.versions and self.initialized.is_set():
            return True
        previous, self._snapshot = self._snapshot, snapshot
        self.published += 1
        self._changes.append((self.published, _changes(previous, snapshot)))
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
