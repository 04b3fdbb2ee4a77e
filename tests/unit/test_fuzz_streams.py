"""Hypothesis-driven sequences of requests and publishes against both stream state machines,
without gRPC, driven as `DiscoveryServer.serve` drives them (note what was published, then the
request or the push). Requests mix every field a client controls: type URLs known and not,
names (the wildcard, empty and odd ones), nonces and versions current, old and made up, NACKs,
nodes over the size limit, bytes that are no request, and bytes that end like an ACK.

After every step: no exception but the two a client may cause (DecodeError, InvalidRequest, both
ending the stream); every response encodes to a message that parses; at most one response per
type in flight (a response goes out only when none was, or the request of the step answered it);
a recorded ACK answered the response in flight with its nonce (and in SotW its version), and the
version a type says is ACKed was sent. At the end, a client that ACKs everything it is sent, with
a subscription stated afresh, holds exactly what the latest snapshot has for it.

Bounded and deterministic: a fixed number of examples, derandomized (the same sequences on every
run), no deadline (a loaded CI machine is slow, not wrong).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Cache
from xds.resources import CLUSTER, ENDPOINT, FULL_STATE_TYPES, LISTENER, ROUTE, Resource
from xds.server.delta import DeltaResponse, DeltaStream
from xds.server.sotw import Response, SotwStream
from xds.server.stream import InvalidRequest, empty_assignment

TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
UNKNOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
NAMES = ("a", "b", "c", "d")
ODD_NAMES = ("*", "", "ns/ü:80", "x" * 300)
MAX_NODE = 8  # the streams' node limit here, so that nodes over it are drawn often

FUZZ = settings(
    max_examples=1000,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

Stream = SotwStream | DeltaStream
AnyResponse = Response | DeltaResponse

# --- what a step is ---------------------------------------------------------------------------

bodies = st.dictionaries(st.sampled_from(NAMES), st.integers(0, 3), max_size=len(NAMES))
publish = st.tuples(st.just("publish"), st.fixed_dictionaries({t: bodies for t in TYPES}))
push = st.tuples(st.just("push"))
request = st.tuples(
    st.just("request"),
    st.sampled_from((*TYPES, *TYPES, UNKNOWN, "")),  # known types drawn more often
    st.lists(st.sampled_from(NAMES + ODD_NAMES), max_size=5),
    st.lists(st.sampled_from(NAMES + ODD_NAMES), max_size=3),  # delta: unsubscribe
    st.sampled_from(("", "sent", "old", "bogus")),  # version
    st.sampled_from(("", "latest", "latest", "old", "bogus")),  # nonce
    st.one_of(st.none(), st.text(max_size=20)),  # error_detail
    st.one_of(st.none(), st.text(max_size=MAX_NODE + 2)),  # node id
    st.booleans(),  # as bytes (on_message) rather than parsed (on_request)
)
garbage = st.tuples(
    st.just("garbage"), st.binary(max_size=40), st.one_of(st.none(), st.sampled_from(TYPES))
)
steps = st.lists(st.one_of(publish, push, request, request, request, garbage), max_size=30)
final_names = st.fixed_dictionaries(
    {t: st.sets(st.sampled_from(NAMES), min_size=1) for t in (ENDPOINT, ROUTE)}
)
final_bodies = st.fixed_dictionaries({t: bodies for t in TYPES})


def build(generation: Mapping[str, Mapping[str, int]], salt: bytes = b"") -> dict[str, Any]:
    return {
        t: {n: Resource.from_bytes(t, n, salt + b"%s-%d" % (n.encode(), g)) for n, g in by.items()}
        for t, by in generation.items()
    }


# --- the client side: what it holds, what it was sent ---------------------------------------


@dataclass
class TypeView:
    held: dict[str, str] = field(default_factory=dict)  # name -> version the client applied
    # Delta: what the client asked for, as a delta client tracks it (Envoy keeps only the
    # resources it is subscribed to, and drops a name when it unsubscribes from it).
    interest: set[str] | None = None  # None: no request of the type yet
    legacy_wildcard: bool = False

    def wildcard(self) -> bool:
        return self.legacy_wildcard or "*" in (self.interest or ())

    def subscribe(self, type_url: str, subscribe: list[str], unsubscribe: list[str]) -> None:
        if self.interest is None:
            self.interest = set()
            self.legacy_wildcard = not subscribe and type_url in FULL_STATE_TYPES
        elif subscribe:
            self.legacy_wildcard = False
        was_wildcard = self.wildcard()
        self.interest = (self.interest | set(subscribe)) - set(unsubscribe)
        if not self.wildcard():
            dropped = set(self.held) - self.interest if was_wildcard else set(unsubscribe)
            for name in dropped:
                self.held.pop(name, None)

    in_flight: AnyResponse | None = None  # the last response received, not yet answered
    sent_versions: list[str] = field(default_factory=list)
    nonces: list[str] = field(default_factory=list)


@dataclass
class Driver:
    """One stream, its cache and its client's view, stepped as the server steps a stream."""

    delta: bool
    cache: Cache = field(default_factory=Cache)
    views: dict[str, TypeView] = field(default_factory=lambda: {t: TypeView() for t in TYPES})
    seen: int = 0
    ended: bool = False  # the server would have closed the stream

    def __post_init__(self) -> None:
        make: Callable[..., Stream] = DeltaStream if self.delta else SotwStream
        self.stream = make(max_node_field=MAX_NODE)
        self.cache.publish(build({t: {n: 0 for n in NAMES[:2]} for t in TYPES}))
        self.seen = self.cache.published

    def look(self, feed: Callable[[], list[AnyResponse]] | None) -> list[AnyResponse]:
        """As `DiscoveryServer.serve`'s look: note what was published, then the request (or the
        push), and the responses it returns."""
        changes = self.cache.changes_since(self.seen)
        self.seen = self.cache.published
        self.stream.note(changes)
        responses = [] if feed is None else feed()
        if feed is None or changes is None:
            responses += self.stream.respond(self.cache.snapshot)
        return responses

    def in_flight(self) -> dict[str, str | None]:
        return {
            t: (None if s.in_flight is None else s.in_flight.nonce)
            for t, s in self.stream.types.items()
        }

    def step(
        self,
        feed: Callable[[], list[AnyResponse]] | None,
        answered: tuple[str, str, str | None, str] | None = None,
    ) -> list[AnyResponse]:
        """One step, with the invariants checked around it. `answered`: the (type, nonce, error,
        version) of the request fed, if any."""
        before = self.in_flight()
        counts = {t: (s.acks, s.rejections.count) for t, s in self.stream.types.items()}
        try:
            responses = self.look(feed)
        except (DecodeError, InvalidRequest):
            self.ended = True  # the server ends the stream: nothing more to check on it
            return []
        per_type: dict[str, int] = {}
        for response in responses:
            per_type[response.type_url] = per_type.get(response.type_url, 0) + 1
            self.check_encoding(response)
        for type_url, state in self.stream.types.items():
            acks, nacks = counts.get(type_url, (0, 0))
            replied = state.acks - acks + state.rejections.count - nacks
            assert replied <= 1
            view = self.views[type_url]
            if replied:
                # Only a reply to the response in flight, by its nonce, is taken as one.
                assert answered is not None and answered[0] == type_url
                _, nonce, error, version = answered
                assert before.get(type_url) == nonce and view.in_flight is not None
                assert view.in_flight.nonce == nonce
                if state.acks > acks:
                    assert error is None
                    if not self.delta:
                        assert version == view.in_flight.version  # an ACK of what was sent
                    self.apply(type_url, view.in_flight)
                view.in_flight = None
            # At most one response in flight per type: one per step, and only once the one
            # before it was answered.
            sent = per_type.get(type_url, 0)
            assert sent <= 1
            if sent:
                assert before.get(type_url) is None or replied
            assert state.acked_version in ("", *view.sent_versions)
        for response in responses:
            if response.type_url not in self.stream.types:
                assert not response.resources  # a type it does not serve: answered empty
                continue
            view = self.views[response.type_url]
            view.in_flight = response
            view.sent_versions.append(
                response.version if isinstance(response, Response) else response.system_version
            )
            view.nonces.append(response.nonce)
            state = self.stream.types[response.type_url]
            assert state.in_flight is not None and state.in_flight.nonce == response.nonce
        self.stream.describe()  # /debug/syncz reads every stream at any time
        return responses

    def check_encoding(self, response: AnyResponse) -> None:
        data = response.encode()
        if isinstance(response, Response):
            sotw = discovery_pb2.DiscoveryResponse.FromString(data)
            assert (sotw.type_url, sotw.nonce) == (response.type_url, response.nonce)
            assert len(sotw.resources) == len(response.resources)
        else:
            delta = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
            assert (delta.type_url, delta.nonce) == (response.type_url, response.nonce)
            assert [r.name for r in delta.resources] == [r.name for r in response.resources]
            assert list(delta.removed_resources) == list(response.removed)

    def apply(self, type_url: str, response: AnyResponse) -> None:
        """What the client holds once it accepts a response."""
        view = self.views[type_url]
        held = view.held
        if isinstance(response, DeltaResponse):
            for name in response.removed:
                held.pop(name, None)
            for resource in response.resources:
                if view.wildcard() or resource.name in (view.interest or ()):
                    held[resource.name] = resource.version
        elif type_url in FULL_STATE_TYPES:
            held.clear()
            held.update({r.name: r.version for r in response.resources})
        else:  # SotW endpoints and routes: what a response leaves out is kept
            held.update({r.name: r.version for r in response.resources})

    # --- requests -----------------------------------------------------------------------------

    def request(
        self,
        type_url: str,
        names: list[str],
        unsubscribe: list[str],
        version: str,
        nonce: str,
        error: str | None,
        node_id: str | None,
        raw: bool,
    ) -> None:
        view = self.views.get(type_url, TypeView())
        version = {
            "": "",
            "sent": view.sent_versions[-1] if view.sent_versions else "",
            "old": view.sent_versions[0] if view.sent_versions else "",
            "bogus": "v-never-sent",
        }[version]
        nonce = {
            "": "",
            "latest": view.nonces[-1] if view.nonces else "",
            "old": view.nonces[0] if view.nonces else "",
            "bogus": "9999",
        }[nonce]
        message: Any
        if self.delta:
            message = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=names,
                resource_names_unsubscribe=unsubscribe,
                response_nonce=nonce,
            )
        else:
            message = discovery_pb2.DiscoveryRequest(
                type_url=type_url, resource_names=names, version_info=version, response_nonce=nonce
            )
        if error is not None:
            message.error_detail.message = error
        if node_id is not None:
            message.node.id = node_id
        snapshot = self.cache.snapshot
        stream: Any = self.stream
        if (
            self.delta
            and type_url in self.views
            and not (node_id is not None and len(node_id) > MAX_NODE and not self.stream.node_id)
        ):
            view.subscribe(type_url, names, unsubscribe)  # as the client sends it
        if raw:
            data = message.SerializeToString()
            self.step(lambda: stream.on_message(data, snapshot), (type_url, nonce, error, version))
        else:
            self.step(
                lambda: stream.on_request(message, snapshot), (type_url, nonce, error, version)
            )

    def garbage(self, data: bytes, tail_of: str | None) -> None:
        state = self.stream.types.get(tail_of or "")
        if state is not None and not self.delta:
            data += state.ack_tail  # bytes that end as an ACK of the latest response would
        snapshot = self.cache.snapshot
        self.step(lambda: self.stream.on_message(data, snapshot))

    # --- convergence --------------------------------------------------------------------------

    def converge(self, generation: Mapping[str, Mapping[str, int]], wanted: dict[str, set[str]]):
        """Publishes a snapshot in which every resource has a new version (so no rejected version
        is the wanted one any more), states each type's subscription afresh (clusters and
        listeners: everything; endpoints and routes: `wanted`) and ACKs every response until
        nothing more comes. Returns what the client should hold, by type."""
        self.cache.publish(build(generation, salt=b"final-"))
        for type_url in TYPES:
            self.answer_all()
            names = sorted(wanted.get(type_url, {"*"}))
            view = self.views[type_url]
            # The subscription stated afresh, as a request answering the response in flight if
            # there is one (a request with another nonce would be stale).
            nonce = view.in_flight.nonce if view.in_flight is not None else ""
            message: Any
            if self.delta:
                others = sorted({*NAMES, *ODD_NAMES} - set(names))
                message = discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=names,
                    resource_names_unsubscribe=others,
                    response_nonce=nonce,
                )
            else:
                version = view.in_flight.version if isinstance(view.in_flight, Response) else ""
                message = discovery_pb2.DiscoveryRequest(
                    type_url=type_url, resource_names=names, version_info=version,
                    response_nonce=nonce,
                )  # fmt: skip
            snapshot = self.cache.snapshot
            if self.delta:
                view.subscribe(type_url, names, others)
            self.step(
                lambda m=message, s=snapshot: self.stream.on_request(m, s),
                (type_url, nonce, None, ""),
            )
            if view.in_flight is not None and view.in_flight.nonce == nonce and nonce:
                view.in_flight = None  # answered by this request (and applied, if an ACK)
        self.answer_all()
        return self.expected(wanted)

    def answer_all(self) -> None:
        """ACKs every response in flight, and what those ACKs bring, until nothing comes."""
        for _ in range(100):
            pending = [(t, v.in_flight) for t, v in self.views.items() if v.in_flight is not None]
            if not pending:
                if not self.step(None):  # a push: anything left to send (a deferred removal)
                    return
                continue
            for type_url, response in pending:
                snapshot = self.cache.snapshot
                if isinstance(response, DeltaResponse):
                    ack: Any = discovery_pb2.DeltaDiscoveryRequest(
                        type_url=type_url, response_nonce=response.nonce
                    )
                    version = ""
                else:
                    assert response is not None
                    version = response.version
                    ack = discovery_pb2.DiscoveryRequest(
                        type_url=type_url,
                        version_info=version,
                        response_nonce=response.nonce,
                        resource_names=sorted(self.stream.types[type_url].sub.names),
                    )
                    if self.stream.types[type_url].sub.wildcard:
                        ack.resource_names.append("*")
                self.step(
                    lambda a=ack, s=snapshot: self.stream.on_request(a, s),
                    (type_url, response.nonce, None, version),
                )
        raise AssertionError("the exchange did not settle in 100 rounds")

    def expected(self, wanted: dict[str, set[str]]) -> dict[str, dict[str, str]]:
        snapshot = self.cache.snapshot
        out: dict[str, dict[str, str]] = {}
        for type_url in TYPES:
            available = snapshot.of_type(type_url)
            names = wanted.get(type_url, set(available))
            out[type_url] = {}
            for name in names:
                resource = available.get(name)
                if resource is None and type_url == ENDPOINT:
                    resource = empty_assignment(name)  # a cluster's endpoints are never withheld
                if resource is None:
                    continue
                if self.stream.types[type_url].rejections.quarantine.get(name) == resource.version:
                    continue  # the client rejected exactly this version: held back on purpose
                out[type_url][name] = resource.version
        return out


