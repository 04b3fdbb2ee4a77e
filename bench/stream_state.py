"""Stream state benchmark: what the xDS stream state machines cost per stream, without gRPC.

For N streams (SotW and delta) behaving as Envoy at start-up against a snapshot of S clusters, S
endpoint assignments, one listener and one route configuration (clusters and listeners by wildcard,
endpoints and routes by name, every response ACKed), it prints:

- connect: the state machines' time per stream for the initial exchange (requests in, responses
  encoded, ACKs in), and how many response bodies were encoded for the N streams after a first
  one (0: every complete response was shared);
- heap per stream: Python memory the N streams added after the first one (tracemalloc), over N;
- one endpoint change: for C publishes that change one assignment each, the time per stream to
  note the change, respond, encode and take the ACK, and the bytes sent per stream.

The server's gRPC cost is not here (see `bench/fleet.py` for the whole): this isolates the work
that is ours. Resource bodies are opaque bytes of realistic sizes; nothing touches the network.

    python bench/stream_state.py                      # N = 1,000, S = 1,000, C = 20
    python bench/stream_state.py --streams 5000 --services 10000
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Cache, Changes, SnapshotLike
from xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource, encode_len_field
from xds.server.delta import DeltaResponse, DeltaStream
from xds.server.index import SubscriptionIndex
from xds.server.sotw import Response, SotwStream
from xds.server.stream import SHARED

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MAX_CHANGES, bounded, machine  # noqa: E402

Stream: TypeAlias = SotwStream | DeltaStream
AnyResponse: TypeAlias = Response | DeltaResponse
# Names by type for the types Envoy subscribes to by name (endpoints for its clusters, routes for
# its listeners); the other types are wildcard subscriptions.
Wanted = Mapping[str, list[str]]
ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)  # as Envoy asks at start-up


def resources(services: int, generation: dict[str, int]) -> dict[str, dict[str, Resource]]:
    names = [f"ns-{i % 20}/svc-{i}:http" for i in range(services)]
    return {
        CLUSTER: {n: Resource.from_bytes(CLUSTER, n, n.encode() + b"c" * 330) for n in names},
        ENDPOINT: {
            n: Resource.from_bytes(ENDPOINT, n, n.encode() + b"%d" % generation.get(n, 0) * 300)
            for n in names
        },
        LISTENER: {"port:80": Resource.from_bytes(LISTENER, "port:80", b"l" * 600)},
        ROUTE: {"http:80": Resource.from_bytes(ROUTE, "http:80", b"r" * 250 * services)},
    }


# As the server does: equal subscriptions share one set of names (`xds.server.index`).
INDEX = SubscriptionIndex()


@dataclass
class Client:
    stream: Stream
    id: int
    sent_bytes: int = 0

    def on_request(self, request: bytes, cache: Cache) -> list[AnyResponse]:
        responses: list[AnyResponse] = list(self.stream.on_message(request, cache.snapshot))
        for type_url, state in self.stream.types.items():
            sub = state.sub
            sub.names = INDEX.subscribe(self.id, type_url, sub.names, sub.wildcard)
        return responses

    def request(self, type_url: str, names: list[str], answer: AnyResponse | None) -> bytes:
        """The request serialized, as the server receives it (a SotW request repeats every name,
        laid out in field order as Envoy does)."""
        if isinstance(self.stream, SotwStream):
            version = nonce = b""
            if isinstance(answer, Response):
                version = encode_len_field(1, answer.version.encode())
                nonce = encode_len_field(5, answer.nonce.encode())
            return version + _names_template(type_url, tuple(names)) + nonce
        delta = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
        if answer is None:
            delta.resource_names_subscribe.extend(names)
        else:
            delta.response_nonce = answer.nonce
        return delta.SerializeToString()

    def exchange(self, cache: Cache, responses: list[AnyResponse], wanted: Wanted) -> None:
        """Encodes and ACKs until the stream has nothing more to say."""
        while responses:
            response = responses.pop(0)
            self.sent_bytes += len(response.encode())
            names = wanted.get(response.type_url, [])
            request = self.request(response.type_url, names, response)
            responses.extend(self.on_request(request, cache))

    def react(self, cache: Cache, changes: Changes | None, wanted: Wanted) -> None:
        """What the server has a stream do on a publish: note it, respond, take the ACKs."""
        self.exchange(cache, list(self.stream.on_snapshot(cache.snapshot, changes)), wanted)


@functools.cache
def _names_template(type_url: str, names: tuple[str, ...]) -> bytes:
    """Fields 3 (names) and 4 (type) of a DiscoveryRequest."""
    request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
    return request.SerializeToString()


def subscribed(snapshot: SnapshotLike) -> Wanted:
    """What an Envoy holding every cluster and listener of `snapshot` asks for by name."""
    return {type_url: sorted(snapshot.of_type(type_url)) for type_url in (ENDPOINT, ROUTE)}


def connect(client: Client, cache: Cache, wanted: Wanted) -> None:
    for type_url in ORDER:
        first = client.request(type_url, wanted.get(type_url, []), None)
        client.exchange(cache, client.on_request(first, cache), wanted)


def run(variant: Callable[[], Stream], streams: int, services: int, changes: int) -> list[str]:
    generation: dict[str, int] = {}
    cache = Cache()
    cache.publish(resources(services, generation))
    wanted = subscribed(cache.snapshot)
    endpoint_names = wanted[ENDPOINT]
    # One stream first, outside the count: what every stream shares (encodings, the index's set
    # of names) is then in place, and the heap figure is what each further stream adds.
    clients = [Client(variant(), 0)]
    connect(clients[0], cache, wanted)
    gc.collect()
    built = SHARED.built
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    for index in range(1, streams + 1):
        client = Client(variant(), index)
        connect(client, cache, wanted)
        clients.append(client)
    connect_s = time.perf_counter() - started
    gc.collect()
    heap = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    encoded = SHARED.built - built

    for client in clients:
        client.sent_bytes = 0
    serial = cache.published
    timings = []
    for change in range(changes):
        name = endpoint_names[(change * 7919) % len(endpoint_names)]
        generation[name] = generation.get(name, 0) + 1
        cache.publish(resources(services, generation))  # not timed: translation's share
        delta = cache.changes_since(serial)
        serial = cache.published
        started = time.perf_counter()
        for client in clients:
            client.react(cache, delta, wanted)
        timings.append(time.perf_counter() - started)
    per_change = sum(timings) / len(timings)
    for client in clients:
        INDEX.remove(client.id, list(client.stream.types))
    sent = sum(c.sent_bytes for c in clients) / len(clients) / changes
    kind = "SotW" if isinstance(clients[0].stream, SotwStream) else "delta"
    return [
        kind,
        f"{streams:,}",
        f"{services:,}",
        f"{connect_s / streams * 1e3:.2f}",
        f"{encoded:,}",
        f"{heap / streams / 1024:.1f}",
        f"{per_change / len(clients) * 1e6:.1f}",
        f"{per_change * 1e3:.1f}",
        f"{sent:,.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=bounded(1, 50_000), default=1000)
    parser.add_argument("--services", type=bounded(1, 50_000), default=1000)
    parser.add_argument("--changes", type=bounded(1, MAX_CHANGES), default=20)
    args = parser.parse_args()
    print(f"stream state machines, no gRPC; {machine()}")
    header = [
        "variant",
        "streams",
        "services",
        "connect ms/stream",
        "bodies encoded",
        "heap KiB/stream",
        "change us/stream",
        "change ms/all",
        "bytes/stream/change",
    ]
    rows = [
        run(variant, args.streams, args.services, args.changes)
        for variant in (SotwStream, DeltaStream)
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
