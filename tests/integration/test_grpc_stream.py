"""The ADS servicer over real gRPC on loopback with a raw client: wake-ups, ACKs, cleanup."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Cache
from xds.local import wait_for
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


def ads_call(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    return ads_method(channel)()


def ads_method(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(
        ADS_METHOD,
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )


async def test_ads_stream_answers_acks_wakes_on_publish_and_cleans_up(served):
    cache, server, channel = served
    call = ads_call(channel)
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
    await wait_for(lambda: stream.types[CLUSTER].acked_version == first.version_info)
    assert server.syncz()[0]["node_id"] == "test-node"

    cache.publish(resources(b"\x0a\x01b"))
    second = await asyncio.wait_for(call.read(), 5)
    assert second.version_info == cache.snapshot.version(CLUSTER) != first.version_info
    assert second.nonce != first.nonce

    await call.done_writing()
    await wait_for(lambda: not server.streams)


async def test_cancelled_streams_leave_nothing_behind(served):
    _, server, channel = served
    tasks_before = len(asyncio.all_tasks())
    for _ in range(50):
        call = ads_call(channel)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
        await asyncio.wait_for(call.read(), 5)
        call.cancel()
    await wait_for(lambda: not server.streams)
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before)


async def test_a_client_that_never_acks_gets_one_response_per_type(served):
    cache, server, channel = served
    call = ads_call(channel)
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
    await call.write(
        discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["ns/a:http"])
    )
    await wait_for(lambda: server.streams and len(next(iter(server.streams.values())).types) == 2)
    [stream] = server.streams.values()
    await wait_for(lambda: all(s.awaiting_ack for s in stream.types.values()))
    nonces = {t: s.last_nonce for t, s in stream.types.items()}
    for generation in range(200):
        cache.publish(resources(bytes([0x0A, 0x01, generation % 250])))
        await asyncio.sleep(0)
    # Nothing more was sent: each type still waits for the answer to its first response.
    assert {t: s.last_nonce for t, s in stream.types.items()} == nonces
    call.cancel()
    await wait_for(lambda: not server.streams)


async def test_ten_thousand_connect_disconnect_cycles_leave_tasks_and_memory_flat(served):
    import gc
    import tracemalloc

    _, server, channel = served
    method = ads_method(channel)

    async def cycles(count: int) -> None:
        for index in range(count):
            call = method()
            await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"id": "x"}))
            await call.read()
            if index % 2:
                call.cancel()  # half vanish abruptly, half close politely
            else:
                await call.done_writing()
                await call.wait_for_connection()
                assert await call.code() == grpc.StatusCode.OK
        await wait_for(lambda: not server.streams)

    await cycles(1_000)  # warm up: grpc and asyncio allocate their pools once
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await cycles(9_000)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before)
    print(f"10,000 cycles: Python heap grew by {grown / 1024:.0f} KiB")
    assert grown < 2 * 1024 * 1024  # a leak of ~200 bytes a stream would show as 1.7 MiB


async def test_a_publish_wakes_only_the_streams_it_concerns(served):
    cache, server, channel = served
    names = [f"ns/s{i}:http" for i in range(20)]

    def with_endpoints(changed: str = "", body: bytes = b"") -> dict[str, dict[str, Resource]]:
        out = resources(b"\x0a\x01a")
        for name in names:
            out[ENDPOINT][name] = Resource.from_bytes(
                ENDPOINT, name, body if name == changed else b""
            )
        return out

    cache.publish(with_endpoints())
    calls = []
    for name in names:  # 20 streams, each subscribed to the endpoints of one Service
        call = ads_call(channel)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=[name]))
        first = await asyncio.wait_for(call.read(), 5)
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=ENDPOINT,
                resource_names=[name],
                version_info=first.version_info,
                response_nonce=first.nonce,
            )
        )
        calls.append(call)
    await wait_for(
        lambda: (
            len(server.streams) == 20
            and all(s.types[ENDPOINT].acks == 1 for s in server.streams.values())
        )
    )
    before = server.wakeups
    cache.publish(with_endpoints("ns/s7:http", b"\x0a\x0ans/s7:http"))
    update = await asyncio.wait_for(calls[7].read(), 5)
    assert [r.value for r in update.resources] == [b"\x0a\x0ans/s7:http"]
    assert server.wakeups == before + 1  # the other 19 streams slept through it
    for call in calls:
        call.cancel()
    await wait_for(lambda: not server.streams)


async def test_an_unknown_type_is_answered_over_grpc_and_not_reported(served):
    from xds.server.callbacks import Callbacks

    _, server, channel = served
    pushed: list[str] = []

    class Recorder(Callbacks):
        def pushed(self, stream_id, stream, response, size, trace_context):
            pushed.append(response.type_url)

    server.callbacks = Recorder()
    call = ads_call(channel)
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    await call.write(discovery_pb2.DiscoveryRequest(type_url=secret, resource_names=["s"]))
    answer = await asyncio.wait_for(call.read(), 5)
    assert answer.type_url == secret and not answer.resources and answer.nonce
    # Its ACK gets nothing; the stream goes on serving the types it knows.
    await call.write(discovery_pb2.DiscoveryRequest(type_url=secret, response_nonce=answer.nonce))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
    clusters = await asyncio.wait_for(call.read(), 5)
    assert clusters.type_url == CLUSTER
    assert pushed == [CLUSTER]  # metrics and traces are labelled by the types served only
    call.cancel()
    await wait_for(lambda: not server.streams)


async def test_a_huge_node_id_ends_the_stream_with_invalid_argument(served):
    _, server, channel = served
    call = ads_call(channel)
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"id": "n" * 1_000_000}))
    assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id has 1000000 characters" in await call.details()
    await wait_for(lambda: not server.streams)
    assert server.syncz() == []
    # A proxy with a real id is served as before.
    call = ads_call(channel)
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node={"id": "proxy-1"}))
    await asyncio.wait_for(call.read(), 5)
    assert [s["node_id"] for s in server.syncz()] == ["proxy-1"]
    call.cancel()
    await wait_for(lambda: not server.streams)
