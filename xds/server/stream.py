"""What both xDS stream variants (state-of-the-world in `sotw`, incremental in `delta`) share: the
client's identity, its per-type state (subscription, the response in flight, rejections), ACK and
NACK bookkeeping, the order in which types are answered, and the introspection behind /debug/syncz.

Streams are free of gRPC so that they can be tested alone. They are fed two kinds of input, the
client's requests and the cache's publishes, and return the responses to send, in order.

**Work proportional to what changed.** Each type remembers the names that changed since it was last
looked at (`TypeStateBase.pending`: only names it subscribes to), fed by the change set of every
publish (`note`), and by subscription changes (the names added and dropped). A look at a type
examines those names only; it examines everything only when that is unknown: the first request of
a type, a switch to or from wildcard, a stream further behind than the cache's change sets, a SotW
NACK. So a change to one endpoint costs a stream subscribed to 1,000 one comparison, not 1,000.

Rules both variants keep (from the xDS protocol documentation):

- A response is acknowledged by a request carrying its nonce; `error_detail` makes it a NACK. A NACK
  is recorded with the client's message, and the rejected version is not sent again.
- At most one un-acknowledged response per type: what changes meanwhile is merged into the next one.
- Envoy rejects a whole response when one resource in it is invalid. After such a NACK the changes
  of that response are retried one per response; a version rejected alone is quarantined (the
  client keeps its accepted version of that resource) and everything else is delivered.
- Make-before-break: types go out in the order CDS, EDS, LDS, RDS, and clusters that disappear are
  kept until the listeners and routes that may still use them have settled.
- Endpoints are asked for by a cluster the client is warming, and Envoy holds its CDS ACK until
  they come: a subscribed name the snapshot lacks is answered with an empty assignment.
- Any other name asked for by name that the snapshot lacks is reported with a ResourceError
  NOT_FOUND (xRFC TP3, gRFC A88) in the response's `resource_errors`: gRPC clients that read it
  fail at once instead of waiting out their 15 s does-not-exist timer. Clients that do not know
  the field skip it, as protobuf parsers skip any field they do not know; nothing else changes.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypedDict, TypeVar

from xds._pb.envoy.config.core.v3 import base_pb2
from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Changes, SnapshotLike
from xds.localities import Locality
from xds.resources import (
    ADS_ORDER,
    API_LISTENER,
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Resource,
    encode_len_field,
    encode_varint,
    short_name,
)

log = logging.getLogger(__name__)

WILDCARD = "*"
CONTROL_PLANE_ID = "xds-control-plane"
# A serialized ControlPlane{identifier (field 1)}, sent in every response of both variants.
CONTROL_PLANE = encode_len_field(1, CONTROL_PLANE_ID.encode())
NO_NAMES: frozenset[str] = frozenset()
# How much of a type URL this stream does not serve goes into the log (the client chose its size).
UNKNOWN_TYPE_LOGGED = 200
# The longest node id and node cluster accepted (characters). Both are kept for the life of the
# stream and shown in /debug/syncz, logs and traces: unbounded, 6 streams with a 60 MB cluster
# took 750 MB. Real ids are far shorter: a Kubernetes pod name and namespace are at most 253 + 63
# characters, Istio's `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` about 400. A longer one
# is refused (INVALID_ARGUMENT, which Envoy logs), not cut: a cut id could pass for another proxy.
MAX_NODE_FIELD = 1024
# How much of a NACK's message is kept (/debug/syncz) and logged: Envoy's run to a few hundred
# characters per rejected resource, and only the client bounds them.
MAX_NACK_MESSAGE = 4096
# google.rpc.Code NOT_FOUND, the status of a ResourceError for a name the snapshot lacks.
NOT_FOUND = 5


def resource_errors(field_number: int, type_url: str, names: Iterable[str]) -> bytes:
    """`resource_errors` entries (DiscoveryResponse field 7, DeltaDiscoveryResponse field 9), one
    ResourceError{resource_name: ResourceName{name}, error_detail: Status{code, message}} per
    name the client asked for and the snapshot lacks."""
    out = []
    for name in names:
        message = _not_found(type_url, name)
        status = b"\x08" + encode_varint(NOT_FOUND) + encode_len_field(2, message)
        error = encode_len_field(1, encode_len_field(1, name.encode())) + encode_len_field(
            2, status
        )
        out.append(encode_len_field(field_number, error))
    return b"".join(out)


def _not_found(type_url: str, name: str) -> bytes:
    shown = repr(bounded(name, 200))
    if type_url == LISTENER:
        return (
            f"Listener {shown} does not exist: no Service port of this control plane is named "
            "by it (a proxyless gRPC target is svc.ns:port, svc.ns.svc:port, "
            "svc.ns.svc.<cluster domain>:port or ClusterIP:port of an HTTP-family port)"
        ).encode()
    return f"{short_name(type_url)} resource {shown} does not exist in this control plane".encode()


class InvalidRequest(ValueError):
    """A request the server refuses to serve (the stream ends with INVALID_ARGUMENT)."""


def bounded(text: str, limit: int) -> str:
    """The text, cut to `limit` characters and saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


# Told of every reply: the type, None for an ACK or the NACK's message, and the seconds since the
# response went out.
ReplyHook = Callable[[str, str | None, float], None]


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
    client: str
    peer: str
    # The namespace whose view the client gets ("" when it names none); None: the whole mesh.
    scope: str | None
    # The node's locality ({"region", "zone"}), by which endpoints are prioritized; None: none.
    locality: dict[str, str] | None
    connected_at: float  # unix time
    types: dict[str, TypeStatus]


@dataclass(slots=True)
class Subscription:
    """The names a client asked for, and whether it asked for everything."""

    names: frozenset[str] = NO_NAMES
    wildcard: bool = False

    def covers(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def among(self, changed: frozenset[str]) -> frozenset[str]:
        """The subscribed names among these (set intersection walks the smaller set)."""
        return changed if self.wildcard else changed & self.names


@dataclass(slots=True)
class InFlight:
    """The response sent and not yet acknowledged."""

    nonce: str
    at: float  # time.monotonic() when it went out
    # name -> version of the changes it carries: what a NACK may be about.
    changes: dict[str, str]


@dataclass(slots=True)
class Rejections:
    """What the client refused, and what is held back because of it."""

    nack: Nack | None = None
    count: int = 0
    # Versions the client rejected alone: never sent again; the name stays at its accepted version.
    quarantine: dict[str, str] = field(default_factory=dict)
    # Versions rejected together with others: sent one per response until each is cleared or
    # quarantined, so one bad resource cannot hold back the rest.
    suspects: dict[str, str] = field(default_factory=dict)

    def holding(self) -> bool:
        return bool(self.quarantine or self.suspects)

    def rejected(self, version: str, message: str, changes: Mapping[str, str]) -> None:
        self.count += 1
        self.nack = Nack(version, message, time.time())
        if len(changes) == 1:
            self.quarantine.update(changes)
            self.suspects.pop(next(iter(changes)), None)
        else:
            self.suspects.update(changes)

    def accepted(self, changes: Iterable[str]) -> None:
        for name in changes:
            self.suspects.pop(name, None)
        self._settle()

    def forget_replaced(self, wanted: Callable[[str], Resource | None]) -> None:
        """A rejected version matters only while it is the one wanted."""
        for held_back in (self.quarantine, self.suspects):
            for name, version in list(held_back.items()):
                current = wanted(name)
                if current is None or current.version != version:
                    del held_back[name]
        self._settle()

    def _settle(self) -> None:
        if self.nack is not None and not self.holding():
            self.nack = None  # everything rejected has been replaced: the NACK is history

    def vet(
        self,
        names: Iterable[str],
        wanted: Callable[[str], Resource | None],
        held: Callable[[str], str | None],
    ) -> tuple[dict[str, Resource], set[str]]:
        """Of these names, the resources to send as changes (sorted by name): those whose wanted
        version the client does not hold (`held`: its version of a name), quarantined versions left
        out, and while some are suspect, only one suspect. Also returns the names held back for
        a later response (the other changes while a suspect goes alone)."""
        changes: dict[str, Resource] = {}
        for name in sorted(names):
            resource = wanted(name)
            if resource is None or held(name) == resource.version:
                continue
            if self.quarantine.get(name) != resource.version:
                changes[name] = resource
        if self.suspects:
            suspect = next(
                (n for n, r in changes.items() if self.suspects.get(n) == r.version), None
            )
            if suspect is not None:
                later = set(changes) - {suspect}
                return {suspect: changes[suspect]}, later
        return changes, set()


@dataclass
class TypeStateBase:
    """What one stream knows of one resource type, in either protocol variant."""

    type_url: str
    sub: Subscription = field(default_factory=Subscription)
    in_flight: InFlight | None = None
    rejections: Rejections = field(default_factory=Rejections)
    last_nonce: str = ""
    sent_version: str | None = None
    acked_version: str = ""
    acks: int = 0
    resources_sent: int = 0
    # Subscribed names changed since this type was last looked at; None: look at everything.
    pending: set[str] | None = None
    # Clusters gone from the snapshot whose removal waits until routing has settled.
    deferred: frozenset[str] = NO_NAMES
    # Endpoint names the client holds as empty assignments (their cluster is not in the snapshot).
    empties: frozenset[str] = NO_NAMES

    @property
    def awaiting_ack(self) -> bool:
        return self.in_flight is not None

    def note(self, changed: frozenset[str] | None) -> None:
        """Remembers what a publish changed among the subscribed names (None: unknown)."""
        if changed is None:
            self.pending = None
        elif self.pending is not None and changed:
            self.pending |= self.sub.among(changed)

    def look_at_everything(self) -> None:
        self.pending = None

    def missing(self, snapshot: SnapshotLike) -> tuple[str, ...]:
        """The names asked for by name that the snapshot lacks (sorted), but endpoints: a missing
        assignment is answered with an empty one (see `wanted`)."""
        if self.type_url == ENDPOINT or not self.sub.names:
            return ()
        available = self.available(snapshot)
        return tuple(sorted(n for n in self.sub.names if n != WILDCARD and n not in available))

    def available(self, snapshot: SnapshotLike) -> Mapping[str, Resource]:
        """The resources of the type a client may be sent: the snapshot's, and for Listeners
        also the API listeners it names (never to a mere wildcard: see `API_LISTENER`)."""
        items = snapshot.of_type(self.type_url)
        if self.type_url != LISTENER or not self.sub.names:
            return items
        return NamedListeners(items, snapshot.of_type(API_LISTENER), self.sub)

    def held(self, name: str) -> str | None:
        """The version the client holds (or will, once the response in flight is ACKed)."""
        raise NotImplementedError

    def held_names(self) -> Collection[str]:
        raise NotImplementedError

    def wanted(self, snapshot: SnapshotLike) -> Callable[[str], Resource | None]:
        """The resource the client should hold under a name, or None if it should hold none.
        Endpoints are asked for by a cluster the client holds, so a subscribed name the snapshot
        lacks (its cluster is gone, or not yet sent) gets an empty ClusterLoadAssignment: Envoy
        holds its CDS ACK, and after a reconnect its CDS request, until a new cluster has warmed,
        and without endpoints it would wait out its fetch timeout while the server waits for that
        ACK to send the cluster's removal."""
        available = self.available(snapshot)
        sub = self.sub
        empty_if_missing = self.type_url == ENDPOINT

        def wanted(name: str) -> Resource | None:
            if not sub.covers(name):
                return None
            resource = available.get(name)
            if resource is None and empty_if_missing and name in sub.names:
                return empty_assignment(name)
            return resource

        return wanted

    def everything(self, snapshot: SnapshotLike, held: Iterable[str]) -> set[str]:
        """Every name a full look examines: the subscribed ones and those the client holds."""
        names = set(held)
        names.update(self.sub.names)
        if self.sub.wildcard:
            names.update(snapshot.of_type(self.type_url))
        names.discard(WILDCARD)
        return names


@dataclass(slots=True)
class Plan:
    """What a look at one type found, before anything is committed."""

    changes: dict[str, Resource]  # to send (sorted by name): the client lacks these versions
    removed: list[str]  # sorted names the client holds and should not
    later: set[str]  # changes held back for a later response (one suspect at a time)
    empties: frozenset[str]  # endpoint names answered with an empty assignment

    def __bool__(self) -> bool:
        return bool(self.changes or self.removed)


S = TypeVar("S", bound=TypeStateBase)
# A variant's request and response: DiscoveryRequest and Response in `sotw`, DeltaDiscoveryRequest
# and DeltaResponse in `delta`.
Q = TypeVar("Q", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
R = TypeVar("R")


class StreamBase(Generic[S, Q, R]):
    """The shared half of a stream; a variant supplies its request handling and its responses."""

    def __init__(
        self,
        peer: str = "",
        types: tuple[str, ...] = ADS_ORDER,
        on_reply: ReplyHook | None = None,
        *,
        max_node_field: int = MAX_NODE_FIELD,
    ) -> None:
        self.peer = peer
        self._on_reply = on_reply
        self.allowed_types = types
        self.node_id = ""
        self.node_cluster = ""
        self.client = ""  # what the client says it is: "envoy 1.40.0", gRPC's user agent
        self.scope: str | None = None  # set by the server from the first request's node
        self.locality: Locality | None = None  # likewise
        self._max_node_field = max_node_field
        self.types: dict[str, S] = {}
        self._nonces = itertools.count(1)
        self.opened_at = time.time()
        # Requests for types this stream does not serve (answered empty, logged once).
        self.unknown_requests = 0

    def on_request(self, request: Q, snapshot: SnapshotLike) -> list[R]:
        raise NotImplementedError

    def on_message(self, raw: bytes, snapshot: SnapshotLike) -> list[R]:
        """Responses to a request as received: serialized (DecodeError if it is not one)."""
        raise NotImplementedError

    def note(self, changes: Changes | None) -> None:
        """Records what publishes changed (None: unknown) for the types this stream serves."""
        for type_url, state in self.types.items():
            if changes is None:
                state.note(None)
            elif type_url == LISTENER and API_LISTENER in changes:
                state.note(changes.get(LISTENER, NO_NAMES) | changes[API_LISTENER])
            else:
                state.note(changes.get(type_url, NO_NAMES))

    def on_snapshot(self, snapshot: SnapshotLike, changes: Changes | None = None) -> list[R]:
        """Responses for a new snapshot. `changes` is what changed since the snapshot this stream
        last saw (None, unknown: everything is looked at); only the types whose subscribed names
        changed are looked at, and only at those names."""
        self.note(changes)
        return self._respond(snapshot)

    def respond(self, snapshot: SnapshotLike) -> list[R]:
        """Responses for every type with something noted to look at."""
        return self._respond(snapshot)

    def _accept(self, request: Q) -> bool:
        """Remembers the node; False for a type this stream does not serve. Raises InvalidRequest
        for a node id or cluster longer than the stream accepts."""
        if request.HasField("node") and not self.node_id:
            # Keep only what identifies the client: the full node (with Envoy's extension list and
            # its metadata) is tens of kilobytes and arrives once per stream; nothing else of it
            # is read, so only these two fields need a bound.
            node = request.node
            for what, value in (("id", node.id), ("cluster", node.cluster)):
                if len(value) > self._max_node_field:
                    raise InvalidRequest(
                        f"node.{what} has {len(value)} characters; "
                        f"at most {self._max_node_field} are accepted"
                    )
            self.node_id = node.id
            self.node_cluster = node.cluster
            self.client = client_of(node)
        if request.type_url not in self.allowed_types:
            self.unknown_requests += 1
            if self.unknown_requests == 1:
                # Once per stream: a client repeating the request must not fill the log.
                log.warning(
                    "stream %s (%s) asked for type %r, which this service does not serve: "
                    "answered with no resources (further such requests are not logged)",
                    self.peer,
                    self.node_id,
                    request.type_url[:UNKNOWN_TYPE_LOGGED],
                )
            return False
        return True

    def _unknown_type(self, request: Q) -> list[R]:
        """The answer to a request for a type this stream does not serve: a response without
        resources to a request that is not a reply (Envoy asking for secrets or runtime over ADS
        stops waiting for them instead of waiting out its initial fetch timeout), nothing to a
        reply to it, so that the client's ACK of that response ends the exchange. Nothing is kept
        of the type: a client naming 20,000 types costs 20,000 small answers and no state."""
        if request.response_nonce:
            return []
        return [self._empty_response(request.type_url, str(next(self._nonces)))]

    def _empty_response(self, type_url: str, nonce: str) -> R:
        raise NotImplementedError

    def _send(self, state: S, version: str, changes: dict[str, str]) -> str:
        """Records a response going out; returns its nonce."""
        state.last_nonce = str(next(self._nonces))
        state.sent_version = version
        state.in_flight = InFlight(state.last_nonce, time.monotonic(), changes)
        return state.last_nonce

    def _record_reply(self, state: S, error_message: str | None, version: str) -> None:
        in_flight, state.in_flight = state.in_flight, None
        if in_flight is None:
            return
        if error_message is not None:
            error_message = bounded(error_message, MAX_NACK_MESSAGE)
        if self._on_reply is not None:
            self._on_reply(state.type_url, error_message, time.monotonic() - in_flight.at)
        changes = in_flight.changes
        if error_message is not None:
            state.rejections.rejected(state.sent_version or "", error_message, changes)
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
            state.rejections.accepted(changes)
            self._accepted(state)

    def _accepted(self, state: S) -> None:
        """The response in flight was ACKed."""

    def _rejected(self, state: S) -> None:
        """The response in flight was NACKed: the client kept what it had accepted."""

    def _due(self, state: S) -> bool:
        """Whether a look at this type may find something to send."""
        return state.pending is None or bool(state.pending) or bool(state.deferred)

    def _respond(self, snapshot: SnapshotLike, only: str | None = None) -> list[R]:
        out: list[R] = []
        for type_url in ADS_ORDER:
            state = self.types.get(type_url)
            if state is None or state.awaiting_ack:
                continue
            # After a request, its own type is looked at, and clusters: a deferred removal may be
            # due after any reply.
            if only is not None and type_url not in (only, CLUSTER):
                continue
            if not self._due(state):
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

    def _plan(self, state: S, snapshot: SnapshotLike) -> Plan:
        """Looks at the names noted since the last look (or at everything, when that is unknown)
        and finds what the client lacks, what it holds and should not, and what must wait."""
        wanted = state.wanted(snapshot)
        held = state.held
        pending = state.pending
        if pending is None:
            look = state.everything(snapshot, state.held_names())
        else:
            look = pending | state.deferred
        changes, later = state.rejections.vet(look, wanted, held)
        available = state.available(snapshot)
        removed = []
        empties = set(state.empties - look) if state.empties else set()
        for name in look:
            want = wanted(name)
            if want is None:
                if held(name) is not None and self._removable(state, name, available):
                    removed.append(name)
            elif name not in available:
                empties.add(name)  # an endpoint name without its cluster: an empty assignment
        return Plan(changes, sorted(removed), later, frozenset(empties))

    def _removable(self, state: S, name: str, available: Mapping[str, Resource]) -> bool:
        """Whether a name the client holds and should not is removed by the next response."""
        return True

    def _look(self, state: S, snapshot: SnapshotLike) -> tuple[Plan, list[str]]:
        """A look at one type, and the removals it may send now (make-before-break: clusters
        stay until the listeners and routes that may use them have settled). Records what is
        left for later looks."""
        if state.rejections.holding():
            state.rejections.forget_replaced(state.wanted(snapshot))
        plan = self._plan(state, snapshot)
        removed, state.deferred = plan.removed, NO_NAMES
        if removed and state.type_url == CLUSTER and self._routing_moves(snapshot):
            removed, state.deferred = [], frozenset(removed)
        state.pending, state.empties = plan.later, plan.empties
        return plan, removed

    @staticmethod
    def _in_step(
        state: S,
        plan: Plan,
        count_after: int,
        available: Mapping[str, Resource],
        snapshot: SnapshotLike,
    ) -> bool:
        """Whether, after this response, the client holds exactly the snapshot's resources of the
        type: nothing held back and the snapshot's number of names. Every name it holds is then at
        the snapshot's version, since a change to a subscribed name is always looked at, so the
        snapshot's own mapping can stand for what it holds (no per-stream copy). A client of
        API listeners never is: it holds what it named, not a snapshot's mapping."""
        return (
            available is snapshot.of_type(state.type_url)
            and not plan.later
            and not state.deferred
            and not plan.empties
            and not state.rejections.quarantine
            and count_after == len(available)
        )

    def _response_for(self, state: S, snapshot: SnapshotLike) -> R | None:
        raise NotImplementedError

    def _has_update(self, state: S, snapshot: SnapshotLike) -> bool:
        raise NotImplementedError

    def subscription(self, type_url: str) -> Subscription | None:
        state = self.types.get(type_url)
        return None if state is None else state.sub

    def describe(self) -> StreamStatus:
        return {
            "node_id": self.node_id,
            "node_cluster": self.node_cluster,
            "client": self.client,
            "peer": self.peer,
            "scope": self.scope,
            "locality": None if self.locality is None else self.locality._asdict(),
            "connected_at": self.opened_at,
            "types": {short_name(url): _describe(s) for url, s in self.types.items()},
        }


# How much of a client's own name and version is kept (its word, shown in `xds status`).
MAX_CLIENT_CHARS = 64


def client_of(node: base_pb2.Node) -> str:
    """A client's name and version, as its node says: Envoy's build version (`envoy 1.40.0`), or
    its user agent version (gRPC's `C-core 58.0.0 Python 1.85.3`)."""
    version = node.user_agent_version
    if not version and node.HasField("user_agent_build_version"):
        build = node.user_agent_build_version.version
        version = f"{build.major_number}.{build.minor_number}.{build.patch}"
    text = " ".join(part for part in (node.user_agent_name, version) if part)
    return bounded(text, MAX_CLIENT_CHARS)


def _describe(state: TypeStateBase) -> TypeStatus:
    nack = state.rejections.nack
    return {
        "wildcard": state.sub.wildcard,
        "subscribed": len(state.sub.names),
        "sent_version": state.sent_version,
        "nonce": state.last_nonce,
        "awaiting_ack": state.awaiting_ack,
        "acked_version": state.acked_version,
        "acks": state.acks,
        "nacks": state.rejections.count,
        "resources_sent": state.resources_sent,
        "last_nack": None
        if nack is None
        else {"version": nack.version, "message": nack.message, "at": nack.at},
        "rejected_resources": dict(sorted(state.rejections.quarantine.items())),
    }


class NamedListeners(Mapping[str, Resource]):
    """The Listeners a client that names some may be sent: the snapshot's, and the API listeners
    among the names it asked for (all of those it may name when it is not a wildcard subscriber,
    only those it named when it is). Read-only and built per look: nothing is copied."""

    def __init__(
        self, listeners: Mapping[str, Resource], api: Mapping[str, Resource], sub: Subscription
    ) -> None:
        self._listeners = listeners
        self._api = api
        self._sub = sub

    def __getitem__(self, name: str) -> Resource:
        found = self._listeners.get(name)
        if found is not None:
            return found
        if self._sub.wildcard and name not in self._sub.names:
            raise KeyError(name)
        return self._api[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._listeners
        if self._sub.wildcard:
            yield from (name for name in self._sub.names if name in self._api)
        else:
            yield from self._api

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SharedEncodings:
    """The latest complete responses, SotW and delta: their resources in order and their bytes
    but the nonce, by (variant, type, version), built by the first stream that sends one and
    reused by the others (a fleet connecting at once is answered with one encoding)."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._resources: OrderedDict[tuple[str, str], tuple[Resource, ...]] = OrderedDict()
        self._bodies: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self.built = 0  # bodies encoded: a measure of the sharing

    def resources(
        self, type_url: str, version: str, selection: Mapping[str, Resource]
    ) -> tuple[Resource, ...]:
        key = (type_url, version)
        found = self._resources.get(key)
        if found is None:
            found = tuple(selection[name] for name in sorted(selection))
            self._remember(self._resources, key, found)
        return found

    def body(self, key: tuple[str, str, str], build: Callable[[], bytes]) -> bytes:
        found = self._bodies.get(key)
        if found is None:
            self.built += 1
            found = build()
            self._remember(self._bodies, key, found)
        return found

    def _remember(self, memo: OrderedDict[_K, _V], key: _K, value: _V) -> None:
        memo[key] = value
        if len(memo) > self._size:
            memo.popitem(last=False)


_K = TypeVar("_K")
_V = TypeVar("_V")
SHARED = SharedEncodings()


def empty_assignment(name: str) -> Resource:
    """ClusterLoadAssignment{cluster_name (field 1)}: a cluster with no endpoints. Built once per
    name: a look asks for it twice (vetting, then planning), and every stream that still names a
    removed cluster asks for the same one."""
    resource = _EMPTIES.get(name)
    if resource is None:
        if len(_EMPTIES) >= _EMPTIES_KEPT:
            _EMPTIES.clear()  # a bound on memory, not a policy: rebuilt on demand
        resource = Resource.from_bytes(ENDPOINT, name, encode_len_field(1, name.encode()))
        _EMPTIES[name] = resource
    return resource


_EMPTIES: dict[str, Resource] = {}
_EMPTIES_KEPT = 100_000
