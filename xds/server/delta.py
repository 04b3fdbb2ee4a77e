"""The incremental (delta) xDS stream state machine, free of gRPC like its state-of-the-world twin.

The server keeps, per type, the versions it believes the client holds (`known`): seeded from the
first request's `initial_resource_versions` (so a client reconnecting from another replica is sent
only what differs), then updated with every response. A response carries the resources whose
version differs from `known`, and `removed_resources` for names the client holds that are gone.

Rules kept beyond the state-of-the-world ones (see `protocol`):

- Subscription changes are deltas: every request's subscribe and unsubscribe lists are applied,
  even on a stale nonce, because dropping one would lose it for good.
- A name subscribed before it exists is remembered and sent when it appears; it is never reported
  removed unless the client said it held it.
- Unsubscribing forgets the client's version of the name, so that subscribing again sends it again.
- The first request of a type is always answered, even with nothing in it, so the client's
  initialisation does not wait for a timeout; later requests are answered only when there is news.
- `*` subscribes to everything; an empty first request for Clusters or Listeners is the legacy
  wildcard, which ends when the client names resources without `*`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import SnapshotLike
from xds.resources import CLUSTER, FULL_STATE_TYPES, Resource, encode_len_field
from xds.server.protocol import CONTROL_PLANE, WILDCARD, StreamBase, TypeStateBase


@dataclass(frozen=True, slots=True)
class DeltaResponse:
    type_url: str
    system_version: str
    nonce: str
    resources: tuple[Resource, ...]
    removed: tuple[str, ...]

    def encode(self) -> bytes:
        """DeltaDiscoveryResponse bytes, framing the shared serialized resources."""
        return b"".join(
            (
                encode_len_field(1, self.system_version.encode()),
                *(
                    # envoy.service.discovery.v3.Resource: version 1, resource 2, name 3.
                    encode_len_field(
                        2,
                        encode_len_field(1, r.version.encode())
                        + encode_len_field(2, r.any_bytes)
                        + encode_len_field(3, r.name.encode()),
                    )
                    for r in self.resources
                ),
                encode_len_field(4, self.type_url.encode()),
                encode_len_field(5, self.nonce.encode()),
                *(encode_len_field(6, name.encode()) for name in self.removed),
                encode_len_field(7, CONTROL_PLANE),  # DeltaDiscoveryResponse.control_plane
            )
        )


@dataclass
class DeltaTypeState(TypeStateBase):
    # name -> version the client holds, as far as the server knows.
    known: dict[str, str] = field(default_factory=dict)
    legacy_wildcard: bool = False
    answered: bool = False
    sent_removed: tuple[str, ...] = ()
    sent_resources: dict[str, Resource] = field(default_factory=dict)

    def apply(self, request: discovery_pb2.DeltaDiscoveryRequest, first: bool) -> None:
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if first:
            self.known = dict(request.initial_resource_versions)
            self.legacy_wildcard = not subscribe and self.type_url in FULL_STATE_TYPES
        elif subscribe:
            self.legacy_wildcard = False
        self.names = frozenset((self.names | subscribe) - unsubscribe)
        self.wildcard = self.legacy_wildcard or WILDCARD in self.names
        if not self.wildcard:
            for name in unsubscribe:
                self.known.pop(name, None)

    def diff(
        self, wanted: dict[str, Resource], snapshot: SnapshotLike
    ) -> tuple[list[Resource], list[str]]:
        """Resources the client lacks or holds at another version (less those held back, see
        `StreamBase._vet`); names it holds that are gone."""
        _, changes = StreamBase._vet(self, wanted, self.known)
        changed = [wanted[name] for name in changes]
        available = snapshot.of_type(self.type_url)
        removed = [
            name
            for name in sorted(self.known)
            if name not in available
            and name not in wanted
            and (self.wildcard or name in self.names)
        ]
        return changed, removed


class DeltaStream(StreamBase[DeltaTypeState, discovery_pb2.DeltaDiscoveryRequest, DeltaResponse]):
    """One incremental stream (delta ADS or one type)."""

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest, snapshot: SnapshotLike
    ) -> list[DeltaResponse]:
        if not self._accept(request):
            return []
        type_url = request.type_url
        state = self.types.get(type_url)
        first = state is None
        if state is None:
            state = self.types[type_url] = DeltaTypeState(type_url)
        elif (
            request.response_nonce
            and request.response_nonce == state.last_nonce
            and state.awaiting_ack
        ):
            error = request.error_detail.message if request.HasField("error_detail") else None
            self._record_reply(state, error, state.sent_version or "")
        state.apply(request, first)
        return self._respond(snapshot, only=type_url)

    def _response_for(self, state: DeltaTypeState, snapshot: SnapshotLike) -> DeltaResponse | None:
        wanted = self._wanted(state, snapshot)
        self._forget_replaced(state, wanted)
        changed, removed = state.diff(wanted, snapshot)
        if removed and state.type_url == CLUSTER and self._routing_moves(snapshot):
            removed = []  # make-before-break: clusters go once the routes have moved away
        if not changed and not removed and state.answered:
            return None
        state.answered = True
        for resource in changed:
            state.known[resource.name] = resource.version
        for name in removed:
            del state.known[name]
        state.sent_changes = {r.name: r.version for r in changed}
        state.sent_resources = {r.name: r for r in changed}
        state.sent_removed = tuple(removed)
        state.resources_sent += len(changed)
        state.sent_version = snapshot.version(state.type_url)
        nonce = self._next_nonce(state)
        return DeltaResponse(
            state.type_url, state.sent_version, nonce, tuple(changed), tuple(removed)
        )

    def _has_update(self, state: DeltaTypeState, snapshot: SnapshotLike) -> bool:
        changed, removed = state.diff(self._wanted(state, snapshot), snapshot)
        return bool(changed or removed)

    def _accepted(self, state: DeltaTypeState) -> None:
        state.accepted.update(state.sent_resources)
        for name in state.sent_removed:
            state.accepted.pop(name, None)

    def _rejected(self, state: DeltaTypeState) -> None:
        # The client kept what it had: its versions are the accepted ones again.
        for name in (*state.sent_resources, *state.sent_removed):
            if name in state.accepted:
                state.known[name] = state.accepted[name].version
            else:
                state.known.pop(name, None)
