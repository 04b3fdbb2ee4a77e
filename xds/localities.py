"""Locality-aware endpoints: traffic stays in its zone, fails over to its region, then elsewhere.

A Service keeps its traffic close when it asks (`spec.trafficDistribution`: PreferClose,
PreferSameZone or PreferSameNode; EndpointSlice `hints.forZones`; the annotation
`xds.dev/locality-aware: "true"`, which `"false"` overrides) or when `Settings.locality_aware`
says so for every Service. Translation then marks its ClusterLoadAssignments (`LocalityAware`),
and a client whose node names a locality (`Locality`, from `node.locality`) gets them with a
priority per locality (`for_locality`): its own zone 0, the rest of its region 1, everything else
2, renumbered without gaps (a level with no endpoints is left out). With several Kubernetes
clusters (`xds.sources.clusters`), an endpoint's locality names its cluster in `sub_zone`, and the
client's own cluster (node metadata `CLUSTER_ID`) comes first: the same three levels in it, then in
the others. Envoy sends to priority 0 while
it is healthy enough and spills over by health (see the README on the overprovisioning factor);
gRPC's clients fail over when a priority has no endpoint they can reach.

Each locality keeps its weight (its HEALTHY endpoints, `xds.translate.encode_assignment`), so
traffic spilling over is spread by endpoint, and DRAINING endpoints never count as available:
Envoy takes them for unhealthy in a priority's health, and they carry no weight.

Clients of one locality share one view (`xds.server.views`): a change costs one rebuild per
locality that holds the changed assignment, whatever the number of clients. Clients whose node
names no locality, and assignments of Services that do not ask, are served as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from xds._pb.envoy.config.endpoint.v3 import endpoint_pb2
from xds.resources import ENDPOINT, Resource
from xds.scopes import ServiceScope

LOCALITY_AWARE_ANNOTATION = "xds.dev/locality-aware"
# What a ClusterLoadAssignment's version takes in when its Service keeps traffic close, so that
# turning it on or off is a change of the resource even when its endpoints stay.
LOCALITY_SALT = b"locality-aware"


class Locality(NamedTuple):
    """Where a client is: its node's locality, and the Kubernetes cluster it runs in (node
    metadata CLUSTER_ID, Istio's key); "" for what it does not say."""

    region: str = ""
    zone: str = ""
    cluster: str = ""

    def priority(self, region: str, zone: str, cluster: str = "") -> int:
        """For an endpoint locality in the client's own cluster (or when either names none):
        0 in the client's zone (and region, when both name one), 1 in its region, 2 elsewhere;
        in another cluster, 3, 4 and 5 likewise."""
        same_region = bool(self.region) and region == self.region
        if self.zone and zone == self.zone and (same_region or not self.region or not region):
            level = 0
        else:
            level = 1 if same_region else 2
        own = not self.cluster or not cluster or cluster == self.cluster
        return level if own else 3 + level


@dataclass(frozen=True, slots=True)
class LocalityAware:
    """The detail of a ClusterLoadAssignment whose Service keeps traffic close; `scope` is its
    Service's scope under namespace scoping (`xds.scopes.service_scope` finds it here)."""

    scope: ServiceScope | None = None


def for_locality(resource: Resource, client: Locality) -> Resource:
    """The assignment as a client in `client` sees it: localities prioritized by closeness when
    its Service keeps traffic close, else as it is."""
    if resource.type_url != ENDPOINT or not isinstance(resource.detail, LocalityAware):
        return resource
    assignment = endpoint_pb2.ClusterLoadAssignment.FromString(resource.body)
    levels = [
        client.priority(e.locality.region, e.locality.zone, e.locality.sub_zone)
        for e in assignment.endpoints
    ]
    if not levels:
        return resource
    if len(set(levels)) == 1:
        return resource  # one level: every locality at priority 0, as shared
    # Envoy wants priorities 0..N without a gap: a level no endpoint is at is left out.
    renumbered = {level: index for index, level in enumerate(sorted(set(levels)))}
    for localities, level in zip(assignment.endpoints, levels, strict=True):
        localities.priority = renumbered[level]
    body = assignment.SerializeToString(deterministic=True)
    return Resource.from_bytes(ENDPOINT, resource.name, body, resource.refs)
