"""The grpc.aio discovery services: the wire around the stream state machine in `protocol`.

Responses are written as bytes the state machine joined from pre-serialized resources, so the
handlers are registered generically with an identity serializer instead of generated stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import resource
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from xds.cache import Cache, Snapshot
from xds.localities import Locality, for_locality
from xds.resources import ADS_ORDER, CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource
from xds.scopes import ScopeIndex
from xds.server.callbacks import Callbacks
from xds.server.delta import DeltaResponse, DeltaStream
from xds.server.index import SubscriptionIndex
from xds.server.sotw import Response, SotwStream
from xds.server.stream import MAX_NODE_FIELD, InvalidRequest, StreamBase, StreamStatus
from xds.server.tracing import TracingCallbacks
from xds.server.views import MESH_WIDE_ADS, Scoping, SnapshotView, Variant, Views
from xds.tls import IdentityGate, first_node

log = logging.getLogger(__name__)

# Where a client is when its node does not say: from its node id, metadata and what its node
# said (a cluster, say), the locality to use (what it said when nothing more is found).
Locate = Callable[[str, Mapping[str, Any], Locality | None], Awaitable[Locality | None]]


# (gRPC service, its state-of-the-world method, its delta method, the types it may carry)
SERVICES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        "StreamAggregatedResources",
        "DeltaAggregatedResources",
        ADS_ORDER,
    ),
    (
        "envoy.service.cluster.v3.ClusterDiscoveryService",
        "StreamClusters",
        "DeltaClusters",
        (CLUSTER,),
    ),
    (
        "envoy.service.endpoint.v3.EndpointDiscoveryService",
        "StreamEndpoints",
        "DeltaEndpoints",
        (ENDPOINT,),
    ),
    (
        "envoy.service.listener.v3.ListenerDiscoveryService",
        "StreamListeners",
        "DeltaListeners",
        (LISTENER,),
    ),
    ("envoy.service.route.v3.RouteDiscoveryService", "StreamRoutes", "DeltaRoutes", (ROUTE,)),
)


# How many streams that have not yet acknowledged every type they asked for are answered at once:
# enough to keep the machine busy while a fleet connects (each answer may be a megabyte), few
# enough that a publish's pushes are not queued behind thousands of them. Measured with
# `bench/fleet.py --streams 1000 --storm 2000`: a change during the storm reached the 1,000 in
# p50 659 ms with 64, 1,024 ms with 16, 1,205 ms without a bound; the storm took 10.9 / 15.5 /
# 11.9 s.
FIRST_CONFIGURATIONS_AT_ONCE = 64


def _settled(stream: StreamBase[Any, Any, Any]) -> bool:
    """Whether the client has acknowledged every type it asked for at least once."""
    return bool(stream.types) and all(state.acks for state in stream.types.values())


def _identity(data: bytes) -> bytes:
    return data


def peer_host(peer: str) -> str:
    """A gRPC peer's address without its port: "ipv4:10.0.0.1:5000" -> "10.0.0.1",
    "ipv6:[::1]:5000" -> "[::1]"; other kinds (unix sockets) as they are."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0]
    return peer


