"""The worker side of `bench/fleet.py`: one process holding many simulated Envoy ADS clients.

Each client is one grpc.aio channel of its own (its own TCP connection, as each Envoy has) carrying
one ADS stream, state-of-the-world or delta. It behaves as Envoy does at start-up: clusters
(wildcard), then endpoints for the clusters it received, listeners (wildcard), then routes for the
route names in the listeners; every response is ACKed. Responses are read as raw bytes, so that
their exact serialized size is counted, and parsed only as far as the names require.

A change is recognised without decoding endpoints: the parent gives each change a marker address
that appears nowhere before that change, and a ClusterLoadAssignment carrying it holds the address
as the field `SocketAddress.address` (tag 0x12, then its length, then the text), which is searched
for in the response bytes. The wall-clock time of the ACK of the first EDS response carrying a
marker is what the worker reports for that (change, client).

Parent and worker talk over a multiprocessing pipe, in tuples:

    worker -> parent: ("ready",) ("connected", times, failures, unconfigured, tally,
                      errors, examples)
                      ("acked", k, times, missing) ("stats", dict) ("error", text)
    parent -> worker: ("go", connect_deadline) ("begin",) ("flush", k) ("stats",) ("stop",)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc

from xds._pb.envoy.config.cluster.v3 import cluster_pb2
from xds._pb.envoy.config.listener.v3 import listener_pb2
from xds._pb.envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds._pb.envoy.service.discovery.v3 import discovery_pb2

PREFIX = "type.googleapis.com/"
CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
HCM = PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}
ALL_TYPES = frozenset(SHORT)

SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SOTW_METHOD = SERVICE + "StreamAggregatedResources"
DELTA_METHOD = SERVICE + "DeltaAggregatedResources"

# A stream that fails while connecting is retried after a backoff that doubles up to this cap, with
# jitter, so that a fleet refused at once does not come back in lockstep.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
# Closing channels on stop must not hang the worker: what is not closed by then dies with it.
CLOSE_TIMEOUT_S = 10.0

CHANNEL_OPTIONS = [
    # Without this, grpc shares one connection among channels to the same target: each simulated
    # client must hold its own, as each Envoy does.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


def marker_pattern(address: str) -> bytes:
    """The bytes of `SocketAddress.address = address` (field 2, length-delimited) as serialized
    inside any response carrying it; the length byte keeps 127.254.0.1 from matching .0.10."""
    data = address.encode()
    return b"\x12" + bytes([len(data)]) + data


def raise_fd_limit() -> int:
    """Raises the soft open-file limit to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    target: str  # host:port of the control plane, loopback
    clients: int
    delta: bool
    markers: tuple[tuple[int, str], ...]  # (change number, marker address)


@dataclass
class Tally:
    """What the worker's clients received, summed over them, since the last reset."""

    bytes: Counter[str] = field(default_factory=Counter)
    responses: Counter[str] = field(default_factory=Counter)
    resources: Counter[str] = field(default_factory=Counter)

    def add(self, type_url: str, size: int, resources: int) -> None:
        short = SHORT.get(type_url, type_url)
        self.bytes[short] += size
        self.responses[short] += 1
        self.resources[short] += resources

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "bytes": dict(self.bytes),
            "responses": dict(self.responses),
            "resources": dict(self.resources),
        }


class Names:
    """Names parsed out of clusters and listeners, cached: every client of a worker receives the
    same resources, and parsing them once per client would make the fleet, not the control plane,
    the cost being measured."""

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, str], frozenset[str]] = {}
        self._by_resource: dict[tuple[str, str, str], frozenset[str]] = {}

    def sotw(self, response: discovery_pb2.DiscoveryResponse) -> frozenset[str]:
        """EDS names of a CDS response, route names of an LDS response (a whole state)."""
        key = (response.type_url, response.version_info)
        names = self._by_version.get(key)
        if names is None:
            names = frozenset(
                n for any_ in response.resources for n in _wanted(response.type_url, any_.value)
            )
            self._by_version[key] = names
        return names

    def delta(self, type_url: str, item: discovery_pb2.Resource) -> frozenset[str]:
        key = (type_url, item.name, item.version)
        names = self._by_resource.get(key)
        if names is None:
            names = self._by_resource[key] = frozenset(_wanted(type_url, item.resource.value))
        return names


def _wanted(type_url: str, body: bytes) -> list[str]:
    """The names a cluster (its EDS service) or a listener (its RDS route configurations) needs."""
    if type_url == CLUSTER:
        cluster = cluster_pb2.Cluster.FromString(body)
        if cluster.HasField("eds_cluster_config") or cluster.type == cluster_pb2.Cluster.EDS:
            return [cluster.eds_cluster_config.service_name or cluster.name]
        return []
    if type_url == LISTENER:
        listener = listener_pb2.Listener.FromString(body)
        chains = list(listener.filter_chains)
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        out = []
        for chain in chains:
            for network_filter in chain.filters:
                if network_filter.typed_config.type_url == HCM:
                    manager = hcm_pb2.HttpConnectionManager.FromString(
                        network_filter.typed_config.value
                    )
                    if manager.HasField("rds"):
                        out.append(manager.rds.route_config_name)
        return out
    return []


