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
- Clusters and Listeners are sent whole; Endpoints and Routes only for the subscribed names. An
  empty first request for Clusters or Listeners is the legacy wildcard; `*` is the explicit one.
- Make-before-break: types go out in the order CDS, EDS, LDS, RDS, and clusters that disappear are
  kept in one more CDS response until the listeners and routes that may still use them are acked.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Snapshot
from xds.resources import (
    ADS_ORDER,
    CLUSTER,
    FULL_STATE_TYPES,
    LISTENER,
    ROUTE,
    SHORT_NAMES,
    Resource,
    encode_len_field,
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


# DiscoveryResponse.control_plane (field 6) = ControlPlane{identifier (field 1)}.
_CONTROL_PLANE_FIELD = encode_len_field(6, encode_len_field(1, CONTROL_PLANE_ID.encode()))


@dataclass(frozen=True, slots=True)
class Nack:
    version: str  # the version the client rejected
    message: str
    at: float  # unix time


@dataclass
class TypeState:
    """What one stream knows of one resource type."""

    type_url: str
    names: frozenset[str] = frozenset()
    wildcard: bool = False
    sent_version: str | None = None
    sent: Mapping[str, Resource] = field(default_factory=dict)
    last_nonce: str = ""
    awaiting_ack: bool = False
    # A response is owed even if the resources did not change (a new subscription).
    owed: bool = False
    acked_version: str = ""
    nack: Nack | None = None
    acks: int = 0
    nacks: int = 0

    def set_subscription(self, names: list[str], first: bool) -> bool:
        """Applies the names of a request; True when the subscription changed."""
        wildcard = WILDCARD in names or (first and not names and self.type_url in FULL_STATE_TYPES)
        if not first and not names and self.wildcard and WILDCARD not in self.names:
            wildcard = True  # legacy wildcard stays on until the first explicit name
        explicit = frozenset(n for n in names if n != WILDCARD)
        changed = first or explicit != self.names or wildcard != self.wildcard
        self.names, self.wildcard = explicit, wildcard
        return changed

    def select(self, snapshot: Snapshot) -> dict[str, Resource]:
        available = snapshot.of_type(self.type_url)
        if self.wildcard:
            return dict(available)
        return {name: available[name] for name in self.names if name in available}


class SotwStream:
    """One state-of-the-world stream (ADS or one type): requests and snapshots in, responses out."""

    def __init__(self, peer: str = "", types: tuple[str, ...] = ADS_ORDER) -> None:
        self.peer = peer
        self.allowed_types = types
        self.node_id = ""
        self.node_cluster = ""
        self.types: dict[str, TypeState] = {}
        self._nonces = itertools.count(1)
        self.opened_at = time.time()

    # -- inputs -----------------------------------------------------------------------------

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest, snapshot: Snapshot
    ) -> list[Response]:
        if request.HasField("node") and not self.node_id:
            # Keep only what identifies the client: the full node (with Envoy's extension list) is
            # tens of kilobytes and arrives once per stream.
            self.node_id = request.node.id
            self.node_cluster = request.node.cluster
        type_url = request.type_url
        if type_url not in self.allowed_types:
            log.warning(
                "stream %s (%s) asked for unknown type %r", self.peer, self.node_id, type_url
            )
            return []
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
                state.awaiting_ack = False
                self._record_reply(state, request)
            if state.set_subscription(names, first=False) or not request.response_nonce:
                state.owed = True
        return self._respond(snapshot, only=type_url)

    def on_snapshot(self, snapshot: Snapshot) -> list[Response]:
        return self._respond(snapshot)

    # -- internals --------------------------------------------------------------------------

    def _record_reply(self, state: TypeState, request: discovery_pb2.DiscoveryRequest) -> None:
        if request.HasField("error_detail"):
            state.nacks += 1
            state.nack = Nack(state.sent_version or "", request.error_detail.message, time.time())
            log.warning(
                "NACK from %s (%s) for %s version %s: %s",
                self.node_id,
                self.peer,
                SHORT_NAMES.get(state.type_url, state.type_url),
                state.sent_version,
                request.error_detail.message,
            )
        else:
            state.acks += 1
            state.acked_version = request.version_info
            if state.nack is not None and state.nack.version != state.sent_version:
                state.nack = None  # a later version was accepted: the NACK is history

    def _respond(self, snapshot: Snapshot, only: str | None = None) -> list[Response]:
        out = []
        for type_url in ADS_ORDER:
            # Clusters are looked at after every reply: a deferred cluster removal may be due.
            if only is not None and type_url not in (only, CLUSTER):
                continue
            state = self.types.get(type_url)
            if state is None or state.awaiting_ack:
                continue
            response = self._response_for(state, snapshot)
            if response is not None:
                out.append(response)
        return out

    def _response_for(self, state: TypeState, snapshot: Snapshot) -> Response | None:
        selected = state.select(snapshot)
        if state.type_url == CLUSTER:
            selected = self._keep_removed_clusters(state, selected, snapshot)
        version = _version_of(state, selected, snapshot)
        if version == state.sent_version and not state.owed:
            return None
        state.owed = False
        state.sent_version = version
        state.sent = selected
        state.awaiting_ack = True
        state.last_nonce = str(next(self._nonces))
        ordered = tuple(selected[name] for name in sorted(selected))
        return Response(state.type_url, version, state.last_nonce, ordered)

    def _keep_removed_clusters(
        self, state: TypeState, selected: dict[str, Resource], snapshot: Snapshot
    ) -> dict[str, Resource]:
        """Clusters just removed stay until the listeners and routes that may still use them have
        been replaced and answered, so that no route points at a missing cluster in between."""
        kept = {n: r for n, r in state.sent.items() if n not in selected}
        if not kept:
            return selected
        routing_moves = any(
            s.awaiting_ack or _version_of(s, s.select(snapshot), snapshot) != s.sent_version
            for t, s in self.types.items()
            if t in (LISTENER, ROUTE)
        )
        return {**kept, **selected} if routing_moves else selected

    # -- introspection ----------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "node_cluster": self.node_cluster,
            "peer": self.peer,
            "types": {
                SHORT_NAMES.get(url, url): {
                    "wildcard": s.wildcard,
                    "subscribed": len(s.names),
                    "sent_version": s.sent_version,
                    "nonce": s.last_nonce,
                    "awaiting_ack": s.awaiting_ack,
                    "acked_version": s.acked_version,
                    "acks": s.acks,
                    "nacks": s.nacks,
                    "last_nack": None
                    if s.nack is None
                    else {"version": s.nack.version, "message": s.nack.message, "at": s.nack.at},
                }
                for url, s in self.types.items()
            },
        }


def _version_of(state: TypeState, selected: Mapping[str, Resource], snapshot: Snapshot) -> str:
    if state.wildcard and selected.keys() == snapshot.of_type(state.type_url).keys():
        return snapshot.version(state.type_url)  # the whole type: already computed once for all
    return type_version(selected.values())
