"""The grpc.aio discovery services: the wire around the stream state machine in `protocol`.

Responses are written as bytes the state machine joined from pre-serialized resources, so the
handlers are registered generically with an identity serializer instead of generated stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from xds.cache import Cache, Snapshot
from xds.resources import ADS_ORDER, CLUSTER, ENDPOINT, LISTENER, ROUTE
from xds.server.callbacks import Callbacks
from xds.server.delta import DeltaResponse, DeltaStream
from xds.server.index import SubscriptionIndex
from xds.server.sotw import Response, SotwStream
from xds.server.stream import MAX_NODE_FIELD, InvalidRequest, StreamBase, StreamStatus
from xds.server.tracing import TracingCallbacks
from xds.server.views import PerTypeViews, Rewrite, SnapshotView

log = logging.getLogger(__name__)


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


class DiscoveryServer:
    """Serves the cache's snapshots to every stream; knows its streams for /debug/syncz."""

    def __init__(
        self,
        cache: Cache,
        per_type_rewrite: Rewrite | None = None,
        callbacks: Callbacks | None = None,
        *,
        max_node_field: int = MAX_NODE_FIELD,
    ) -> None:
        self.cache = cache
        # The longest node id and cluster a stream accepts (see `stream.MAX_NODE_FIELD`).
        self.max_node_field = max_node_field
        # Told of every stream, push and reply: metrics and tracing (tracing alone by default).
        self.callbacks = callbacks if callbacks is not None else TracingCallbacks()
        # Clients on per-type streams need clusters and listeners rewritten (see `views`).
        self._views = (
            PerTypeViews(per_type_rewrite, cache.changes_since) if per_type_rewrite else None
        )
        # Either variant: /debug/syncz and the subscription count read only what both have.
        self.streams: dict[int, StreamBase[Any, Any, Any]] = {}
        self._ids = itertools.count(1)
        self._index = SubscriptionIndex()
        # Each stream's wake-up call, set by the dispatcher only when a publish concerns it.
        self._wakers: dict[int, asyncio.Event] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self.wakeups = 0  # streams woken by publishes: a measure of the work a publish causes
        self._first_configurations = asyncio.Semaphore(FIRST_CONFIGURATIONS_AT_ONCE)

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
            stream_id = next(self._ids)

            def on_reply(type_url: str, error_message: str | None, seconds: float) -> None:
                self.callbacks.replied(stream_id, type_url, error_message, seconds)

            stream = stream_type(
                peer=context.peer(),
                types=types,
                on_reply=on_reply,
                max_node_field=self.max_node_field,
            )
            await self.serve(context, stream, api_type, stream_id)

        # Requests arrive as bytes: the stream parses them, and a SotW ACK that repeats its
        # names is recognised without parsing them (`SotwStream.on_message`).
        return grpc.stream_stream_rpc_method_handler(
            handle, request_deserializer=_identity, response_serializer=_identity
        )

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

        def current() -> tuple[Snapshot | SnapshotView, int]:
            # The snapshot and its serial, read together: no await in between.
            snapshot, serial = self.cache.snapshot, self.cache.published
            if api_type is None or self._views is None:
                return snapshot, serial
            return self._views.view(snapshot, api_type, serial), serial

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
                responses: list[Response | DeltaResponse] = []
                if request is not None:
                    responses += stream.on_message(request, snapshot)
                    self._reindex(stream_id, stream)
                if request is None or changes is None:
                    # A publish concerns this stream (or what changed is no longer known).
                    responses += stream.respond(snapshot)
                for response in responses:
                    data = response.encode()
                    if response.type_url in stream.types:
                        # Not the empty answers to types the stream does not serve: metrics
                        # and traces are labelled by type, and those are the client's choice.
                        self.callbacks.pushed(
                            stream_id, stream, response, len(data), snapshot.trace_context
                        )
                    await context.write(data)

        async def read() -> None:
            while True:
                # Typed as the request, but the end of the client's half comes as EOF.
                request: object = await context.read()
                if request is grpc.aio.EOF:
                    return
                try:
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


async def start_server(
    server: DiscoveryServer, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server on host:port (0 picks a free port); returns it and its port."""
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
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
            # One connection is one Envoy, holding one ADS stream or, without ADS, a few per
            # type: a cap per connection bounds what a runaway client can make the server hold
            # (core sets none), and Envoy's HTTP/2 pool opens another connection when a
            # server's cap is reached.
            ("grpc.max_concurrent_streams", 1_000),
            # Keepalive. Envoy holds its xDS stream for the life of the process and sends HTTP/2
            # PINGs only if its xDS cluster sets connection_keepalive, every interval plus a
            # jitter (added): accept one every 10 s even with no data, so an interval of 10 s
            # and up never earns a strike (core's default allows one per 5 minutes, and the
            # third strike closes the connection with GOAWAY too_many_pings).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # Our own PING after a minute of silence, answered within 20 s or the connection is
            # closed: a proxy whose node vanished without closing its socket frees its stream
            # in under 1.5 minutes instead of core's default of 2 hours.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
    )
    grpc_server.add_generic_rpc_handlers(server.handlers())
    try:
        bound = grpc_server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc's word for a port in use or an address not ours
        raise OSError(f"xDS server: cannot listen on {host}:{port} (in use?)") from exc
    await grpc_server.start()
    log.info("xDS server listening on %s:%d", host, bound)
    return grpc_server, bound