class StreamBroken(Exception):
    """The server ended the stream (EOF) instead of answering."""


class Client:
    """One simulated Envoy: one channel, one ADS stream, the Envoy start-up order, ACKs."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.node_id = f"fleet-w{worker.spec.index}-c{index}"
        self.channel: grpc.aio.Channel | None = None
        self.configured_at: float | None = None
        self.failures = 0  # stream attempts that failed before the full initial config
        self.broken = False  # the stream failed after it was configured
        self.pending = dict(worker.patterns)  # markers not yet seen: change number -> pattern
        self.acked_types: set[str] = set()

    async def run(self, deadline: float) -> None:
        """Connects (retrying until `deadline` while not configured), then serves the stream until
        cancelled. A stream that breaks once configured is not reopened: it is reported missing."""
        backoff = BACKOFF_FIRST_S
        self.channel = grpc.aio.insecure_channel(self.worker.spec.target, options=CHANNEL_OPTIONS)
        while True:
            self.acked_types = set()
            try:
                if self.worker.spec.delta:
                    await self._delta()
                else:
                    await self._sotw()
                raise StreamBroken("server ended the stream")
            except (grpc.aio.AioRpcError, StreamBroken) as exc:
                self.worker.record_error(exc, connecting=self.configured_at is None)
                if self.configured_at is not None:
                    self.broken = True
                    self.worker.client_lost()
                    return
                self.failures += 1
                if time.time() + backoff > deadline:
                    self.worker.client_gave_up()
                    return
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _acked(self, type_url: str, response_bytes: bytes) -> None:
        """Called just after an ACK went out."""
        now = time.time()
        if self.configured_at is None:
            self.acked_types.add(type_url)
            if self.acked_types == ALL_TYPES:
                self.configured_at = now
                self.worker.client_configured(self)
        if type_url == ENDPOINT and self.pending:
            for change, pattern in list(self.pending.items()):
                if pattern in response_bytes:
                    del self.pending[change]
                    self.worker.marker_acked(change, now)

    def _account(self, type_url: str, size: int, resources: int) -> None:
        self.worker.tally.add(type_url, size, resources)

    def _method(self, path: str, serializer: Callable[[Any], bytes]) -> Any:
        assert self.channel is not None
        # No response deserializer: raw bytes, counted as received, then parsed here.
        return self.channel.stream_stream(path, request_serializer=serializer)

    async def _sotw(self) -> None:
        request = discovery_pb2.DiscoveryRequest
        call = self._method(SOTW_METHOD, request.SerializeToString)()
        names = self.worker.names
        # EDS (RDS) names, as the clusters (listeners) received name them, sorted for requests.
        subscribed: dict[str, frozenset[str] | None] = {ENDPOINT: None, ROUTE: None}
        sorted_names: dict[str, list[str]] = {ENDPOINT: [], ROUTE: []}
        dependent = {CLUSTER: ENDPOINT, LISTENER: ROUTE}
        # Subscription changes carry the last version and nonce of the type, as Envoy's do.
        last: dict[str, tuple[str, str]] = {}
        asked_listeners = False
        try:
            await call.write(request(type_url=CLUSTER, node={"id": self.node_id}))
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                response = discovery_pb2.DiscoveryResponse.FromString(raw)
                type_url = response.type_url
                self._account(type_url, len(raw), len(response.resources))
                version, nonce = response.version_info, response.nonce
                ack_names = sorted_names.get(type_url, [])
                needed_type = dependent.get(type_url)
                if needed_type is not None:
                    wanted = names.sotw(response)
                    if wanted != subscribed[needed_type]:
                        subscribed[needed_type] = wanted
                        sorted_names[needed_type] = sorted(wanted)
                        v, n = last.get(needed_type, ("", ""))
                        await call.write(
                            request(
                                type_url=needed_type,
                                resource_names=sorted_names[needed_type],
                                version_info=v,
                                response_nonce=n,
                            )
                        )
                last[type_url] = (version, nonce)
                # A state-of-the-world request names the whole subscription, ACKs included.
                await call.write(
                    request(
                        type_url=type_url,
                        version_info=version,
                        response_nonce=nonce,
                        resource_names=ack_names,
                    )
                )
                self._acked(type_url, raw)
                if type_url == ENDPOINT and not asked_listeners:
                    # Envoy asks for listeners once its clusters have warmed (endpoints came).
                    asked_listeners = True
                    await call.write(request(type_url=LISTENER))
        finally:
            call.cancel()

    async def _delta(self) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest
        call = self._method(DELTA_METHOD, request.SerializeToString)()
        names = self.worker.names
        # Per cluster (listener): the EDS (RDS) names it needs; a name is subscribed while needed.
        needs: dict[str, dict[str, frozenset[str]]] = {CLUSTER: {}, LISTENER: {}}
        subscribed: dict[str, set[str]] = {ENDPOINT: set(), ROUTE: set()}
        dependent = {CLUSTER: ENDPOINT, LISTENER: ROUTE}
        asked_listeners = False
        try:
            await call.write(request(type_url=CLUSTER, node={"id": self.node_id}))
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                response = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
                type_url = response.type_url
                self._account(type_url, len(raw), len(response.resources))
                if type_url in needs:
                    held = needs[type_url]
                    for item in response.resources:
                        held[item.name] = names.delta(type_url, item)
                    for name in response.removed_resources:
                        held.pop(name, None)
                    wanted = set().union(*held.values()) if held else set()
                    target = dependent[type_url]
                    add = sorted(wanted - subscribed[target])
                    drop = sorted(subscribed[target] - wanted)
                    if add or drop:
                        subscribed[target] = wanted
                        await call.write(
                            request(
                                type_url=target,
                                resource_names_subscribe=add,
                                resource_names_unsubscribe=drop,
                            )
                        )
                await call.write(request(type_url=type_url, response_nonce=response.nonce))
                self._acked(type_url, raw)
                if type_url == ENDPOINT and not asked_listeners:
                    asked_listeners = True
                    await call.write(request(type_url=LISTENER))
        finally:
            call.cancel()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=None)


class Worker:
    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.patterns = {change: marker_pattern(address) for change, address in spec.markers}
        self.names = Names()
        self.tally = Tally()
        self.clients = [Client(self, i) for i in range(spec.clients)]
        self.tasks: list[asyncio.Task[None]] = []
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        # The clients counted for changes: those configured when the connect phase ended.
        self.expected: set[Client] = set()
        self.settled = asyncio.Event()  # every client configured or given up
        self.acks: dict[int, list[float]] = {}
        self.reported: set[int] = set()
        self._unsettled = spec.clients
        # "connect CODE" or "later CODE" -> count, and one example of the details of each.
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}

    # Called by clients.
    def record_error(self, exc: Exception, connecting: bool) -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            code, details = exc.code().name, exc.details() or ""
        else:
            code, details = "EOF", str(exc)
        key = f"{'connect' if connecting else 'later'} {code}"
        self.errors[key] += 1
        self.error_examples.setdefault(key, details[:200])

    def client_configured(self, client: Client) -> None:
        self._settle_one()

    def client_gave_up(self) -> None:
        self._settle_one()

    def _settle_one(self) -> None:
        self._unsettled -= 1
        if self._unsettled <= 0:
            self.settled.set()

    def client_lost(self) -> None:
        for change in list(self.acks):
            self._maybe_report(change)

    def marker_acked(self, change: int, at: float) -> None:
        self.acks.setdefault(change, []).append(at)
        self._maybe_report(change)

    def _missing(self, change: int) -> int:
        return sum(1 for c in self.expected if change in c.pending)

    def _maybe_report(self, change: int) -> None:
        if change in self.reported or not self.expected:
            return
        waiting = sum(1 for c in self.expected if change in c.pending and not c.broken)
        if waiting == 0:
            self.reported.add(change)
            self._send("acked", change, self.acks.get(change, []), self._missing(change))

    def _send(self, *message: Any) -> None:
        self.conn.send(message)

    def _on_readable(self) -> None:
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            message = ("stop",)  # the parent is gone: stop rather than linger
        self.inbox.put_nowait(message)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._on_readable)
        try:
            self._send("ready")
            while True:
                message = await self.inbox.get()
                if message[0] == "stop":
                    return
                await self._handle(message)
        finally:
            loop.remove_reader(self.conn.fileno())
            await self._shutdown()

    async def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "go":
            deadline: float = message[1]
            self.tasks = [
                asyncio.create_task(c.run(deadline), name=c.node_id) for c in self.clients
            ]
            # Apart from the inbox loop, so that a stop is obeyed while clients connect.
            self.tasks.append(asyncio.create_task(self._connect_phase(deadline)))
        elif kind == "begin":
            self.tally = Tally()
        elif kind == "flush":
            change = message[1]
            self.reported.add(change)
            self._send("acked", change, self.acks.get(change, []), self._missing(change))
        elif kind == "stats":
            self._send(
                "stats",
                {
                    **self.tally.as_dict(),
                    "clients": len(self.expected),
                    "broken": sum(1 for c in self.clients if c.broken),
                    "errors": dict(self.errors),
                    "examples": dict(self.error_examples),
                },
            )

    async def _connect_phase(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settled.wait(), max(0.0, deadline - time.time()))
        configured = [c for c in self.clients if c.configured_at is not None]
        self.expected = set(configured)
        self._send(
            "connected",
            [c.configured_at for c in configured],
            sum(c.failures for c in self.clients),
            len(self.clients) - len(configured),
            self.tally.as_dict(),  # what the clients received while connecting
            dict(self.errors),
            dict(self.error_examples),
        )
        for change in list(self.acks):
            self._maybe_report(change)

    async def _shutdown(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True),
                CLOSE_TIMEOUT_S,
            )


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """A worker process's entry point (multiprocessing, spawn)."""
    # Ctrl-C reaches the whole process group: the parent alone decides how to stop the fleet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    try:
        asyncio.run(Worker(conn, spec).run())
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise
