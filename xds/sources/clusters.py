"""Several Kubernetes clusters as one mesh: each cluster is a source of its own (manifest
directories, or a kubeconfig context), and their meshes are joined by namespace sameness, as the
Kubernetes Multi-Cluster Services API and Istio assume: a Service with the same namespace and name
in several clusters is one Service, whose endpoints are all of theirs, each carrying its cluster
(`Endpoint.cluster`, which translation puts in its locality: `xds.localities`).

Which definition is served when the clusters disagree (ports, type, annotations, ...): that of the
first cluster configured that has the Service, and a warning names the Service, the clusters and
what differs. ClusterIPs are not compared: every cluster allocates its own.

A cluster whose source fails (its API server unreachable) keeps its last endpoints served: the
failure is a problem naming the cluster (`/debug/problems`), a degradation in `/readyz` and the
metric of stale clusters; the control plane stays ready while another cluster works. After
`stale_after_s` of failing without recovering, its endpoints are dropped (an error says so), so
that a cluster gone for good stops attracting traffic; they come back when it does.

Work follows changes: a member's mesh says which keys changed since the one before, and only
those keys (or, when a cluster is dropped or comes back, its keys) are joined again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from xds.model import (
    EndpointGroup,
    Mesh,
    Problem,
    Service,
    ServiceEntry,
    ServiceKey,
    error,
    warning,
)
from xds.sources.health import PartState

log = logging.getLogger(__name__)

# How often the stale limit is looked at: what dropping a cluster is late by, at most.
STALE_CHECK_S = 1.0


class Health(Protocol):
    source: str

    def unready(self) -> list[str]: ...

    def degradations(self) -> list[str]: ...

    def failing(self) -> list[PartState]: ...

    def problems(self) -> list[Problem]: ...


# A member's watch: runs until cancelled, calling its argument after each change.
Watch = Callable[[Callable[[], None]], Awaitable[None]]


class Member(Protocol):
    """One cluster's source (`ManifestSource`, `KubeSource`)."""

    @property
    def health(self) -> Health: ...

    def mesh(self) -> Mesh: ...

    def problems(self) -> list[Problem]: ...


@dataclass
class _Cluster:
    name: str
    source: Member
    watch: Watch  # the member's watch
    mesh: Mesh | None = None  # its mesh last joined
    failing_since: float | None = None
    dropped: bool = False


# The Service fields that must agree between clusters (a ClusterIP is each cluster's own).
_COMPARED = ("ports", "headless", "type", "external_name", "annotations", "traffic_distribution")


@dataclass
class _Joined:
    """What the last join produced beyond the mesh: its disagreements, by Service."""

    conflicts: dict[ServiceKey, Problem] = field(default_factory=dict)


