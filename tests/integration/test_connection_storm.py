"""A connection storm over real gRPC on loopback: many ADS streams opened at once, all accepted.

grpc.aio takes new calls from gRPC's core one per event-loop turn; the calls that arrive meanwhile
wait in core's queue, which by default refuses calls at random past 1,000 waiting (the client sees
CANCELLED). 1,600 streams opened in one go make that queue pass 1,000 (with core's defaults this
test sees dozens refused); `start_server` must accept them all and answer each one.
"""

from __future__ import annotations

import asyncio

import grpc

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Cache
from xds.local import wait_for
from xds.resources import CLUSTER, ENDPOINT, Resource
from xds.server.service import DiscoveryServer, start_server

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
STREAMS = 1_600
# Several connections, as several proxies have: one connection may carry only so many streams
# (`start_server` caps them at 1,000 each), and a fleet is many connections anyway.
CONNECTIONS = 4
# Generous: the assertion is that every stream is answered, not how fast (a loaded CI machine).
DEADLINE_S = 120.0


def snapshot() -> dict[str, dict[str, Resource]]:
    cluster = Resource.from_bytes(
        CLUSTER, "ns/a:http", b"\x0a\x01a", refs=((ENDPOINT, "ns/a:http"),)
    )
    return {
        CLUSTER: {cluster.name: cluster},
        ENDPOINT: {"ns/a:http": Resource.from_bytes(ENDPOINT, "ns/a:http", b"")},
    }


async def test_a_storm_of_streams_is_all_accepted_and_all_answered() -> None:
    cache = Cache()
    cache.publish(snapshot())
    server = DiscoveryServer(cache)
    grpc_server, port = await start_server(server, "127.0.0.1", 0)
    # A subchannel pool of its own per channel: otherwise gRPC shares one connection among them.
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(CONNECTIONS)
    ]
    calls: list[grpc.aio.StreamStreamCall[discovery_pb2.DiscoveryRequest, bytes]] = []
    try:
        # Connected first, so that the storm is of streams arriving at once, not of handshakes.
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), DEADLINE_S)
        methods = [
            channel.stream_stream(
                ADS_METHOD,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            )
            for channel in channels
        ]
        # Every stream is started in this one loop turn (a call's headers leave on gRPC's own
        # threads), then each sends its request and reads its first response.
        calls = [methods[i % CONNECTIONS]() for i in range(STREAMS)]

        async def first_response(call: grpc.aio.StreamStreamCall[object, bytes]) -> str:
            await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"id": "storm"}))
            raw = await call.read()
            assert isinstance(raw, bytes), f"stream ended: {await call.code()}"
            return discovery_pb2.DiscoveryResponse.FromString(raw).type_url

        answered = await asyncio.wait_for(
            asyncio.gather(*(first_response(call) for call in calls), return_exceptions=True),
            DEADLINE_S,
        )
        failures = [a for a in answered if isinstance(a, BaseException)]
        assert not failures, f"{len(failures)} of {STREAMS} streams failed, e.g. {failures[0]!r}"
        assert answered == [CLUSTER] * STREAMS
        # All of them are streams the server holds at once.
        assert len(server.streams) == STREAMS
    finally:
        for call in calls:
            call.cancel()
        await wait_for(lambda: not server.streams, DEADLINE_S)
        for channel in channels:
            await channel.close()
        await grpc_server.stop(None)
