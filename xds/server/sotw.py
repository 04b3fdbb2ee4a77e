"""The state-of-the-world rules of an xDS stream (the shared half is in `stream`).

- The first request of a type on a stream is a fresh subscription and is always answered, whatever
  version or nonce it carries (it may come from a stream to another server).
- A request with another nonce than the latest one is stale: it is ignored unless it changes the
  subscription, which is honoured anyway (ignoring it could starve the client of names it needs).
  So is an ACK (the latest nonce, no error) naming another version than the one sent with it.
- Clusters and Listeners are sent whole; Endpoints and Routes only for the subscribed names, and
  after a change only those that changed (the client keeps the ones a response leaves out); a new
  subscription or a re-asked type gets every subscribed name. An empty first request for Clusters
  or Listeners is the legacy wildcard; `*` is the explicit one.
- After a NACK only a snapshot that changes the client's resources produces the next response.
- Endpoints (and routes) are answered again after a cluster (listener) change even if the request
  looks the same: the client is warming and waits for them.

A wildcard subscriber holding exactly the snapshot's resources of a type holds the snapshot's own
mapping and its version; a complete response's bytes (all but the nonce) depend only on its type
and version, so thousands of streams share one encoding of it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import xxhash

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import SnapshotLike
from xds.resources import (
    CLUSTER,
    ENDPOINT,
    FULL_STATE_TYPES,
    LISTENER,
    ROUTE,
    Resource,
    encode_len_field,
    format_version,
    version_share,
)
from xds.server.stream import (
    CONTROL_PLANE,
    SHARED,
    WILDCARD,
    StreamBase,
    Subscription,
    TypeStateBase,
    resource_errors,
)

_CONTROL_PLANE_FIELD = encode_len_field(6, CONTROL_PLANE)  # DiscoveryResponse.control_plane


@dataclass(frozen=True, slots=True)
class Response:
    type_url: str
    version: str
    nonce: str
    resources: tuple[Resource, ...]
    # Carries the client's whole selection, so its bytes but the nonce are those of every complete
    # response of this type and version: encoded once, shared by every stream.
    complete: bool = False
    # Names asked for that the snapshot lacks: reported NOT_FOUND (`stream.resource_errors`).
    missing: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """DiscoveryResponse bytes, joined from resources serialized once for every stream."""
        if self.complete:
            body = SHARED.body(("sotw", self.type_url, self.version), lambda: _body(self))
        else:
            body = _body(self)
        return b"".join(
            (
                body,
                encode_len_field(5, self.nonce.encode()),
                _CONTROL_PLANE_FIELD,
                resource_errors(7, self.type_url, self.missing) if self.missing else b"",
            )
        )


def _body(response: Response) -> bytes:
    return b"".join(
        (
            encode_len_field(1, response.version.encode()),
            *(encode_len_field(2, r.any_bytes) for r in response.resources),
            encode_len_field(4, response.type_url.encode()),
        )
    )


@dataclass
class TypeState(TypeStateBase):
    """State-of-the-world: what the client holds, and whether an answer is owed regardless."""

    # What the client holds once the response in flight is ACKed: replaced with each response,
    # never changed in place (`accepted` may be the same mapping, and when it holds exactly the
    # snapshot's resources of the type it is the snapshot's own mapping: a fleet shares one).
    sent: Mapping[str, Resource] = field(default_factory=dict)
    accepted: Mapping[str, Resource] = field(default_factory=dict)
    # XOR of the version shares of `sent` (None: not computed yet): its version.
    digest: int | None = None
    # A response is owed even if the resources did not change (a new subscription).
    owed: bool = False
    # Of the last request's names, as they came (see `_names_fingerprint`); empty: none.
    fingerprint: bytes = b""
    # How an ACK of the last response ends: its type (field 4), then its nonce (field 5).
    ack_tail: bytes = b""

    def held(self, name: str) -> str | None:
        resource = self.sent.get(name)
        return None if resource is None else resource.version

    def held_names(self) -> Collection[str]:
        return self.sent.keys()

    def set_subscription(self, requested: Collection[str], fingerprint: bytes, first: bool) -> bool:
        """Applies the names of a request; True when the subscription changed. Envoy repeats
        every name in every request (an ACK of 1,000 endpoints names all 1,000): a request whose
        names' fingerprint is the last one's is the same subscription, known without reading a
        name."""
        if not first and fingerprint and fingerprint == self.fingerprint:
            return False
        self.fingerprint = fingerprint
        sub = self.sub
        names = frozenset(requested)
        wildcard = WILDCARD in names or (first and not names and self.type_url in FULL_STATE_TYPES)
        if not first and not names and sub.wildcard:
            wildcard = True  # legacy wildcard stays on until the first explicit name
        explicit = names - _WILDCARD_ONLY if WILDCARD in names else names
        if not first and wildcard == sub.wildcard and explicit == sub.names:
            return False
        if wildcard != sub.wildcard or self.pending is None:
            self.pending = None
        else:
            self.pending |= explicit ^ sub.names  # names added are sent, names dropped forgotten
        self.sub = Subscription(explicit, wildcard)
        return True


class SotwStream(StreamBase[TypeState, discovery_pb2.DiscoveryRequest, Response]):
    """One state-of-the-world stream (ADS or one type): requests and snapshots in, responses out."""

    def on_message(self, raw: bytes, snapshot: SnapshotLike) -> list[Response]:
        """Responses to a serialized DiscoveryRequest. An ACK that repeats the names of the last
        request of its type is recognised from its bytes, as Envoy lays them out, without
        parsing a name: with 10,000 clusters that is 300 KB per ACK of every stream."""
        key: bytes | None = None
        split = self._split(raw)
        if split is not None:
            state, version, names_field = split
            key = xxhash.xxh3_128_digest(names_field)
            if key == state.fingerprint:
                if state.awaiting_ack:
                    if version != state.sent_version:
                        return []  # an ACK of a version never sent: stale, and nothing new
                    self._record_reply(state, None, version)
                return self._respond(snapshot, only=state.type_url)
        return self.on_request(discovery_pb2.DiscoveryRequest.FromString(raw), snapshot, key)

    def _split(self, raw: bytes) -> tuple[TypeState, str, memoryview] | None:
        """(the type it acknowledges, its version, its names as they are serialized) of a request
        laid out in field order (version 1, node 2, names 3, type 4, nonce 5) that ends with the
        type and the nonce of a response in flight or last sent; None for anything else (a NACK
        carries error_detail last), which is then parsed in full."""
        for state in self.types.values():
            if not state.last_nonce:
                continue
            tail = state.ack_tail
            if not raw.endswith(tail):
                continue
            position, version = 0, ""
            try:
                if raw[:1] == b"\x0a":  # version_info
                    length, position = _varint(raw, 1)
                    version = raw[position : position + length].decode()
                    position += length
                if raw[position : position + 1] == b"\x12":  # node
                    length, position = _varint(raw, position + 1)
                    position += length
            except (IndexError, UnicodeDecodeError):
                return None
            end = len(raw) - len(tail)
            if position > end:
                return None
            return state, version, memoryview(raw)[position:end]
        return None

    def on_request(
        self,
        request: discovery_pb2.DiscoveryRequest,
        snapshot: SnapshotLike,
        fingerprint: bytes | None = None,
    ) -> list[Response]:
        """Responses to a request, which is consumed: the fields that vary between requests are
        cleared from it once read. `fingerprint` is that of its names, if known."""
        if not self._accept(request):
            return self._unknown_type(request)
        type_url = request.type_url
        nonce = request.response_nonce
        error = request.error_detail.message if request.HasField("error_detail") else None
        version = request.version_info
        names = request.resource_names
        if fingerprint is None:
            fingerprint = _names_fingerprint(request)
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = TypeState(type_url)
            state.set_subscription(names, fingerprint, first=True)
            state.owed = True
        elif nonce and (
            nonce != state.last_nonce
            # An ACK names the version it accepts, which must be the one sent with that nonce:
            # recording another would have /debug/syncz claim the client holds what it never got.
            or (error is None and state.awaiting_ack and version != state.sent_version)
        ):
            if not state.set_subscription(names, fingerprint, first=False):
                return []  # stale and nothing new: the answer to it was already superseded
            state.owed = True
        else:
            if nonce and state.awaiting_ack:
                self._record_reply(state, error, version)
            if state.set_subscription(names, fingerprint, first=False) or not nonce:
                state.owed = True
        return self._respond(snapshot, only=type_url)

    def _due(self, state: TypeState) -> bool:
        return state.owed or super()._due(state)

    def _empty_response(self, type_url: str, nonce: str) -> Response:
        return Response(type_url, "", nonce, ())

    def _response_for(self, state: TypeState, snapshot: SnapshotLike) -> Response | None:
        plan, removed = self._look(state, snapshot)
        if not plan.changes and not removed and not state.owed:
            return None

        available = state.available(snapshot)
        held = state.sent
        added = sum(1 for name in plan.changes if name not in held)
        if self._in_step(state, plan, len(held) - len(removed) + added, available, snapshot):
            sent: Mapping[str, Resource] = available
            version = snapshot.version(state.type_url)
            digest = None
        else:
            digest = state.digest
            if digest is None:
                digest = _digest_of(held)
            updated = _copy(held)
            for name in removed:
                digest ^= version_share(name, updated.pop(name).version)
            for name, resource in plan.changes.items():
                previous = updated.get(name)
                if previous is not None:
                    digest ^= version_share(name, previous.version)
                digest ^= version_share(name, resource.version)
                # Keyed by the resource's own name: shared with the snapshot, not the request's.
                updated[resource.name] = resource
            sent = updated
            version = format_version(digest)

        complete = state.owed or state.type_url in FULL_STATE_TYPES
        if complete:
            resources = SHARED.resources(state.type_url, version, sent)
        else:
            # Endpoints and routes: the client keeps what a response leaves out, so a change
            # carries only what differs from what it holds (one assignment, not every one).
            resources = tuple(plan.changes.values())  # sorted by name
        state.owed = False
        state.sent, state.digest = sent, digest
        changes = {name: r.version for name, r in plan.changes.items()}
        dependent = self.types.get(_DEPENDENT.get(state.type_url, ""))
        if changes and dependent is not None:
            # A new or changed cluster (listener) starts warming and waits for its endpoints
            # (routes), asking with names that may look unchanged: answer it all the same.
            dependent.owed = True
        nonce = self._send(state, version, changes)
        state.ack_tail = encode_len_field(4, state.type_url.encode()) + encode_len_field(
            5, nonce.encode()
        )
        state.resources_sent += len(resources)
        return Response(
            state.type_url, version, nonce, resources, complete, state.missing(snapshot)
        )

    def _has_update(self, state: TypeState, snapshot: SnapshotLike) -> bool:
        return state.owed or (self._due(state) and bool(self._plan(state, snapshot)))

    def _accepted(self, state: TypeState) -> None:
        # Shared, not copied: a SotW stream replaces `sent` with each response and never changes
        # either mapping in place, so an ACK costs nothing whatever the number of resources.
        state.accepted = state.sent

    def _rejected(self, state: TypeState) -> None:
        # The client still runs its accepted state: that is what was "sent" now, so that the
        # accepted set is not sent again for nothing. What to retry is found by a full look.
        state.sent, state.digest = state.accepted, None
        state.sent_version = state.acked_version
        state.look_at_everything()


def _copy(mapping: Mapping[str, Resource]) -> dict[str, Resource]:
    # A dict or a snapshot's read-only view of one copies in C; dict(view) walks it in Python.
    if isinstance(mapping, dict | MappingProxyType):
        return mapping.copy()
    return dict(mapping)


def _digest_of(selection: Mapping[str, Resource]) -> int:
    digest = 0
    for name, resource in selection.items():
        digest ^= version_share(name, resource.version)
    return digest


_WILDCARD_ONLY = frozenset({WILDCARD})


def _names_fingerprint(request: discovery_pb2.DiscoveryRequest) -> bytes:
    """The hash of a request's names as serialized (field 3 entries, in order), as `on_message`
    takes it from the bytes received: the request is stripped of its other fields and serialized."""
    for field_descriptor in request.DESCRIPTOR.fields:
        if field_descriptor.name != "resource_names":
            request.ClearField(field_descriptor.name)
    return xxhash.xxh3_128_digest(request.SerializeToString())


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """A varint at `position`: its value and the position after it."""
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


# In ADS order, the type whose resources a changed resource of the key type needs again.
_DEPENDENT = {CLUSTER: ENDPOINT, LISTENER: ROUTE}