class DiscoveryServer:
    """Serves the cache's snapshots to every stream; knows its streams for /debug/syncz."""

    def __init__(
        self,
        cache: Cache,
        per_type_rewrite: Callable[[Resource, str], Resource] | None = None,
        callbacks: Callbacks | None = None,
        *,
        scoping: Scoping | None = None,
        max_node_field: int = MAX_NODE_FIELD,
        max_streams_per_peer: int | None = None,
        identity: IdentityGate | None = None,
        locate: Locate | None = None,
    ) -> None:
        self.cache = cache
        # Where a client whose node names no zone is (its Kubernetes Node's labels), if known.
        self.locate = locate
        # With mTLS: a stream whose node is not its client certificate's is refused.
        self.identity = identity
        # The longest node id and cluster a stream accepts (see `stream.MAX_NODE_FIELD`).
        self.max_node_field = max_node_field
        # Streams open at once from one client address (None: no limit). gRPC core limits
        # connections in all and streams per connection, not per client; proxies behind one
        # address (a NAT, a node's pods without their own IPs) share this.
        self.max_streams_per_peer = max_streams_per_peer
        self._per_peer: Counter[str] = Counter()
        # Told of every stream, push and reply: metrics and tracing (tracing alone by default).
        self.callbacks = callbacks if callbacks is not None else TracingCallbacks()
        # Clients on per-type streams need clusters and listeners rewritten, and scoped clients
        # see only their scope (see `views`): each variant's view is shared by its clients.
        self.scoping = scoping
        self._per_type_rewrite = per_type_rewrite
        self._scope_index = ScopeIndex(cache.changes_since)
        self._views = Views(self._rewrite, cache.changes_since, self._candidates)
        self._variant_streams: Counter[Variant] = Counter()
        # Either variant: /debug/syncz and the subscription count read only what both have.
        self.streams: dict[int, StreamBase[Any, Any, Any]] = {}
        self._ids = itertools.count(1)
        self._index = SubscriptionIndex()
        # Each stream's wake-up call, set by the dispatcher only when a publish concerns it.
        self._wakers: dict[int, asyncio.Event] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self.wakeups = 0  # streams woken by publishes: a measure of the work a publish causes
        self._first_configurations = asyncio.Semaphore(FIRST_CONFIGURATIONS_AT_ONCE)

    def _rewrite(self, resource: Resource, variant: Variant) -> Resource | None:
        """A resource as the clients of a variant see it: scoped first, then for their API."""
        shown: Resource | None = resource
        if variant.scope is not None and self.scoping is not None:
            shown = self.scoping.rewrite(resource, variant.scope)
        if shown is not None and variant.locality is not None:
            shown = for_locality(shown, variant.locality)
        if shown is not None and variant.api_type is not None and self._per_type_rewrite:
            shown = self._per_type_rewrite(shown, variant.api_type)
        return shown

    def _candidates(
        self, snapshot: Snapshot, serial: int | None, variant: Variant, type_url: str
    ) -> Iterable[str] | None:
        """What a scope's first view looks at: its namespace's and what is exported."""
        if variant.scope is None:
            return None
        return self._scope_index.candidates(snapshot, serial, type_url, variant.scope)

    async def _dispatch(self) -> None:
        """Wakes, after each publish, only the streams subscribed to a name it changed (looked up
        in the subscription index): the other streams cost nothing, however many there are."""
        serial = self.cache.published
        while True:
            _, published = self.cache.watch()
            if self.cache.published == serial:
                await published.wait()
            changes = self.cache.changes_since(serial)
            serial = self.cache.published
            concerned = self._wakers.keys() if changes is None else self._index.concerned(changes)
            for stream_id in concerned:
                waker = self._wakers.get(stream_id)
                if waker is not None:
                    waker.set()
                    self.wakeups += 1

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        handlers = []
        for service, sotw, delta, types in SERVICES:
            ads = types == ADS_ORDER
            handlers.append(
                grpc.method_handlers_generic_handler(
                    service,
                    {
                        sotw: self._handler(SotwStream, types, None if ads else "GRPC"),
                        delta: self._handler(DeltaStream, types, None if ads else "DELTA_GRPC"),
                    },
                )
            )
        return handlers

    def _handler(
        self,
        stream_type: type[SotwStream | DeltaStream],
        types: tuple[str, ...],
        api_type: str | None,
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        async def handle(
            _requests: object, context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> None:
            peer = context.peer()
            host = peer_host(peer)
            limit = self.max_streams_per_peer
            if limit is not None and self._per_peer[host] >= limit:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{limit} streams are open from {host}: no more are accepted",
                )
            self._per_peer[host] += 1
            try:
                await self._open(context, stream_type, types, api_type, peer)
            finally:
                self._per_peer[host] -= 1
                if not self._per_peer[host]:
                    del self._per_peer[host]

        # Requests arrive as bytes: the stream parses them, and a SotW ACK that repeats its
        # names is recognised without parsing them (`SotwStream.on_message`).
        return grpc.stream_stream_rpc_method_handler(
            handle, request_deserializer=_identity, response_serializer=_identity
        )

    async def _open(
        self,
        context: grpc.aio.ServicerContext[bytes, bytes],
        stream_type: type[SotwStream | DeltaStream],
        types: tuple[str, ...],
        api_type: str | None,
        peer: str,
    ) -> None:
        stream_id = next(self._ids)

        def on_reply(type_url: str, error_message: str | None, seconds: float) -> None:
            self.callbacks.replied(stream_id, type_url, error_message, seconds)

        stream = stream_type(
            peer=peer,
            types=types,
            on_reply=on_reply,
            max_node_field=self.max_node_field,
        )
        await self.serve(context, stream, api_type, stream_id)

    async def serve(
        self,
        context: grpc.aio.ServicerContext[bytes, bytes],
        stream: SotwStream | DeltaStream,
        api_type: str | None = None,
        stream_id: int | None = None,
    ) -> None:
        """Feeds one stream its requests and every publish that concerns it until the client goes
        away. `api_type` names a per-type client's API type (GRPC, DELTA_GRPC); None for ADS."""
        # An empty answer before the first snapshot would tell Envoy to drop what it has.
        await self.cache.initialized.wait()
        if stream_id is None:
            stream_id = next(self._ids)
        self.streams[stream_id] = stream
        self.callbacks.stream_opened(stream_id, stream)

        # Known once the first request has named the node: its scope completes the variant.
        variant = Variant(api_type)
        counted = False  # whether `variant` counts this stream among its clients

        def current() -> tuple[Snapshot | SnapshotView, int]:
            # The snapshot and its serial, read together: no await in between.
            snapshot, serial = self.cache.snapshot, self.cache.published
            if variant == MESH_WIDE_ADS:
                return snapshot, serial
            return self._views.view(snapshot, variant, serial), serial

        seen = current()[1]  # the serial of the last publish this stream has noted
        waker = self._wakers[stream_id] = asyncio.Event()
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch())
        # One turn at a time, requests and publishes alike: responses leave in the order they
        # were decided (clusters before their endpoints).
        turn = asyncio.Lock()

        async def look(request: bytes | None) -> None:
            nonlocal seen
            async with turn:
                # Whatever woke the stream, it first notes what was published since it last
                # looked (for a stream the dispatcher left asleep, nothing it subscribes to).
                changes = self.cache.changes_since(seen)
                snapshot, seen = current()
                stream.note(changes)

                def prepare() -> list[tuple[Response | DeltaResponse, bytes]]:
                    responses: list[Response | DeltaResponse] = []
                    if request is not None:
                        responses += stream.on_message(request, snapshot)
                    if request is None or changes is None:
                        # A publish concerns this stream (or what changed is no longer known).
                        responses += stream.respond(snapshot)
                    return [(response, response.encode()) for response in responses]

                if request is not None and len(request) > LARGE_REQUEST_BYTES:
                    # Tens of thousands of names take this stream's turn for a second: taken in
                    # a thread, other streams' turns go on meanwhile (the stream's own state is
                    # behind its turn; what streams share is read-only or built idempotently).
                    prepared = await asyncio.to_thread(prepare)
                else:
                    prepared = prepare()
                if request is not None:
                    self._reindex(stream_id, stream)
                for response, data in prepared:
                    if response.type_url in stream.types:
                        # Not the empty answers to types the stream does not serve: metrics
                        # and traces are labelled by type, and those are the client's choice.
                        self.callbacks.pushed(
                            stream_id, stream, response, len(data), snapshot.trace_context
                        )
                    await context.write(data)

        async def read() -> None:
            nonlocal variant, counted
            first = True
            while True:
                # Typed as the request, but the end of the client's half comes as EOF.
                request: object = await context.read()
                if request is grpc.aio.EOF:
                    return
                try:
                    if first:
                        # The first request carries the node (Envoy sends it only then): nothing
                        # is answered before the node is known to be the certificate's, and its
                        # view (scope, locality) is known.
                        node = first_node(cast(bytes, request), isinstance(stream, DeltaStream))
                        if self.identity is not None:
                            refusal = self.identity.check(
                                context.auth_context(), node.id, node.metadata, stream.peer
                            )
                            if refusal is not None:
                                await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
                        if self.scoping is not None:
                            stream.scope = self.scoping.scope_of(node.id, node.metadata)
                        locality = node.locality
                        if self.locate is not None and (locality is None or not locality.zone):
                            locality = await self.locate(node.id, node.metadata, locality)
                        stream.locality = locality
                        variant = Variant(api_type, stream.scope, locality)
                        if variant != MESH_WIDE_ADS:
                            self._variant_streams[variant] += 1
                            counted = True
                    first = False
                    if _settled(stream):
                        await look(cast(bytes, request))
                    else:
                        # A stream still taking its first configuration waits its turn among
                        # the few served at once: a storm of new streams cannot fill the event
                        # loop ahead of the pushes to the streams already connected.
                        async with self._first_configurations:
                            await look(cast(bytes, request))
                except DecodeError:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "not a discovery request of this service"
                    )
                except InvalidRequest as exc:
                    log.warning("stream %s refused: %s", stream.peer, exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        async def push() -> None:
            while True:
                await waker.wait()
                waker.clear()
                await look(None)

        # Two tasks for the life of the stream, not two per message: a task per read and per
        # wake-up, and a wait on both, cost more than the response itself at 1,000 streams.
        tasks = (asyncio.create_task(read()), asyncio.create_task(push()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the client's EOF ends the stream; an error is raised here
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            del self.streams[stream_id]
            del self._wakers[stream_id]
            if counted:
                self._variant_streams[variant] -= 1
                if not self._variant_streams[variant]:
                    del self._variant_streams[variant]
                    self._views.release(variant)
            self._index.remove(stream_id, list(stream.types))
            if not self._wakers and self._dispatcher is not None:
                # Nobody left to wake: no task outlives the last stream (or the event loop).
                self._dispatcher.cancel()
                self._dispatcher = None
            self.callbacks.stream_closed(stream_id, stream)

    def _reindex(self, stream_id: int, stream: StreamBase[Any, Any, Any]) -> None:
        for type_url in stream.types:
            sub = stream.subscription(type_url)
            if sub is not None:
                # The stream keeps the index's copy of its names: equal subscriptions share one
                # set (and an unchanged subscription is recognised by identity, at no cost).
                sub.names = self._index.subscribe(stream_id, type_url, sub.names, sub.wildcard)

    def subscriptions(self) -> list[str]:
        """The type URL of every (stream, type) subscription: connected clients by type."""
        return [type_url for stream in self.streams.values() for type_url in stream.types]

    def syncz(self) -> list[StreamStatus]:
        return [self.streams[i].describe() for i in sorted(self.streams)]


# The largest request accepted (bytes). Envoy's first request of a stream carries its node, about
# 61 KB with its extension list; a SotW request repeats every name it subscribes to, so with 10,000
# clusters an EDS ACK is 300 to 400 KB. 4 MiB is ten times that (about 100,000 names of 40
# characters) and bounds what one request makes the server parse and hold: with gRPC's former
# 64 MB, a single request could hold a 60 MB node cluster. A bigger one ends the stream with
# RESOURCE_EXHAUSTED.
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024
# A request bigger than this (about 30,000 names) is taken in a thread, so that its stream's turn
# does not stop the others': 100,000 names of unknown clusters held the event loop for 0.9 s (the
# first time; 0.4 s with their empty assignments built). A SotW ACK repeating 10,000 names (300 to
# 400 KB) stays on the event loop, where recognising it is a hash.
LARGE_REQUEST_BYTES = 1024 * 1024
# One connection is one Envoy, holding one ADS stream or, without ADS, a few per type: a cap per
# connection bounds what a runaway client can make the server hold (core sets none), and Envoy's
# HTTP/2 pool opens another connection when a server's cap is reached.
MAX_STREAMS_PER_CONNECTION = 1_000
# A client has this long from its TCP connection to its HTTP/2 preface and SETTINGS (gRPC core's
# default is 120 s): with file descriptors at 1,024, 1,100 sockets that never spoke kept new
# clients and the admin server's /healthz out for two minutes. Real clients take milliseconds.
HANDSHAKE_TIMEOUT_S = 10.0
# A connection without a stream for this long is closed (GOAWAY; core's default: never). Envoy
# keeps its xDS stream open for its whole life, so only connections that carry nothing are closed.
MAX_CONNECTION_IDLE_S = 60.0
# Connections are closed (GOAWAY) after this long, so that proxies spread over the replicas
# again after a rollout or a scale-up: a replica started first would keep every proxy otherwise.
# gRPC core adds a jitter of +-10% per connection (measured: 10 connections of a 2 s age closed
# over 220 ms), so a fleet that connected at once does not reconnect at once. Then the streams
# have the grace to end before they are cancelled; Envoy reconnects at once, keeping its
# configuration meanwhile (and delta clients are sent only what differs).
MAX_CONNECTION_AGE_S = 30 * 60.0
MAX_CONNECTION_AGE_GRACE_S = 60.0
# File descriptors left to the rest of the process (the admin server, file watches, the
# Kubernetes client) when the number of connections is derived from the process's limit.
RESERVED_DESCRIPTORS = 128


def default_max_connections() -> int:
    """The number of client connections accepted at once when none is given: what the process's
    file descriptor limit leaves after the others it needs, so that a flood of connections
    cannot take the descriptors the admin server and the sources need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(soft - RESERVED_DESCRIPTORS, 16)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What the gRPC server accepts from its clients (the defaults above explain each)."""

    max_receive_message_bytes: int = MAX_RECEIVE_MESSAGE_BYTES
    max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
    # None: derived from the file descriptor limit when the server starts.
    max_connections: int | None = None
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    max_connection_idle_s: float = MAX_CONNECTION_IDLE_S
    max_connection_age_s: float = MAX_CONNECTION_AGE_S
    max_connection_age_grace_s: float = MAX_CONNECTION_AGE_GRACE_S


def server_options(limits: ServerLimits = ServerLimits()) -> list[tuple[str, int]]:
    """The gRPC core options of the xDS server."""
    max_connections = limits.max_connections
    if max_connections is None:
        max_connections = default_max_connections()
    return [
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        # Without this, a second control plane on the same port would silently share it.
        ("grpc.so_reuseport", 0),
        # Connection storms (a fleet restarting, a replica taking over another's proxies):
        # grpc.aio takes new calls from gRPC's core one per event-loop turn, so while the
        # loop answers the first streams, the later ones wait in core's queue of calls not
        # yet requested. Past 1,000 waiting, core refuses them at random, all past 3,000
        # (its defaults), and the proxy sees CANCELLED and retries after a backoff: 346 /
        # 13,569 refused attempts with 2,000 / 5,000 simulated proxies at once. No random
        # early refusal (soft limit = hard limit) and room for twice the 5,000 proxies we
        # plan for; the limit still bounds what waiting calls hold (each its first request,
        # with Envoy's node, buffered: tens of KB).
        ("grpc.server.max_pending_requests", 10_000),
        ("grpc.server.max_pending_requests_hard_limit", 10_000),
        # A waiting call is also cancelled after 30 s by default, and a storm's last calls
        # wait the longer the more proxies come at once: the last of 5,000 streams, each
        # answered 1 MB by a bare grpc.aio server on 2 cores, waited 11 s, and the 5,000 of
        # bench/fleet.py were all configured in 32 s, near that limit. A cancelled proxy
        # retries after a backoff, at the back of the queue: waiting longer serves it better.
        ("grpc.server_max_unrequested_time_in_server", 120),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        # Connections past this many are closed as soon as they are accepted. gRPC core counts
        # connections, not peers: it has no limit per client address (see `max_streams_per_peer`
        # of DiscoveryServer for one on streams).
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(limits.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", _ms(limits.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(limits.max_connection_age_grace_s)),
        # Keepalive. Envoy holds its xDS stream for the life of the process and sends HTTP/2
        # PINGs only if its xDS cluster sets connection_keepalive, every interval plus a
        # jitter (added): accept one every 10 s even with no data, so an interval of 10 s
        # and up never earns a strike (core's default allows one per 5 minutes, and the
        # third strike closes the connection with GOAWAY too_many_pings). gRPC clients
        # (grpc-go, grpc-java) refuse keepalive intervals under 10 s themselves.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Our own PING after a minute of silence, answered within 20 s or the connection is
        # closed: a proxy whose node vanished without closing its socket frees its stream
        # in under 1.5 minutes instead of core's default of 2 hours.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # How many PINGs we send without data in between (core's default: 2): an xDS stream is
        # quiet for as long as nothing changes, and our keepalive must go on regardless.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


async def start_server(
    server: DiscoveryServer,
    host: str,
    port: int,
    limits: ServerLimits = ServerLimits(),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server on host:port (0 picks a free port); returns it and its port.
    Plaintext without `credentials` (see `xds.tls` for TLS)."""
    grpc_server = grpc.aio.server(options=server_options(limits))
    grpc_server.add_generic_rpc_handlers(server.handlers())
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = grpc_server.add_insecure_port(address)
        else:
            bound = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc's word for a port in use or an address not ours
        raise OSError(f"xDS server: cannot listen on {host}:{port} (in use?)") from exc
    await grpc_server.start()
    log.info("xDS server listening on %s:%d", host, bound)
    return grpc_server, bound
