"""Two replicas of `xds serve` and an Envoy that knows both: the replica it is connected to stops
with SIGTERM (as Kubernetes stops a pod); it closes its streams (GOAWAY), exits 0 within a grace
period, Envoy reconnects to the other replica, no request through Envoy fails meanwhile, and a
change made after that reaches Envoy through the replica that is left."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.conftest import endpoint_slice, service, write_manifests
from xds.local import Envoy, backends, free_port, request_backend, wait_for

SERVICE_PORT = 8080
HOST = "web.default"
# Kubernetes' default terminationGracePeriodSeconds: the replica must be gone well within it.
GRACE_PERIOD_S = 30.0


async def start_replica(
    manifests: Path, offset: int
) -> tuple[asyncio.subprocess.Process, int, int]:
    xds_port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds", "serve", "--manifests", str(manifests),
        "--xds-port", str(xds_port), "--admin-port", str(admin_port),
        "--listener-address", "127.0.0.1", "--listener-port-offset", str(offset),
        "--allow-endpoints", "127.0.0.0/8",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return process, xds_port, admin_port


async def syncz_nodes(session: aiohttp.ClientSession, admin_port: int) -> set[str]:
    try:
        async with session.get(f"http://127.0.0.1:{admin_port}/debug/syncz") as response:
            return {s["node_id"] for s in await response.json()}
    except aiohttp.ClientError:
        return set()


async def _answers(session: aiohttp.ClientSession, admin_port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def test_a_stopping_replica_hands_its_proxies_to_the_other(tmp_path: Path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    listener_port = free_port()
    offset = listener_port - SERVICE_PORT
    async with backends(["b1", "b2", "b3"]) as pods, aiohttp.ClientSession() as session:
        port = pods[0].port

        def publish(count: int) -> None:
            write_manifests(
                manifests / "web.yaml",
                service("web", SERVICE_PORT),
                endpoint_slice("web", [p.host for p in pods[:count]], port),
            )

        publish(2)
        replicas = [await start_replica(manifests, offset) for _ in range(2)]
        (first, first_xds, first_admin), (second, second_xds, second_admin) = replicas

        def both_replicas(config: dict[str, Any]) -> None:
            # The xDS cluster with both replicas, as a Kubernetes Service's endpoints would be.
            [cluster] = config["static_resources"]["clusters"]
            endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            address = {"socket_address": {"address": "127.0.0.1", "port_value": second_xds}}
            endpoints.append({"endpoint": {"address": address}})

        envoy = Envoy(f"127.0.0.1:{first_xds}", workdir=tmp_path, customize=both_replicas)
        url = f"http://127.0.0.1:{listener_port}/"
        try:
            for admin in (first_admin, second_admin):
                await wait_for(
                    lambda admin=admin: _answers(session, admin), timeout=30, what="replicas up"
                )
            await envoy.start()

            async def connected_to() -> list[int]:
                return [
                    admin
                    for admin in (first_admin, second_admin)
                    if envoy.node_id in await syncz_nodes(session, admin)
                ]

            await wait_for(connected_to, timeout=30, what="Envoy connected to a replica")
            [holding] = await connected_to()
            stopping = first if holding == first_admin else second
            other_admin = second_admin if holding == first_admin else first_admin
            await wait_for(lambda: request_backend(session, url, HOST), timeout=30, what="traffic")

            # Traffic all along, one request at a time, while the replica Envoy uses stops.
            failed: list[float] = []
            answered = 0
            stop_traffic = asyncio.Event()

            async def traffic() -> None:
                nonlocal answered
                while not stop_traffic.is_set() and answered < 100_000:
                    if await request_backend(session, url, HOST) is None:
                        failed.append(time.monotonic())
                    else:
                        answered += 1

            flowing = asyncio.create_task(traffic())
            stopped_at = time.monotonic()
            stopping.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(stopping.wait(), GRACE_PERIOD_S)
            assert code == 0, "a replica answers SIGTERM by exiting 0"
            assert time.monotonic() - stopped_at < GRACE_PERIOD_S

            async def moved() -> bool:
                return envoy.node_id in await syncz_nodes(session, other_admin)

            await wait_for(moved, timeout=30, what="Envoy reconnected to the other replica")
            # A change now reaches Envoy through the replica that is left.
            publish(3)

            async def third_backend_served() -> bool:
                return len((await envoy.endpoints()).get("default/web:http", set())) == 3

            await wait_for(third_backend_served, timeout=30, what="the change through replica 2")
            stop_traffic.set()
            await flowing
            assert answered > 0 and failed == [], f"{len(failed)} requests failed"
        finally:
            await envoy.stop()
            for process, _, _ in replicas:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(process.wait(), GRACE_PERIOD_S)
