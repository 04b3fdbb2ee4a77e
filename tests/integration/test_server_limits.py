"""The limits of the xDS server that live in gRPC, over real gRPC on loopback: the largest request,
connections in all, clients that never finish their handshake, idle and old connections, and
streams per client address. Limits are made small here so that each shows within a second."""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.app import ControlPlane
from xds.cache import Cache
from xds.cli import _settings, build_parser
from xds.local import wait_for
from xds.resources import CLUSTER, ENDPOINT, Resource
from xds.server.service import (
    MAX_RECEIVE_MESSAGE_BYTES,
    RESERVED_DESCRIPTORS,
    DiscoveryServer,
    ServerLimits,
    default_max_connections,
    peer_host,
    server_options,
    start_server,
)

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DEADLINE_S = 10.0  # generous: each limit shows in well under a second


def resources() -> dict[str, dict[str, Resource]]:
    cluster = Resource.from_bytes(
        CLUSTER, "ns/a:http", b"\x0a\x01a", refs=((ENDPOINT, "ns/a:http"),)
    )
    return {
        CLUSTER: {cluster.name: cluster},
        ENDPOINT: {"ns/a:http": Resource.from_bytes(ENDPOINT, "ns/a:http", b"")},
    }


@asynccontextmanager
async def serving(
    limits: ServerLimits | None = None, **server_args: int
) -> AsyncIterator[tuple[DiscoveryServer, int]]:
    cache = Cache()
    cache.publish(resources())
    server = DiscoveryServer(cache, **server_args)  # type: ignore[arg-type]
    grpc_server, port = await start_server(server, "127.0.0.1", 0, limits or ServerLimits())
    try:
        yield server, port
    finally:
        await grpc_server.stop(None)


def channel(port: int) -> grpc.aio.Channel:
    # A connection of its own, not one shared with the test's other channels.
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


