"""The grpc.aio discovery services: the wire around the stream state machine in `protocol`.

Responses are written as bytes the state machine joined from pre-serialized resources, so the
handlers are registered generically with an identity serializer instead of generated stubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Cache, Snapshot
from xds.resources import ADS_ORDER, CLUSTER, ENDPOINT, LISTENER, ROUTE
from xds.server.delta import DeltaResponse, DeltaStream
from xds.server.protocol import Response, SotwStream, StreamBase, StreamStatus
from xds.server.tracing import PushTraces
from xds.server.views import PerTypeViews, Rewrite, SnapshotView

if TYPE_CHECKING:
    from xds.metrics import Metrics

log = logging.getLogger(__name__)

# A stream variant's request and response: SotwStream's or DeltaStream's. Typing the handlers with
# them checks that each variant is fed the requests its gRPC method deserializes.
_Request = TypeVar("_Request", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
_Response = TypeVar("_Response", Response, DeltaResponse)

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


def _identity(data: bytes) -> bytes:
    return data


class DiscoveryServer:
    """Serves the cache's snapshots to every stream; knows its streams for /debug/syncz."""

    def __init__(
        self,
        cache: Cache,
        per_type_rewrite: Rewrite | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cache = cache
        self.metrics = metrics
        # Clients on per-type streams need clusters and listeners rewritten (see `views`).
        self._views = PerTypeViews(per_type_rewrite) if per_type_rewrite else None
        # Either variant: /debug/syncz and the subscription count read only what both have.
        self.streams: dict[int, StreamBase[Any, Any, Any]] = {}
        self._ids = itertools.count(1)
        # Each stream's wake-up call, set by the dispatcher only when a publish concerns it.
        self._wakers: dict[int, asyncio.Event] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self.wakeups = 0  # streams woken by publishes: a measure of the work a publish causes

    async def _dispatch(self) -> None:
        """Wakes, after each publish, only the streams whose subscriptions it changed: a
        stream of 5,000 that the change does not concern costs a set intersection, not a task
        switch and a look at everything it subscribes to."""
        serial = self.cache.published
        while True:
            _, published = self.cache.watch()
            if self.cache.published == serial:
                await published.wait()
            changes = self.cache.changes_since(serial)
            serial = self.cache.published
            for stream_id, waker in self._wakers.items():
                if changes is None or self.streams[stream_id].touched_by(changes):
                    waker.set()
                    self.wakeups += 1

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        handlers = []
        for service, sotw, delta, types in SERVICES:
            ads = types == ADS_ORDER
            # Built apart from the dict below: gRPC's dict[str, RpcMethodHandler[Any, Any]] would
            # let a stream variant paired with the other variant's request type pass unchecked.
            sotw_handler = self._handler(
                SotwStream, discovery_pb2.DiscoveryRequest, types, None if ads else "GRPC"
            )
            delta_handler = self._handler(
                DeltaStream,
                discovery_pb2.DeltaDiscoveryRequest,
                types,
                None if ads else "DELTA_GRPC",
            )
            handlers.append(
                grpc.method_handlers_generic_handler(
                    service, {sotw: sotw_handler, delta: delta_handler}
                )
            )
        return handlers

    def _handler(
        self,
        stream_type: type[StreamBase[Any, _Request, _Response]],
        request_type: type[_Request],
        types: tuple[str, ...],
        api_type: str | None,
    ) -> grpc.RpcMethodHandler[_Request, bytes]:
        async def handle(
            _requests: object, context: grpc.aio.ServicerContext[_Request, bytes]
        ) -> None:
            traces = PushTraces()

            def on_reply(type_url: str, error_message: str | None, seconds: float) -> None:
                if self.metrics is not None:
                    self.metrics.replied(type_url, error_message, seconds)
                traces.replied(type_url, error_message)

            stream = stream_type(peer=context.peer(), types=types, on_reply=on_reply)
            await self.serve(context, stream, api_type, traces)

        return grpc.stream_stream_rpc_method_handler(
            handle, request_deserializer=request_type.FromString, response_serializer=_identity
        )

    async def serve(
        self,
        context: grpc.aio.ServicerContext[_Request, bytes],
        stream: StreamBase[Any, _Request, _Response],
        api_type: str | None = None,
        traces: PushTraces | None = None,
    ) -> None:
        """Feeds one stream its requests and every new snapshot until the client goes away.
        `api_type` names a per-type client's API type (GRPC, DELTA_GRPC); None for ADS."""
        # An empty answer before the first snapshot would tell Envoy to drop what it has.
        await self.cache.initialized.wait()
        stream_id = next(self._ids)
        self.streams[stream_id] = stream

        def current() -> tuple[Snapshot | SnapshotView, int]:
            # The snapshot and its serial, read together: no await in between.
            snapshot, serial = self.cache.snapshot, self.cache.published
            if api_type is None or self._views is None:
                return snapshot, serial
            return self._views.view(snapshot, api_type), serial

        snapshot, serial = current()
        waker = self._wakers[stream_id] = asyncio.Event()
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch())
        read = asyncio.ensure_future(context.read())
        wake = asyncio.ensure_future(waker.wait())
        try:
            while True:
                await asyncio.wait((read, wake), return_when=asyncio.FIRST_COMPLETED)
                responses: list[_Response] = []
                if read.done():
                    request = read.result()
                    if request is grpc.aio.EOF:
                        return
                    # The current snapshot, not the one last woken for: the dispatcher leaves a
                    # stream asleep through publishes that do not concern it.
                    snapshot, _ = current()
                    responses += stream.on_request(request, snapshot)
                    read = asyncio.ensure_future(context.read())
                if wake.done():
                    waker.clear()
                    changes = self.cache.changes_since(serial)
                    snapshot, serial = current()
                    wake = asyncio.ensure_future(waker.wait())
                    responses += stream.on_snapshot(snapshot, changes)
                for response in responses:
                    data = response.encode()
                    if self.metrics is not None:
                        self.metrics.pushed(response.type_url, len(data))
                    if traces is not None:
                        traces.pushed(
                            response, len(data), snapshot.trace_context, stream.node_id, stream.peer
                        )
                    await context.write(data)
        finally:
            for task in (read, wake):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            del self.streams[stream_id]
            del self._wakers[stream_id]
            if not self._wakers and self._dispatcher is not None:
                # Nobody left to wake: no task outlives the last stream (or the event loop).
                self._dispatcher.cancel()
                self._dispatcher = None
            if traces is not None:
                traces.close()

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
            # Envoy holds its xDS stream for the life of the process: keep idle streams alive.
            ("grpc.keepalive_permit_without_calls", 1),
            # Without this, a second control plane on the same port would silently share it.
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
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
