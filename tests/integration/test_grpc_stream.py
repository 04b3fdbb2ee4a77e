"""The ADS servicer over real gRPC on loopback with a raw client: wake-ups, ACKs, cleanup."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Cache
from xds.resources import CLUSTER, ENDPOINT, Resource
from xds.server.service import DiscoveryServer, start_server

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def resources(body: bytes) -> dict[str, dict[str, Resource]]:
    cluster = Resource.from_bytes(CLUSTER, "ns/a:http", body, refs=((ENDPOINT, "ns/a:http"),))
    return {
        CLUSTER: {cluster.name: cluster},
        ENDPOINT: {"ns/a:http": Resource.from_bytes(ENDPOINT, "ns/a:http", b"")},
    }


@pytest.fixture
async def served():
    cache = Cache()
    cache.publish(resources(b"\x0a\x01a"))
    server = DiscoveryServer(cache)
    grpc_server, port = await start_server(server, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield cache, server, channel
    finally:
        await channel.close()
        await grpc_server.stop(None)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


async def test_ads_stream_answers_acks_wakes_on_publish_and_cleans_up(served):
    cache, server, channel = served
    call = channel.stream_stream(
        ADS_METHOD,
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )()
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"id": "test-node"}))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.version_info == cache.snapshot.version(CLUSTER)
    assert [r.value for r in first.resources] == [b"\x0a\x01a"]

    await call.write(
        discovery_pb2.DiscoveryRequest(
            type_url=CLUSTER, version_info=first.version_info, response_nonce=first.nonce
        )
    )
    [stream] = server.streams.values()
    await wait_until(lambda: stream.types[CLUSTER].acked_version == first.version_info)
    assert server.syncz()[0]["node_id"] == "test-node"

    cache.publish(resources(b"\x0a\x01b"))
    second = await asyncio.wait_for(call.read(), 5)
    assert second.version_info == cache.snapshot.version(CLUSTER) != first.version_info
    assert second.nonce != first.nonce

    await call.done_writing()
    await wait_until(lambda: not server.streams)


async def test_cancelled_streams_leave_nothing_behind(served):
    _, server, channel = served
    tasks_before = len(asyncio.all_tasks())
    for _ in range(50):
        call = channel.stream_stream(
            ADS_METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        await asyncio.wait_for(call.read(), 5)
        call.cancel()
    await wait_until(lambda: not server.streams)
    await wait_until(lambda: len(asyncio.all_tasks()) <= tasks_before)