def ads_call(ch: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    return ch.stream_stream(
        ADS_METHOD,
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )()


async def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends on a raw connection until it closes it."""
    loop = asyncio.get_running_loop()
    received = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), DEADLINE_S):
        received += chunk
    return received


def raw_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def test_the_default_receive_limit_and_the_options_given_to_grpc() -> None:
    assert MAX_RECEIVE_MESSAGE_BYTES == 4 * 1024 * 1024
    options = dict(server_options(ServerLimits(max_connections=50, max_connection_age_s=1.5)))
    assert options["grpc.max_receive_message_length"] == MAX_RECEIVE_MESSAGE_BYTES
    assert options["grpc.max_allowed_incoming_connections"] == 50
    assert options["grpc.max_connection_age_ms"] == 1500
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        assert default_max_connections() == max(soft - RESERVED_DESCRIPTORS, 16)
    derived = dict(server_options())["grpc.max_allowed_incoming_connections"]
    assert derived == default_max_connections()


def test_peer_host_drops_the_port() -> None:
    assert peer_host("ipv4:10.0.0.1:5000") == "10.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "[::1]"
    assert peer_host("unix:/run/xds.sock") == "unix:/run/xds.sock"


async def test_a_request_over_the_receive_limit_ends_the_stream_and_one_under_it_is_served() -> (
    None
):
    limit = 64 * 1024
    async with serving(ServerLimits(max_receive_message_bytes=limit)) as (server, port):
        ch = channel(port)
        call = ads_call(ch)
        # Under the limit: names of a big subscription, as a SotW ACK repeats them.
        names = [f"ns/service-{i}:http" for i in range(2_000)]
        small = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, resource_names=names)
        assert small.ByteSize() < limit
        await call.write(small)
        await asyncio.wait_for(call.read(), DEADLINE_S)
        call.cancel()
        call = ads_call(ch)
        big = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"cluster": "c" * limit})
        await call.write(big)
        assert await asyncio.wait_for(call.code(), DEADLINE_S) == grpc.StatusCode.RESOURCE_EXHAUSTED
        await wait_for(lambda: not server.streams)
        await ch.close()


async def test_connections_past_the_limit_are_closed_at_once() -> None:
    async with serving(ServerLimits(max_connections=2)) as (_, port):
        held = [raw_connection(port), raw_connection(port)]
        loop = asyncio.get_running_loop()
        for sock in held:
            # Accepted: the server speaks first in HTTP/2, with its SETTINGS.
            assert await asyncio.wait_for(loop.sock_recv(sock, 4096), DEADLINE_S)
        refused = raw_connection(port)
        assert await read_until_closed(refused) == b""  # closed before a byte was sent
        refused.close()
        for sock in held:
            sock.close()
        # The slots are free again: a real client gets in (once the server has seen the two
        # closes, which may take a moment on a busy machine: the call waits for its connection).
        ch = channel(port)
        call = ch.stream_stream(
            ADS_METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )(wait_for_ready=True, timeout=DEADLINE_S)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        await asyncio.wait_for(call.read(), DEADLINE_S)
        call.cancel()
        await ch.close()


async def test_a_connection_that_never_speaks_is_closed_after_the_handshake_timeout() -> None:
    async with serving(ServerLimits(handshake_timeout_s=0.2)) as (_, port):
        silent = raw_connection(port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = await read_until_closed(silent)
        silent.close()
        assert b"\x07" in received  # SETTINGS, then a GOAWAY frame (type 7) before closing
        assert loop.time() - started < DEADLINE_S


async def test_old_connections_are_closed_and_the_client_reconnects() -> None:
    limits = ServerLimits(max_connection_age_s=0.3, max_connection_age_grace_s=0.2)
    async with serving(limits) as (server, port):
        ch = channel(port)
        call = ads_call(ch)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        await asyncio.wait_for(call.read(), DEADLINE_S)
        # The stream outlives neither the age nor its grace: the client sees it end and opens
        # another, as Envoy does (on another replica, if the address leads to several).
        assert await asyncio.wait_for(call.code(), DEADLINE_S) == grpc.StatusCode.UNAVAILABLE
        await wait_for(lambda: not server.streams)
        again = ads_call(ch)
        await again.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        await asyncio.wait_for(again.read(), DEADLINE_S)
        again.cancel()
        await ch.close()


async def test_a_connection_without_streams_is_closed_when_idle() -> None:
    async with serving(ServerLimits(max_connection_idle_s=0.2)) as (server, port):
        ch = channel(port)
        call = ads_call(ch)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        await asyncio.wait_for(call.read(), DEADLINE_S)
        assert ch.get_state() == grpc.ChannelConnectivity.READY
        call.cancel()
        await wait_for(lambda: not server.streams)
        # No stream left: the server's GOAWAY sends the channel back to IDLE.
        await asyncio.wait_for(ch.wait_for_state_change(grpc.ChannelConnectivity.READY), DEADLINE_S)
        assert ch.get_state() == grpc.ChannelConnectivity.IDLE
        await ch.close()


async def test_streams_past_the_limit_per_client_address_are_refused() -> None:
    async with serving(max_streams_per_peer=2) as (server, port):
        channels = [channel(port) for _ in range(3)]  # three connections, one address
        calls = []
        for ch in channels[:2]:
            call = ads_call(ch)
            await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
            await asyncio.wait_for(call.read(), DEADLINE_S)
            calls.append(call)
        refused = ads_call(channels[2])
        await refused.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        assert await asyncio.wait_for(refused.code(), DEADLINE_S) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert "2 streams are open from 127.0.0.1" in await refused.details()
        calls[0].cancel()
        await wait_for(lambda: len(server.streams) == 1)
        await wait_for(lambda: sum(server._per_peer.values()) == 1)
        accepted = ads_call(channels[2])
        await accepted.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        await asyncio.wait_for(accepted.read(), DEADLINE_S)
        for call in (calls[1], accepted):
            call.cancel()
        await wait_for(lambda: not server._per_peer)
        for ch in channels:
            await ch.close()


async def test_the_serve_flags_reach_the_running_server(tmp_path: Path) -> None:

    (tmp_path / "mesh.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
        "spec: {ports: [{name: http, port: 80}]}\n"
    )
    args = build_parser().parse_args(
        ["serve", "--manifests", str(tmp_path), "--xds-port", "0"]
        + ["--max-receive-bytes", "65536", "--max-streams-per-peer", "1"]
        + ["--max-connection-age", "600"]
    )
    settings = _settings(args)
    assert (settings.max_receive_bytes, settings.max_streams_per_peer) == (65536, 1)
    plane = ControlPlane(settings)
    assert plane._server_limits().max_connection_age_s == 600
    ports = await plane.start()
    try:
        first_channel, second_channel = channel(ports.xds), channel(ports.xds)
        first = ads_call(first_channel)
        await first.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        await asyncio.wait_for(first.read(), DEADLINE_S)
        second = ads_call(second_channel)  # a second stream from the same address
        await second.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        assert await asyncio.wait_for(second.code(), DEADLINE_S) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        first.cancel()
        await wait_for(lambda: not plane.server.streams)  # the per-address limit is free
        big = ads_call(second_channel)
        await big.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"id": "n" * 70_000}))
        assert await asyncio.wait_for(big.code(), DEADLINE_S) == grpc.StatusCode.RESOURCE_EXHAUSTED
        await first_channel.close()
        await second_channel.close()
    finally:
        await plane.stop()
