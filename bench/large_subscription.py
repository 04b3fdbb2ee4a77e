"""Large subscription benchmark: what one client asking for very many names does to the others.

One `DiscoveryServer` on loopback holds no endpoints; a client sends one EDS request naming
`--names` clusters (default 100,000, about 3 MB: the request size limit allows some 100,000 names of
40 characters), twice (the second time the empty assignments are already built). A task on the
server's event loop sleeps 1 ms at a time and records how late it wakes: the longest delay is how
long every other stream would have waited. It prints the time to the answer and that longest delay.

    python bench/large_subscription.py
    python bench/large_subscription.py --names 30000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc

from xds._pb.envoy.service.discovery.v3 import discovery_pb2
from xds.cache import Cache
from xds.resources import CLUSTER, ENDPOINT
from xds.server.service import DiscoveryServer, start_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bounded, machine  # noqa: E402

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
ATTEMPTS = 2


async def run(names: int) -> None:
    cache = Cache()
    cache.publish({CLUSTER: {}, ENDPOINT: {}})
    server = DiscoveryServer(cache)
    grpc_server, port = await start_server(server, "127.0.0.1", 0)
    delays: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            delays.append(time.perf_counter() - started - 0.001)

    tick = asyncio.create_task(ticker())
    request = discovery_pb2.DiscoveryRequest(
        type_url=ENDPOINT,
        node={"id": "large"},
        resource_names=[f"ns-{i % 100}/service-{i}:http" for i in range(names)],
    )
    print(f"one EDS request of {names:,} names, {request.ByteSize() / 2**20:.1f} MiB")
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            method = channel.stream_stream(
                ADS,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
            for attempt in range(ATTEMPTS):
                call = method()
                delays.clear()
                started = time.perf_counter()
                await call.write(request)
                response = await asyncio.wait_for(call.read(), 60)
                took = time.perf_counter() - started
                assert isinstance(response, discovery_pb2.DiscoveryResponse)
                print(
                    f"attempt {attempt + 1}: {len(response.resources):,} assignments answered in "
                    f"{took * 1000:,.0f} ms; the event loop's longest delay meanwhile "
                    f"{max(delays) * 1000:,.0f} ms"
                )
                call.cancel()
    finally:
        running = False
        await tick
        await grpc_server.stop(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=bounded(1, 200_000), default=100_000)
    args = parser.parse_args()
    print(machine())
    asyncio.run(run(args.names))


if __name__ == "__main__":
    main()
