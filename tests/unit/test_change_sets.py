"""Publishes carry what they changed, and streams look only at that: the cache's change sets, and
many streams with mixed subscriptions converging to the exact snapshot through random changes,
some of them lagging behind (no gRPC here: the state machines are driven by hand)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import CHANGES_KEPT, Cache, Changes
from xds.resources import CLUSTER, ENDPOINT, FULL_STATE_TYPES, LISTENER, ROUTE, Resource
from xds.server.delta import DeltaResponse, DeltaStream
from xds.server.sotw import Response, SotwStream

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


def exchange(client: Client, cache: Cache, responses: list) -> None:  # type: ignore[type-arg]
    """Applies and ACKs responses until the stream has nothing more to say."""
    while responses:
        response = responses.pop(0)
        client.apply(response)
        request = client.request(response.type_url, response)
        responses.extend(client.stream.on_request(request, cache.snapshot))  # type: ignore[arg-type]


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
