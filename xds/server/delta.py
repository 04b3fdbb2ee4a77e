"""The incremental (delta) xDS stream state machine, free of gRPC like its state-of-the-world twin.

The server keeps, per type, the versions it believes the client holds (`known`): seeded from the
first request's `initial_resource_versions` (so a client reconnecting from another replica is sent
only what differs), then updated with every response. A response carries the resources whose
version differs from `known`, and `removed_resources` for names the client holds that are gone.
Which names to compare comes from the publishes' change sets (see `stream`), not from a scan.

Rules kept beyond the shared ones (see `stream`):

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

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import SnapshotLike
from xds.resources import FULL_STATE_TYPES, Resource, encode_len_field
from xds.server.stream import (
    CONTROL_PLANE,
    SHARED,
    WILDCARD,
    StreamBase,
    Subscription,
    TypeStateBase,
    resource_errors,
)


@dataclass(frozen=True, slots=True)
class DeltaResponse:
    type_url: str
    system_version: str
    nonce: str
    resources: tuple[Resource, ...]
    removed: tuple[str, ...]
    # Carries every resource of the type of its snapshot, to a client that held none: its bytes
    # but the nonce are those of every such response, encoded once for every stream.
    complete: bool = False
    # Names newly found missing: reported NOT_FOUND (`stream.resource_errors`).
    missing: tuple[str, ...] = ()

    def encode(self) -> bytes:
        """DeltaDiscoveryResponse bytes, framing the shared serialized resources."""
        if self.complete:
            key = ("delta", self.type_url, self.system_version)
            body = SHARED.body(key, self._body)
        else:
            body = self._body()
        return b"".join(
            (
                body,
                encode_len_field(5, self.nonce.encode()),
                *(encode_len_field(6, name.encode()) for name in self.removed),
                _CONTROL_PLANE_FIELD,
                resource_errors(9, self.type_url, self.missing) if self.missing else b"",
            )
        )

    def _body(self) -> bytes:
        return b"".join(
            (
                encode_len_field(1, self.system_version.encode()),
                *(_entry(r) for r in self.resources),
                encode_len_field(4, self.type_url.encode()),
            )
        )


_CONTROL_PLANE_FIELD = encode_len_field(7, CONTROL_PLANE)  # DeltaDiscoveryResponse.control_plane


def _entry(resource: Resource) -> bytes:
    """A resource framed as a DeltaDiscoveryResponse entry, once for every stream that sends it."""
    key = (resource.type_url, resource.name, resource.version)
    entry = _ENTRIES.get(key)
    if entry is None:
        if len(_ENTRIES) >= _ENTRIES_KEPT:
            _ENTRIES.clear()  # a bound on memory, not a policy: entries are framed again on demand
        # envoy.service.discovery.v3.Resource: version 1, resource 2, name 3; in field 2.
        entry = _ENTRIES[key] = encode_len_field(
            2,
            encode_len_field(1, resource.version.encode())
            + encode_len_field(2, resource.any_bytes)
            + encode_len_field(3, resource.name.encode()),
        )
    return entry


_ENTRIES: dict[tuple[str, str, str], bytes] = {}
_ENTRIES_KEPT = 50_000


@dataclass
class DeltaTypeState(TypeStateBase):
    """What the client holds, as far as the server knows, is either `synced`, a snapshot's own
    mapping of the type (the client holds exactly its resources: a fleet in step shares one), or
    `known`, name -> version, kept for a client that differs from every snapshot."""

    known: dict[str, str] = field(default_factory=dict)
    synced: Mapping[str, Resource] | None = None
    legacy_wildcard: bool = False
    answered: bool = False
    # name -> the version the client held before the response in flight (None: none), for the
    # names it changes: what a NACK restores. No copy of everything the client holds is kept.
    undo: dict[str, str | None] = field(default_factory=dict)
    # The names asked for by name last reported NOT_FOUND: each is reported once while missing.
    not_found: frozenset[str] = frozenset()

    def held(self, name: str) -> str | None:
        """The version the client holds under a name, None if it holds none."""
        if self.synced is not None:
            resource = self.synced.get(name)
            return None if resource is None else resource.version
        return self.known.get(name)

    def held_names(self) -> Collection[str]:
        return self.synced.keys() if self.synced is not None else self.known.keys()

    def held_versions(self) -> dict[str, str]:
        if self.synced is not None:
            return {name: resource.version for name, resource in self.synced.items()}
        return dict(self.known)

    def _materialize(self) -> dict[str, str]:
        """`known` holding every version, for a change that leaves the client out of step."""
        if self.synced is not None:
            self.known, self.synced = self.held_versions(), None
        return self.known

    def apply(self, request: discovery_pb2.DeltaDiscoveryRequest, first: bool) -> None:
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if first:
            self.known = dict(request.initial_resource_versions)
            self.legacy_wildcard = not subscribe and self.type_url in FULL_STATE_TYPES
        elif not subscribe and not unsubscribe:
            return  # an ACK: nothing to apply, whatever the number of names subscribed
        elif subscribe:
            self.legacy_wildcard = False
        names = frozenset((self.sub.names | subscribe) - unsubscribe)
        wildcard = self.legacy_wildcard or WILDCARD in names
        if first or wildcard != self.sub.wildcard:
            self.pending = None
        elif self.pending is not None:
            self.pending |= (subscribe | unsubscribe) - {WILDCARD}
        if self.sub.wildcard and not wildcard:
            # No longer subscribed to everything: the names outside the subscription leave the
            # client's concern as if unsubscribed. Kept, they would go stale unseen (changes are
            # noted for subscribed names only) while still counting as held, so the stream could
            # take itself for in step with the snapshot, and a later wildcard would never send
            # them (found by tests/unit/test_fuzz_streams.py).
            known = self._materialize()
            for name in [name for name in known if name not in names]:
                del known[name]
        if names != self.sub.names or wildcard != self.sub.wildcard:
            self.sub = Subscription(names, wildcard)
        if not wildcard and unsubscribe:
            known = self._materialize()
            for name in unsubscribe:
                known.pop(name, None)


class DeltaStream(StreamBase[DeltaTypeState, discovery_pb2.DeltaDiscoveryRequest, DeltaResponse]):
    """One incremental stream (delta ADS or one type)."""

    def on_message(self, raw: bytes, snapshot: SnapshotLike) -> list[DeltaResponse]:
        return self.on_request(discovery_pb2.DeltaDiscoveryRequest.FromString(raw), snapshot)

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest, snapshot: SnapshotLike
    ) -> list[DeltaResponse]:
        if not self._accept(request):
            return self._unknown_type(request)
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

    def _due(self, state: DeltaTypeState) -> bool:
        return not state.answered or super()._due(state)

    def _empty_response(self, type_url: str, nonce: str) -> DeltaResponse:
        return DeltaResponse(type_url, "", nonce, (), ())

    def _removable(
        self, state: DeltaTypeState, name: str, available: Mapping[str, Resource]
    ) -> bool:
        # Gone from the snapshot; a name the client unsubscribed from is not "removed".
        return name not in available and state.sub.covers(name)

    def _response_for(self, state: DeltaTypeState, snapshot: SnapshotLike) -> DeltaResponse | None:
        plan, removed = self._look(state, snapshot)
        missing = state.missing(snapshot)
        news = tuple(name for name in missing if name not in state.not_found)
        state.not_found = frozenset(missing)
        if not plan.changes and not removed and not news and state.answered:
            return None
        state.answered = True
        changed = tuple(plan.changes.values())
        complete = False
        state.undo = {name: state.held(name) for name in (*plan.changes, *removed)}
        available = state.available(snapshot)
        held_before = len(state.known) if state.synced is None else len(state.synced)
        held_after = held_before
        held_after += sum(1 for name, previous in state.undo.items() if previous is None)
        held_after -= len(removed)
        if self._in_step(state, plan, held_after, available, snapshot):
            state.synced, state.known = available, {}
            if not held_before and not removed:
                # The client held nothing and now holds the whole type: one encoding for all.
                version = snapshot.version(state.type_url)
                changed = SHARED.resources(state.type_url, version, available)
                complete = True
        else:
            known = state._materialize()
            for resource in changed:
                known[resource.name] = resource.version
            for name in removed:
                del known[name]
        state.resources_sent += len(changed)
        nonce = self._send(
            state,
            snapshot.version(state.type_url),
            {name: r.version for name, r in plan.changes.items()},
        )
        return DeltaResponse(
            state.type_url,
            snapshot.version(state.type_url),
            nonce,
            changed,
            tuple(removed),
            complete,
            news,
        )

    def _has_update(self, state: DeltaTypeState, snapshot: SnapshotLike) -> bool:
        return self._due(state) and bool(self._plan(state, snapshot))

    def _accepted(self, state: DeltaTypeState) -> None:
        state.undo = {}

    def _rejected(self, state: DeltaTypeState) -> None:
        # The client kept what it had: its versions are restored, and what the rejected response
        # carried is looked at again.
        known = state._materialize()
        for name, version in state.undo.items():
            if version is None:
                known.pop(name, None)
            else:
                known[name] = version
            if state.pending is not None:
                state.pending.add(name)
        state.undo = {}
