"""Publishes carry what they changed, and streams look only at that: the cache's change sets, and
many streams with mixed subscriptions converging to the exact snapshot through random changes,
some of them lagging behind (no gRPC here: the state machines are driven by hand)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from google.rpc import status_pb2

from xds._pb.envoy.config.core.v3 import base_pb2 as core_pb2
from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import CHANGES_KEPT, Cache, Changes, SnapshotLike
from xds.resources import (
    CLUSTER,
    ENDPOINT,
    FULL_STATE_TYPES,
    LISTENER,
    ROUTE,
    Resource,
    type_version,
)
from xds.server import sotw
from xds.server.delta import DeltaResponse, DeltaStream
from xds.server.index import SubscriptionIndex
from xds.server.sotw import SHARED, Response, SotwStream

TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
NAMES = {t: [f"{t.rsplit('.', 1)[-1]}-{i}" for i in range(40)] for t in TYPES}


def build(bodies: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, Resource]]:
    return {
        t: {n: Resource.from_bytes(t, n, body) for n, body in items.items()}
        for t, items in bodies.items()
    }


def test_a_publish_records_the_names_it_added_changed_and_removed():
    cache = Cache()
    cache.publish(build({CLUSTER: {"a": b"1", "b": b"1"}, ENDPOINT: {"a": b"1"}}))
    first = cache.published
    cache.publish(build({CLUSTER: {"a": b"2", "c": b"1"}, ENDPOINT: {"a": b"1"}}))
    assert cache.changes_since(first) == {CLUSTER: frozenset({"a", "b", "c"})}
    assert cache.changes_since(cache.published) == {}
    cache.publish(build({CLUSTER: {"a": b"2", "c": b"1"}, ENDPOINT: {"a": b"9"}}))
    # Across several publishes: the union.
    assert cache.changes_since(first) == {
        CLUSTER: frozenset({"a", "b", "c"}),
        ENDPOINT: frozenset({"a"}),
    }
    for i in range(CHANGES_KEPT):
        cache.publish(build({CLUSTER: {"a": str(i).encode()}}))
    assert cache.changes_since(first) is None  # forgotten: look at everything


def test_a_stream_not_subscribed_to_what_changed_does_no_work():
    cache = Cache()
    cache.publish(build({ENDPOINT: {"a": b"1", "b": b"1"}}))
    stream = SotwStream()
    [first] = stream.on_request(
        discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"]), cache.snapshot
    )
    stream.on_request(
        discovery_pb2.DiscoveryRequest(
            type_url=ENDPOINT, resource_names=["a"], version_info=first.version,
            response_nonce=first.nonce,
        ),
        cache.snapshot,
    )  # fmt: skip
    serial = cache.published
    cache.publish(build({ENDPOINT: {"a": b"1", "b": b"2"}}))
    changes = cache.changes_since(serial)
    assert changes == {ENDPOINT: frozenset({"b"})}
    # Not even looked at: a snapshot it cannot read would raise if it were.
    assert stream.on_snapshot(_Unreadable(), changes) == []


class _Unreadable:
    trace_context = None

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        raise AssertionError("a stream looked at a type it has no change in")

    def version(self, type_url: str) -> str:
        raise AssertionError("a stream looked at a type it has no change in")


@dataclass
class Client:
    """A client as Envoy behaves: it applies responses to what it holds and ACKs them."""

    stream: SotwStream | DeltaStream
    subscribed: dict[str, list[str]]  # type -> names; absent names mean wildcard
    serial: int = 0
    held: dict[str, dict[str, bytes]] = field(default_factory=lambda: {t: {} for t in TYPES})

    def apply(self, response: Response | DeltaResponse) -> None:
        held = self.held[response.type_url]
        if isinstance(response, Response) and response.type_url in FULL_STATE_TYPES:
            held.clear()  # state of the world: the full set
        for name in getattr(response, "removed", ()):
            held.pop(name, None)
        for resource in response.resources:
            held[resource.name] = resource.body

    def request(self, type_url: str, response: Response | DeltaResponse | None = None) -> object:
        names = self.subscribed.get(type_url, [])
        if isinstance(self.stream, SotwStream):
            req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
            if response is not None:
                assert isinstance(response, Response)
                req.version_info, req.response_nonce = response.version, response.nonce
            return req
        delta = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
        if response is None:
            delta.resource_names_subscribe.extend(names)
        else:
            delta.response_nonce = response.nonce
        return delta

    def resubscribe(self, type_url: str, names: list[str]) -> object:
        """The request that changes the subscription of a type to these names."""
        before = set(self.subscribed[type_url])
        self.subscribed[type_url] = names
        for name in before - set(names):
            self.held[type_url].pop(name, None)  # a client forgets what it no longer wants
        if isinstance(self.stream, SotwStream):
            state = self.stream.types[type_url]
            return discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                resource_names=names,
                version_info=state.acked_version,
                response_nonce=state.last_nonce,
            )
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=sorted(set(names) - before),
            resource_names_unsubscribe=sorted(before - set(names)),
        )


def exchange(client: Client, cache: Cache, responses: list) -> None:  # type: ignore[type-arg]
    """Applies and ACKs responses until the stream has nothing more to say."""
    while responses:
        response = responses.pop(0)
        client.apply(response)
        request = client.request(response.type_url, response)
        # As the server does: from the bytes received (a SotW ACK repeating its names is then
        # recognised without parsing them).
        raw = request.SerializeToString()  # type: ignore[attr-defined]
        responses.extend(client.stream.on_message(raw, cache.snapshot))


def expected(client: Client, cache: Cache) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for type_url in TYPES:
        available = cache.snapshot.of_type(type_url)
        names = client.subscribed.get(type_url)
        chosen = available if names is None else {n: available[n] for n in names if n in available}
        out[type_url] = {n: r.body for n, r in chosen.items()}
    return out


def test_two_hundred_streams_converge_to_the_exact_snapshot_through_random_changes():
    rng = random.Random(8)
    bodies = {t: {n: b"0" for n in NAMES[t][:30]} for t in TYPES}
    cache = Cache()
    cache.publish(build(bodies))
    clients: list[Client] = []
    for index in range(200):
        stream: SotwStream | DeltaStream = SotwStream() if index % 2 else DeltaStream()
        # CDS and LDS by wildcard, EDS and RDS by some names (some not existing yet).
        subscribed = {t: rng.sample(NAMES[t], rng.randint(1, 25)) for t in (ENDPOINT, ROUTE)}
        client = Client(stream, subscribed, serial=cache.published)
        for type_url in TYPES:
            responses = stream.on_request(client.request(type_url), cache.snapshot)  # type: ignore[arg-type]
            exchange(client, cache, responses)
        clients.append(client)

    for _ in range(500):
        type_url = rng.choice(TYPES)
        name = rng.choice(NAMES[type_url])
        if rng.random() < 0.15:
            bodies[type_url].pop(name, None)  # removed (or never there)
        else:
            bodies[type_url][name] = str(rng.random()).encode()  # added or changed
        cache.publish(build(bodies))
        for client in clients:
            # Most streams keep up; some lag several publishes, a few more than the cache keeps.
            if rng.random() < 0.3:
                continue
            changes: Changes | None = cache.changes_since(client.serial)
            client.serial = cache.published
            exchange(client, cache, client.stream.on_snapshot(cache.snapshot, changes))
            if rng.random() < 0.02:
                # Now and then a client asks for other endpoints or routes, as the server
                # sees it: what was published is noted first, then the request is answered.
                changed_type = rng.choice((ENDPOINT, ROUTE))
                names = rng.sample(NAMES[changed_type], rng.randint(1, 25))
                request = client.resubscribe(changed_type, names)
                raw = request.SerializeToString()  # type: ignore[attr-defined]
                responses = client.stream.on_message(raw, cache.snapshot)
                exchange(client, cache, responses)

    for client in clients:
        exchange(
            client,
            cache,
            client.stream.on_snapshot(cache.snapshot, cache.changes_since(client.serial)),
        )
        client.serial = cache.published
        want = expected(client, cache)
        for type_url in TYPES:
            held = client.held[type_url]
            if type_url in (ENDPOINT, ROUTE) and isinstance(client.stream, SotwStream):
                # A SotW client keeps endpoints and routes no response removed; endpoints it asks
                # for and that do not exist are empty assignments.
                held = {n: b for n, b in held.items() if n in want[type_url]}
            if type_url == ENDPOINT:
                held = {n: b for n, b in held.items() if n in want[type_url]}
            assert held == want[type_url], (type(client.stream).__name__, type_url)
        if isinstance(client.stream, SotwStream):
            for type_url, state in client.stream.types.items():
                # The version a SotW client holds is the content hash of what it holds, however
                # many changes it was updated by one at a time.
                assert state.acked_version == type_version(state.accepted.values()), type_url


class _CountingSnapshot:
    """A snapshot that counts what a stream reads of it, name by name."""

    def __init__(self, snapshot: SnapshotLike) -> None:
        self.snapshot = snapshot
        self.trace_context = None
        self.reads = 0
        self.scans = 0

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return _CountingMapping(self, self.snapshot.of_type(type_url))

    def version(self, type_url: str) -> str:
        return self.snapshot.version(type_url)


class _CountingMapping(Mapping[str, Resource]):
    def __init__(self, owner: _CountingSnapshot, items: Mapping[str, Resource]) -> None:
        self._owner, self._items = owner, items

    def __getitem__(self, name: str) -> Resource:
        self._owner.reads += 1
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        self._owner.reads += 1
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._owner.scans += 1
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@pytest.mark.parametrize("variant", [SotwStream, DeltaStream])
def test_a_change_to_one_of_a_thousand_subscribed_names_reads_only_that_name(
    variant: type[SotwStream] | type[DeltaStream],
) -> None:
    names = [f"ns/svc-{i}:http" for i in range(1000)]
    bodies = {ENDPOINT: {name: b"1" for name in names}}
    cache = Cache()
    cache.publish(build(bodies))
    client = Client(variant(), {ENDPOINT: names}, serial=cache.published)
    first = client.stream.on_request(client.request(ENDPOINT), cache.snapshot)  # type: ignore[arg-type]
    exchange(client, cache, first)
    bodies[ENDPOINT]["ns/svc-500:http"] = b"2"
    cache.publish(build(bodies))
    counting = _CountingSnapshot(cache.snapshot)
    [update] = client.stream.on_snapshot(counting, cache.changes_since(client.serial))
    assert [r.name for r in update.resources] == ["ns/svc-500:http"]
    # A handful of lookups of the changed name, and no walk over the 1,000.
    assert counting.scans == 0 and counting.reads <= 5, (counting.scans, counting.reads)


def test_the_index_wakes_subscribers_of_a_changed_name_and_shares_equal_subscriptions():
    index = SubscriptionIndex()
    a, b = frozenset({"x", "y"}), frozenset({"y", "x"})
    shared = index.subscribe(1, ENDPOINT, a, wildcard=False)
    assert index.subscribe(2, ENDPOINT, b, wildcard=False) is shared  # one set for both
    index.subscribe(3, ENDPOINT, frozenset({"z"}), wildcard=False)
    index.subscribe(4, CLUSTER, frozenset(), wildcard=True)
    assert index.concerned({ENDPOINT: frozenset({"x"})}) == {1, 2}
    assert index.concerned({ENDPOINT: frozenset({"z", "q"})}) == {3}
    assert index.concerned({CLUSTER: frozenset({"anything"})}) == {4}
    assert index.concerned({LISTENER: frozenset({"x"})}) == set()
    # A stream that changes its subscription moves; one that leaves is forgotten.
    index.subscribe(2, ENDPOINT, frozenset({"z"}), wildcard=False)
    assert index.concerned({ENDPOINT: frozenset({"x", "z"})}) == {1, 2, 3}
    index.remove(1, [ENDPOINT])
    assert index.concerned({ENDPOINT: frozenset({"x"})}) == set()


def test_complete_responses_of_one_version_are_encoded_once_for_every_stream():
    cache = Cache()
    cache.publish(build({CLUSTER: {f"c{i}": b"%d" % i for i in range(50)}}))
    built = SHARED.built
    encoded = set()
    for _ in range(100):
        stream = SotwStream()
        [response] = stream.on_request(
            discovery_pb2.DiscoveryRequest(type_url=CLUSTER), cache.snapshot
        )
        assert response.version == cache.snapshot.version(CLUSTER)
        parsed = discovery_pb2.DiscoveryResponse.FromString(response.encode())
        assert len(parsed.resources) == 50 and parsed.nonce == response.nonce
        parsed.nonce = ""
        encoded.add(parsed.SerializeToString())
    assert SHARED.built == built + 1  # one encoding, 100 responses
    assert len(encoded) == 1


def test_complete_delta_responses_of_one_version_are_encoded_once_for_every_stream():
    cache = Cache()
    cache.publish(build({CLUSTER: {f"c{i}": b"%d" % i for i in range(50)}}))
    built = SHARED.built
    encoded = set()
    for _ in range(100):
        stream = DeltaStream()
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER)
        [response] = stream.on_request(request, cache.snapshot)
        parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(response.encode())
        assert [r.name for r in parsed.resources] == [f"c{i}" for i in sorted(range(50), key=str)]
        assert parsed.nonce == response.nonce and parsed.system_version_info
        parsed.nonce = ""
        encoded.add(parsed.SerializeToString())
    assert SHARED.built == built + 1
    assert len(encoded) == 1


def test_an_ack_repeating_its_names_is_recognised_without_parsing_them(monkeypatch):
    names = [f"ns/svc-{i}:http" for i in range(1000)]
    cache = Cache()
    cache.publish(build({ENDPOINT: {name: b"1" for name in names}}))
    stream = SotwStream()
    subscribe = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names)
    [first] = stream.on_message(subscribe.SerializeToString(), cache.snapshot)
    parsed: list[bytes] = []

    class Counting:
        @staticmethod
        def FromString(raw: bytes) -> discovery_pb2.DiscoveryRequest:  # noqa: N802
            parsed.append(raw)
            return discovery_pb2.DiscoveryRequest.FromString(raw)

    monkeypatch.setattr(sotw, "discovery_pb2", SimpleNamespace(DiscoveryRequest=Counting))
    ack = discovery_pb2.DiscoveryRequest(
        version_info=first.version, resource_names=names, type_url=ENDPOINT,
        response_nonce=first.nonce, node=core_pb2.Node(id="sidecar~10.0.0.1"),
    )  # fmt: skip
    assert stream.on_message(ack.SerializeToString(), cache.snapshot) == []
    state = stream.types[ENDPOINT]
    assert parsed == [] and state.acked_version == first.version and not state.awaiting_ack
    # A request whose names differ, or a NACK, is parsed and honoured.
    changed = discovery_pb2.DiscoveryRequest(
        version_info=first.version, resource_names=[*names, "ns/new:http"], type_url=ENDPOINT,
        response_nonce=first.nonce,
    )  # fmt: skip
    [whole] = stream.on_message(changed.SerializeToString(), cache.snapshot)
    assert len(parsed) == 1 and len(whole.resources) == 1001
    nack = discovery_pb2.DiscoveryRequest(
        version_info=first.version, resource_names=[*names, "ns/new:http"], type_url=ENDPOINT,
        response_nonce=whole.nonce, error_detail=status_pb2.Status(message="no"),
    )  # fmt: skip
    assert stream.on_message(nack.SerializeToString(), cache.snapshot) == []
    assert len(parsed) == 2 and state.rejections.nack is not None


def test_an_empty_assignment_is_built_once_per_name_and_its_cache_is_bounded(monkeypatch):
    from xds._pb.envoy.config.endpoint.v3 import endpoint_pb2
    from xds.server import stream as stream_module

    monkeypatch.setattr(stream_module, "_EMPTIES", {})
    monkeypatch.setattr(stream_module, "_EMPTIES_KEPT", 3)
    first = stream_module.empty_assignment("ns/gone:http")
    assert stream_module.empty_assignment("ns/gone:http") is first
    decoded = endpoint_pb2.ClusterLoadAssignment.FromString(first.body)
    assert decoded.cluster_name == "ns/gone:http" and not decoded.endpoints
    for i in range(5):
        stream_module.empty_assignment(f"ns/other-{i}:http")
    assert len(stream_module._EMPTIES) <= 3
    again = stream_module.empty_assignment("ns/gone:http")
    assert again == first  # rebuilt after the bound cleared it: equal content and version
