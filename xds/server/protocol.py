"""The state-of-the-world xDS stream state machine, free of gRPC so that it can be tested alone.

A stream is fed two kinds of input: the client's DiscoveryRequests and new cache snapshots. Each
returns the responses to send, in order. The rules it keeps (from the xDS protocol documentation):

- A response is acknowledged by a request carrying its nonce; `error_detail` makes it a NACK. A NACK
  is recorded with the client's message, and the rejected version is not sent again: only a snapshot
  that changes the client's resources produces the next response.
- At most one un-acknowledged response per type: what changes meanwhile is merged into the next one.
- A request with another nonce than the latest one is stale: it is ignored unless it changes the
  subscription, which is honoured anyway (ignoring it could starve the client of names it needs).
- The first request of a type on a stream is a fresh subscription and is always answered, whatever
  version or nonce it carries (it may come from a stream to another server).
- Clusters and Listeners are sent whole; Endpoints and Routes only for the subscribed names, and
  after a change only those that changed (the client keeps the ones a response leaves out); a new
  subscription or a re-asked type gets every subscribed name. An empty first request for Clusters
  or Listeners is the legacy wildcard; `*` is the explicit one.
- Make-before-break: types go out in the order CDS, EDS, LDS, RDS, and clusters that disappear are
  kept in one more CDS response until the listeners and routes that may still use them are acked.
- Envoy rejects a whole response when one resource in it is invalid. After such a NACK the changes
  of that response are retried one per response; a version rejected alone is quarantined (the
  client keeps its accepted version of that resource) and everything else is delivered.
- Endpoints are asked for by a cluster the client is warming, and Envoy holds its CDS ACK until
  they come: a name the snapshot lacks is answered with an empty assignment, and endpoints (and
  routes) are answered again after a cluster (listener) change even if the request looks the same.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypedDict, TypeVar

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Changes, SnapshotLike
from xds.resources import (
    ADS_ORDER,
    CLUSTER,
    ENDPOINT,
    FULL_STATE_TYPES,
    LISTENER,
    ROUTE,
    Resource,
    encode_len_field,
    short_name,
    type_version,
)

log = logging.getLogger(__name__)

WILDCARD = "*"
CONTROL_PLANE_ID = "xds-control-plane"


@dataclass(frozen=True, slots=True)
class Response:
    type_url: str
    version: str
    nonce: str
    resources: tuple[Resource, ...]

    def encode(self) -> bytes:
        """DiscoveryResponse bytes, joined from resources serialized once for every stream."""
        return b"".join(
            (
                encode_len_field(1, self.version.encode()),
                *(encode_len_field(2, r.any_bytes) for r in self.resources),
                encode_len_field(4, self.type_url.encode()),
                encode_len_field(5, self.nonce.encode()),
                _CONTROL_PLANE_FIELD,
            )
        )


# A serialized ControlPlane{identifier (field 1)}, sent in every response.
CONTROL_PLANE = encode_len_field(1, CONTROL_PLANE_ID.encode())
_CONTROL_PLANE_FIELD = encode_len_field(6, CONTROL_PLANE)  # DiscoveryResponse.control_plane


@dataclass(frozen=True, slots=True)
class Nack:
    version: str  # the version the client rejected
    message: str
    at: float  # unix time


class NackStatus(TypedDict):
    version: str
    message: str
    at: float


class TypeStatus(TypedDict):
    """One type of one stream in /debug/syncz (and `xds status`)."""

    wildcard: bool
    subscribed: int
    sent_version: str | None
    nonce: str
    awaiting_ack: bool
    acked_version: str
    acks: int
    nacks: int
    resources_sent: int
    last_nack: NackStatus | None
    rejected_resources: dict[str, str]  # name -> the version quarantined


class StreamStatus(TypedDict):
    """One stream in /debug/syncz: its client and, by short type name, its types."""

    node_id: str
    node_cluster: str
    peer: str
    connected_at: float  # unix time
    types: dict[str, TypeStatus]


@dataclass
class TypeStateBase:
    """What one stream knows of one resource type, in either protocol variant."""

    type_url: str
    names: frozenset[str] = frozenset()
    wildcard: bool = False
    sent_version: str | None = None
    last_nonce: str = ""
    awaiting_ack: bool = False
    acked_version: str = ""
    nack: Nack | None = None
    acks: int = 0
    nacks: int = 0
    resources_sent: int = 0
    sent_at: float = 0.0  # time.monotonic() of the response in flight
    # What the client holds for sure: the resources of its last ACKed state.
    accepted: dict[str, Resource] = field(default_factory=dict)
    # name -> version of the changes in the response in flight.
    sent_changes: dict[str, str] = field(default_factory=dict)
    # Versions the client rejected alone: never sent again; the name stays at its accepted version.
    quarantine: dict[str, str] = field(default_factory=dict)
    # Versions rejected together with others: sent one per response until each is cleared or
    # quarantined, so one bad resource cannot hold back the rest.
    suspects: dict[str, str] = field(default_factory=dict)

    def touched_by(self, changed: frozenset[str]) -> bool:
        """Whether a publish that changed these names of this type concerns this subscription
        (or something else is owed: see the state-of-the-world state)."""
        return bool(changed) and (self.wildcard or not self.names.isdisjoint(changed))

    def select(self, snapshot: SnapshotLike) -> dict[str, Resource]:
        available = snapshot.of_type(self.type_url)
        if self.wildcard:
            return dict(available)
        return {name: available[name] for name in self.names if name in available}


S = TypeVar("S", bound=TypeStateBase)
# A variant's request and response: DiscoveryRequest and Response here, DeltaDiscoveryRequest and
# DeltaResponse in `delta`.
Q = TypeVar("Q", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
R = TypeVar("R")


class StreamBase(Generic[S, Q, R]):
    """What both variants share: the client's identity, nonces, ACK/NACK bookkeeping, the order in
    which types are answered, and the introspection behind /debug/syncz."""

    def __init__(
        self,
        peer: str = "",
        types: tuple[str, ...] = ADS_ORDER,
        on_reply: Callable[[str, str | None, float], None] | None = None,
    ) -> None:
        self.peer = peer
        # Told of every reply: the type, None for an ACK or the NACK's message, and the seconds
        # since the response went out.
        self._on_reply = on_reply
        self.allowed_types = types
        self.node_id = ""
        self.node_cluster = ""
        self.types: dict[str, S] = {}
        self._nonces = itertools.count(1)
        self.opened_at = time.time()

    def on_request(self, request: Q, snapshot: SnapshotLike) -> list[R]:
        raise NotImplementedError

    def touched_by(self, changes: Changes) -> bool:
        """Whether a publish with these changes gives this stream anything to look at now (a type
        awaiting its ACK looks again when the ACK comes)."""
        return any(
            not state.awaiting_ack and state.touched_by(changes.get(type_url, frozenset()))
            for type_url, state in self.types.items()
        )

    def on_snapshot(self, snapshot: SnapshotLike, changes: Changes | None = None) -> list[R]:
        """Responses for a new snapshot. With `changes` (what changed since the snapshot this
        stream last saw), only the types whose subscribed names changed are looked at, so a
        publish costs a stream what it changed for that stream, not what it subscribes to."""
        return self._respond(snapshot, changes=changes)

    def _accept(
        self, request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
    ) -> bool:
        """Remembers the node; False for a type this stream does not serve."""
        if request.HasField("node") and not self.node_id:
            # Keep only what identifies the client: the full node (with Envoy's extension list) is
            # tens of kilobytes and arrives once per stream.
            self.node_id = request.node.id
            self.node_cluster = request.node.cluster
        if request.type_url not in self.allowed_types:
            log.warning(
                "stream %s (%s) asked for unknown type %r",
                self.peer,
                self.node_id,
                request.type_url,
            )
            return False
        return True

    def _next_nonce(self, state: S) -> str:
        state.last_nonce = str(next(self._nonces))
        state.awaiting_ack = True
        state.sent_at = time.monotonic()
        return state.last_nonce

    def _record_reply(self, state: S, error_message: str | None, version: str) -> None:
        state.awaiting_ack = False
        changes, state.sent_changes = state.sent_changes, {}
        if self._on_reply is not None:
            self._on_reply(state.type_url, error_message, time.monotonic() - state.sent_at)
        if error_message is not None:
            state.nacks += 1
            state.nack = Nack(state.sent_version or "", error_message, time.time())
            if len(changes) == 1:
                state.quarantine.update(changes)
                state.suspects.pop(next(iter(changes)), None)
            else:
                state.suspects.update(changes)
            log.warning(
                "NACK from %s (%s) for %s version %s (%s): %s",
                self.node_id,
                self.peer,
                short_name(state.type_url),
                state.sent_version,
                "rejected: " + ", ".join(changes)
                if len(changes) == 1
                else f"{len(changes)} changes, to be retried one by one",
                error_message,
            )
            self._rejected(state)
        else:
            state.acks += 1
            state.acked_version = version
            for name in changes:
                state.suspects.pop(name, None)
            self._accepted(state)
            if state.nack is not None and not state.quarantine and not state.suspects:
                state.nack = None  # everything rejected has been replaced: the NACK is history

    def _accepted(self, state: S) -> None:
        """The response in flight was ACKed."""

    def _rejected(self, state: S) -> None:
        """The response in flight was NACKed: the client kept what it had accepted."""

    @staticmethod
    def _forget_replaced(state: S, wanted: Mapping[str, Resource]) -> None:
        """A rejected version matters only while it is the one wanted."""
        for held_back in (state.quarantine, state.suspects):
            for name, version in list(held_back.items()):
                current = wanted.get(name)
                if current is None or current.version != version:
                    del held_back[name]
        if state.nack is not None and not state.quarantine and not state.suspects:
            state.nack = None  # nothing rejected is wanted any more: the NACK is history

    @staticmethod
    def _vet(
        state: S, wanted: Mapping[str, Resource], held: Mapping[str, str]
    ) -> tuple[dict[str, Resource], dict[str, str]]:
        """Of the wanted resources, those to send: quarantined versions left out, and while some
        are suspect, only one suspect change. `held` is what the client has (name -> version).
        Returns the resources to send and the changes among them (name -> version)."""
        sendable: dict[str, Resource] = {}
        changes: dict[str, str] = {}
        for name in sorted(wanted):
            resource = wanted[name]
            if held.get(name) == resource.version:
                sendable[name] = resource
            elif state.quarantine.get(name) != resource.version:
                changes[name] = resource.version
        suspect = next((n for n, v in changes.items() if state.suspects.get(n) == v), None)
        if suspect is not None:
            changes = {suspect: changes[suspect]}
        for name in changes:
            sendable[name] = wanted[name]
        return sendable, changes

    def _respond(
        self, snapshot: SnapshotLike, only: str | None = None, changes: Changes | None = None
    ) -> list[R]:
        out: list[R] = []
        for type_url in ADS_ORDER:
            # Clusters are looked at after every reply: a deferred cluster removal may be due.
            if only is not None and type_url not in (only, CLUSTER):
                continue
            state = self.types.get(type_url)
            if state is None or state.awaiting_ack:
                continue
            if changes is not None and not state.touched_by(changes.get(type_url, frozenset())):
                continue
            response = self._response_for(state, snapshot)
            if response is not None:
                out.append(response)
        return out

    def _routing_moves(self, snapshot: SnapshotLike) -> bool:
        """Whether listeners or routes are in flight or about to change: clusters that disappear
        must stay until they have settled, so that no route points at a missing cluster."""
        return any(
            s.awaiting_ack or self._has_update(s, snapshot)
            for t, s in self.types.items()
            if t in (LISTENER, ROUTE)
        )

    def _wanted(self, state: S, snapshot: SnapshotLike) -> dict[str, Resource]:
        """The resources the client asks for. Endpoints are asked for by a cluster the client
        holds, so a name the snapshot lacks (its cluster is gone, or not yet sent) gets an empty
        ClusterLoadAssignment: Envoy holds its CDS ACK, and after a reconnect its CDS request,
        until a new cluster has warmed, and without endpoints it would wait out its fetch timeout
        while the server waits for that ACK to send the cluster's removal."""
        wanted = state.select(snapshot)
        if state.type_url == ENDPOINT:
            for name in state.names - wanted.keys():
                wanted[name] = _empty_assignment(name)
        return wanted

    def _response_for(self, state: S, snapshot: SnapshotLike) -> R | None:
        raise NotImplementedError

    def _has_update(self, state: S, snapshot: SnapshotLike) -> bool:
        raise NotImplementedError

    def describe(self) -> StreamStatus:
        return {
            "node_id": self.node_id,
            "node_cluster": self.node_cluster,
            "peer": self.peer,
            "connected_at": self.opened_at,
            "types": {
                short_name(url): {
                    "wildcard": s.wildcard,
                    "subscribed": len(s.names),
                    "sent_version": s.sent_version,
                    "nonce": s.last_nonce,
                    "awaiting_ack": s.awaiting_ack,
                    "acked_version": s.acked_version,
                    "acks": s.acks,
                    "nacks": s.nacks,
                    "resources_sent": s.resources_sent,
                    "last_nack": None
                    if s.nack is None
                    else {"version": s.nack.version, "message": s.nack.message, "at": s.nack.at},
                    "rejected_resources": dict(sorted(s.quarantine.items())),
                }
                for url, s in self.types.items()
            },
        }