class ClusterSet:
    """The source of several clusters, read as one (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[tuple[str, Member, Watch]],
        stale_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len({name for name, _, _ in members}) != len(members):
            raise ValueError("cluster names must be unique")
        self._clusters = [_Cluster(name, source, watch) for name, source, watch in members]
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._mesh = Mesh()
        self._joined = _Joined()
        self.health = ClusterSetHealth(self)

    @property
    def names(self) -> list[str]:
        return [cluster.name for cluster in self._clusters]

    @property
    def members(self) -> list[tuple[str, Member]]:
        return [(cluster.name, cluster.source) for cluster in self._clusters]

    def stale(self) -> dict[str, float]:
        """The clusters whose source is failing, and for how long (s)."""
        now = self._clock()
        return {
            c.name: now - c.failing_since for c in self._clusters if c.failing_since is not None
        }

    def dropped(self) -> list[str]:
        return [c.name for c in self._clusters if c.dropped]

    def _health_now(self, cluster: _Cluster, now: float) -> tuple[float | None, bool]:
        """Since when a cluster's source fails (None: it works) and whether its endpoints are
        dropped for it, as its health says now."""
        if not cluster.source.health.unready():
            return None, False
        since = now if cluster.failing_since is None else cluster.failing_since
        dropped = self.stale_after_s is not None and now - since >= self.stale_after_s
        return since, dropped

    def _look_at_health(self) -> set[str]:
        """Notes which clusters fail since when; returns those dropped or restored by it."""
        moved: set[str] = set()
        now = self._clock()
        for cluster in self._clusters:
            cluster.failing_since, dropped = self._health_now(cluster, now)
            if dropped != cluster.dropped:
                cluster.dropped = dropped
                moved.add(cluster.name)
                log.warning(
                    "cluster %s: %s",
                    cluster.name,
                    "endpoints dropped after its source failed for too long"
                    if dropped
                    else "its endpoints are served again",
                )
        return moved

    def mesh(self) -> Mesh:
        """Every cluster's mesh, joined; derived from the last join with the keys that changed."""
        moved = self._look_at_health()
        changed: set[ServiceKey] = set()
        for cluster in self._clusters:
            before = cluster.mesh
            after = cluster.source.mesh()
            cluster.mesh = after
            if cluster.name in moved or before is None:
                changed.update(after.keys)
                if before is not None:
                    changed.update(before.keys)
            elif after is not before:
                if after.parent == before.generation:
                    changed.update(after.changed)
                else:
                    changed.update(before.keys)
                    changed.update(after.keys)
        if not changed:
            return self._mesh
        entries = {key: self._join(key) for key in changed}
        self._mesh = self._mesh.derive(entries)
        return self._mesh

    def _join(self, key: ServiceKey) -> ServiceEntry | None:
        found: list[tuple[str, ServiceEntry]] = []
        for cluster in self._clusters:
            if cluster.dropped or cluster.mesh is None:
                continue
            entry = cluster.mesh.get(key)
            if entry is not None:
                found.append((cluster.name, entry))
        self._joined.conflicts.pop(key, None)
        if not found:
            return None
        served_by, first = found[0]
        differing: dict[str, list[str]] = {}
        for name, entry in found[1:]:
            fields = [f for f in _COMPARED if _differs(first.service, entry.service, f)]
            if fields:
                differing[name] = fields
        if differing:
            what = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in differing.items())
            self._joined.conflicts[key] = warning(
                f"Service {key}",
                "spec",
                f"differs between clusters ({served_by} and {what}); served as cluster "
                f"{served_by} defines it (the first cluster configured that has it)",
            )
        groups: list[EndpointGroup] = []
        for name, entry in found:
            for group in entry.groups:
                groups.append(
                    EndpointGroup(
                        f"{group.source} (cluster {name})",
                        group.ports,
                        tuple(dataclasses.replace(e, cluster=name) for e in group.endpoints),
                    )
                )
        return ServiceEntry(first.service, tuple(groups))

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        for cluster in self._clusters:
            out.extend(
                dataclasses.replace(p, object=f"{p.object} (cluster {cluster.name})")
                for p in cluster.source.problems()
            )
        stale = self.stale()
        for cluster in self._clusters:
            if cluster.name not in stale:
                continue
            seconds = stale[cluster.name]
            if cluster.dropped:
                message = (
                    f"its source has failed for {seconds:.0f} s (more than the limit of "
                    f"{self.stale_after_s:.0f} s): its endpoints are no longer served"
                )
                out.append(error(f"cluster {cluster.name}", "", message))
            else:
                message = (
                    f"its source has failed for {seconds:.0f} s: its last known endpoints are "
                    "still served"
                )
                out.append(warning(f"cluster {cluster.name}", "", message))
        out.extend(self._joined.conflicts[key] for key in sorted(self._joined.conflicts))
        return out

    async def watch(self, notify: Callable[[], None]) -> None:
        """Every member's watch, and a look at the stale limit every STALE_CHECK_S: a cluster
        crossing it (or coming back) is a change."""

        async def limits() -> None:
            while True:
                await asyncio.sleep(STALE_CHECK_S)
                now = self._clock()
                for cluster in self._clusters:
                    since, dropped = self._health_now(cluster, now)
                    if dropped != cluster.dropped or (since is None) != (
                        cluster.failing_since is None
                    ):
                        notify()
                        break

        tasks = [asyncio.ensure_future(c.watch(notify)) for c in self._clusters]
        tasks.append(asyncio.ensure_future(limits()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _differs(a: Service, b: Service, name: str) -> bool:
    return bool(getattr(a, name) != getattr(b, name))


class ClusterSetHealth:
    """The members' health as one: the control plane is unready only when every cluster is (one
    cluster failing is served from its last endpoints, a degradation)."""

    source = "clusters"

    def __init__(self, clusters: ClusterSet) -> None:
        self._set = clusters

    def _members(self) -> list[tuple[str, Health]]:
        return [(c.name, c.source.health) for c in self._set._clusters]

    def unready(self) -> list[str]:
        reasons = [(name, health.unready()) for name, health in self._members()]
        if all(found for _, found in reasons):
            return [f"cluster {name}: {why}" for name, found in reasons for why in found]
        return []

    def degradations(self) -> list[str]:
        out: list[str] = []
        for name, health in self._members():
            out.extend(f"cluster {name}: {why}" for why in health.degradations())
            if not self.unready():
                out.extend(f"cluster {name}: {why}" for why in health.unready())
        return out

    def failing(self) -> list[PartState]:
        return [
            dataclasses.replace(state, part=f"{name}/{state.part}")
            for name, health in self._members()
            for state in health.failing()
        ]

    def problems(self) -> list[Problem]:
        return []  # the members' own are in ClusterSet.problems()