def run(delta: bool, sequence: list[tuple[Any, ...]], final: Any, wanted: Any) -> None:
    driver = Driver(delta)
    for step in sequence:
        if step[0] == "publish":
            driver.cache.publish(build(step[1]))
        elif step[0] == "push":
            driver.step(None)
        elif step[0] == "request":
            driver.request(*step[1:])
        else:
            driver.garbage(*step[1:])
        if driver.ended:
            return
    expected = driver.converge(final, wanted)
    for type_url in TYPES:
        held = driver.views[type_url].held
        if type_url in wanted:
            compared = wanted[type_url]
            if not driver.delta and type_url == ROUTE:
                # A state-of-the-world response cannot say that a route configuration asked for
                # by name is gone: the client keeps what it had, which is not compared.
                compared = compared & set(driver.cache.snapshot.of_type(ROUTE))
            held = {n: v for n, v in held.items() if n in compared}
        assert held == expected[type_url], type_url
        assert not driver.stream.types[type_url].awaiting_ack


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
@FUZZ
@given(sequence=steps, final=final_bodies, wanted=final_names)
def test_any_request_sequence_keeps_the_invariants_and_an_acking_client_converges(
    delta: bool, sequence: list[tuple[Any, ...]], final: Any, wanted: Any
) -> None:
    run(delta, sequence, final, wanted)