@dataclass
class TypeState(TypeStateBase):
    """State-of-the-world: what was last sent, and whether an answer is owed regardless."""

    # Replaced with each response, never changed in place (`accepted` may be the same dict).
    sent: dict[str, Resource] = field(default_factory=dict)
    # A response is owed even if the resources did not change (a new subscription).
    owed: bool = False

    def touched_by(self, changed: frozenset[str]) -> bool:
        # An answer owed (to a cluster change the client is warming for) goes out regardless.
        return self.owed or super().touched_by(changed)

    def set_subscription(self, names: list[str], first: bool) -> bool:
        """Applies the names of a request; True when the subscription changed."""
        wildcard = WILDCARD in names or (first and not names and self.type_url in FULL_STATE_TYPES)
        if not first and not names and self.wildcard and WILDCARD not in self.names:
            wildcard = True  # legacy wildcard stays on until the first explicit name
        explicit = frozenset(n for n in names if n != WILDCARD)
        changed = first or explicit != self.names or wildcard != self.wildcard
        self.names, self.wildcard = explicit, wildcard
        return changed


class SotwStream(StreamBase[TypeState, discovery_pb2.DiscoveryRequest, Response]):
    """One state-of-the-world stream (ADS or one type): requests and snapshots in, responses out."""

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest, snapshot: SnapshotLike
    ) -> list[Response]:
        if not self._accept(request):
            return []
        type_url = request.type_url
        names = list(request.resource_names)
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = TypeState(type_url)
            state.set_subscription(names, first=True)
            state.owed = True
        elif request.response_nonce and request.response_nonce != state.last_nonce:
            if not state.set_subscription(names, first=False):
                return []  # stale and nothing new: the answer to it was already superseded
            state.owed = True
        else:
            if request.response_nonce and state.awaiting_ack:
                error = request.error_detail.message if request.HasField("error_detail") else None
                self._record_reply(state, error, request.version_info)
            if state.set_subscription(names, first=False) or not request.response_nonce:
                state.owed = True
        return self._respond(snapshot, only=type_url)

    def _response_for(self, state: TypeState, snapshot: SnapshotLike) -> Response | None:
        wanted = self._wanted(state, snapshot)
        self._forget_replaced(state, wanted)
        selected, changes = self._sotw_vet(state, wanted)
        if state.type_url == CLUSTER:
            removed = {n: r for n, r in state.sent.items() if n not in selected}
            if removed and self._routing_moves(snapshot):
                selected = {**removed, **selected}
        version = _version_of(state, selected, snapshot)
        if version == state.sent_version and not state.owed:
            return None
        if state.owed or state.type_url in FULL_STATE_TYPES:
            carried = selected
        else:
            # Endpoints and routes: the client keeps what a response leaves out, so a change
            # carries only what differs from what it holds (one assignment, not every one).
            previous = state.sent
            carried = {
                name: resource
                for name, resource in selected.items()
                if (held := previous.get(name)) is None or held.version != resource.version
            }
        state.owed = False
        state.sent_version = version
        state.sent = selected
        state.sent_changes = changes
        dependent = self.types.get(_DEPENDENT.get(state.type_url, ""))
        if changes and dependent is not None:
            # A new or changed cluster (listener) starts warming and waits for its endpoints
            # (routes), asking with names that may look unchanged: answer it all the same.
            dependent.owed = True
        nonce = self._next_nonce(state)
        ordered = tuple(carried[name] for name in sorted(carried))
        state.resources_sent += len(ordered)
        return Response(state.type_url, version, nonce, ordered)

    def _has_update(self, state: TypeState, snapshot: SnapshotLike) -> bool:
        selected, _ = self._sotw_vet(state, self._wanted(state, snapshot))
        return _version_of(state, selected, snapshot) != state.sent_version

    def _sotw_vet(
        self, state: TypeState, wanted: dict[str, Resource]
    ) -> tuple[dict[str, Resource], dict[str, str]]:
        """State of the world must name every resource: one held back keeps its accepted
        version (or stays out if the client never accepted one)."""
        held = {name: r.version for name, r in state.accepted.items()}
        sendable, changes = self._vet(state, wanted, held)
        for name in wanted.keys() - sendable.keys():
            if name in state.accepted:
                sendable[name] = state.accepted[name]
        return sendable, changes

    def _accepted(self, state: TypeState) -> None:
        # Shared, not copied: a SotW stream replaces `sent` with each response and never changes
        # either mapping in place, so an ACK costs nothing whatever the number of resources.
        state.accepted = state.sent

    def _rejected(self, state: TypeState) -> None:
        # The client still runs its accepted state: that is what was "sent" now, so that the
        # accepted set is not sent again for nothing.
        state.sent = state.accepted
        state.sent_version = type_version(state.accepted.values())


def _empty_assignment(name: str) -> Resource:
    # ClusterLoadAssignment{cluster_name (field 1)}: a cluster with no endpoints.
    return Resource.from_bytes(ENDPOINT, name, encode_len_field(1, name.encode()))


# In ADS order, the type whose resources a changed resource of the key type needs again.
_DEPENDENT = {CLUSTER: ENDPOINT, LISTENER: ROUTE}


def _version_of(state: TypeState, selected: Mapping[str, Resource], snapshot: SnapshotLike) -> str:
    available = snapshot.of_type(state.type_url)
    if (
        state.wildcard
        and selected.keys() == available.keys()
        and all(resource is available[name] for name, resource in selected.items())
    ):
        return snapshot.version(state.type_url)  # the whole type: already computed once for all
    return type_version(selected.values())
