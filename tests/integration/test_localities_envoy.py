"""Locality-aware endpoints with a real Envoy: an Envoy in zone-a keeps its traffic in zone-a,
moves it to zone-b when zone-a's backends fail or go, and loses no request when they are removed.
Backends are HTTP servers on 127.0.0.1-4 (zone-a: .1 and .2, zone-b: .3 and .4)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import LOOPBACK, endpoint_slice, service, write_manifests
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import (
    Backend,
    Envoy,
    free_port,
    free_port_offset,
    request_backend,
    spread,
    wait_for,
)

SERVICE_PORT = 80
HOST = "web.shop"
CLUSTER_NAME = "shop/web:http"
ZONE_OF = {"a1": "zone-a", "a2": "zone-a", "b1": "zone-b", "b2": "zone-b"}
# Outlier detection of locality-aware clusters: ejected after this many 5xx in a row.
CONSECUTIVE_5XX = 3


def manifests(port: int, names: list[str], draining: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Service web.shop (PreferClose) and its EndpointSlice, each endpoint in its zone."""
    addresses = [address(n) for n in names]
    return [
        service("web", SERVICE_PORT, "shop", trafficDistribution="PreferClose"),
        endpoint_slice(
            "web",
            addresses,
            port,
            "shop",
            name="web-1",
            draining=[address(n) for n in draining],
            zones={address(n): ZONE_OF[n] for n in names},
        ),
    ]


def address(name: str) -> str:
    return f"127.0.0.{list(ZONE_OF).index(name) + 1}"


@dataclass
class Zones:
    manifests: Path
    port: int
    backends: dict[str, Backend]
    envoy: Envoy
    url: str
    session: aiohttp.ClientSession

    def write(self, names: list[str], draining: tuple[str, ...] = ()) -> None:
        write_manifests(self.manifests / "web.yaml", *manifests(self.port, names, draining))

    def zone_counts(self) -> dict[str, int]:
        counts = {"zone-a": 0, "zone-b": 0}
        for name, backend in self.backends.items():
            counts[ZONE_OF[name]] += backend.requests
        return counts

    async def priorities(self) -> dict[str, int]:
        return await self.envoy.priorities(CLUSTER_NAME)


@pytest.fixture
async def zones(tmp_path: Path) -> AsyncIterator[Zones]:
    directory = tmp_path / "manifests"
    directory.mkdir()
    port = free_port()
    write_manifests(directory / "web.yaml", *manifests(port, list(ZONE_OF)))
    offset = free_port_offset([SERVICE_PORT])
    plane = ControlPlane(
        Settings(
            manifests=(directory,),
            xds_port=0,
            admin_port=0,
            listener_address="127.0.0.1",
            listener_port_offset=offset,
            allowed_endpoint_ranges=LOOPBACK,
        )
    )
    backends = {name: Backend(name, address(name), port) for name in ZONE_OF}
    for backend in backends.values():
        await backend.start()
    ports = await plane.start()

    def in_zone_a(config: dict[str, Any]) -> None:
        config["node"]["locality"] = {"region": "region-1", "zone": "zone-a"}

    envoy = Envoy(f"127.0.0.1:{ports.xds}", workdir=tmp_path, customize=in_zone_a)
    session = aiohttp.ClientSession()
    try:
        await envoy.start()
        zones = Zones(
            directory,
            port,
            backends,
            envoy,
            f"http://127.0.0.1:{SERVICE_PORT + offset}/",
            session,
        )
        expected = {address(n): 0 if ZONE_OF[n] == "zone-a" else 1 for n in ZONE_OF}
        await wait_for(
            lambda: zones.envoy.has_priorities(CLUSTER_NAME, expected),
            timeout=20,
            what="zone-a at priority 0",
        )
        yield zones
    finally:
        await session.close()
        await envoy.stop()
        await plane.stop()
        for backend in backends.values():
            await backend.stop()


async def test_an_envoy_in_zone_a_keeps_its_traffic_in_zone_a(zones: Zones):
    names = await spread(zones.session, zones.url, HOST, 1000)
    assert None not in names
    counts = zones.zone_counts()
    assert counts["zone-a"] >= 990, counts  # >= 99 %
    assert {zones.backends["a1"].requests, zones.backends["a2"].requests} != {0}


@pytest.mark.parametrize("failure", ["503", "closed ports"])
async def test_failing_zone_a_backends_send_traffic_to_zone_b(zones: Zones, failure: str):
    for name in ("a1", "a2"):
        if failure == "503":
            zones.backends[name].status = 503
        else:
            await zones.backends[name].stop()
    started = time.monotonic()
    failed = 0
    in_a_row = 0  # answers from zone-b in a row
    while in_a_row < 50 and time.monotonic() - started < 2.0:
        name = await request_backend(zones.session, zones.url, HOST)
        if name is None:
            failed += 1
            in_a_row = 0
        else:
            assert ZONE_OF[name] == "zone-b"
            in_a_row += 1
    assert in_a_row == 50, f"traffic not in zone-b after 2 s ({failed} failed)"
    # Each zone-a endpoint fails at most CONSECUTIVE_5XX requests before it is ejected.
    assert 1 <= failed <= 2 * CONSECUTIVE_5XX, failed


async def test_removing_zone_a_endpoints_fails_no_request(zones: Zones):
    """Requests keep flowing (4 at a time) from before the write until 200 after Envoy holds
    zone-b alone: none fails."""
    answers: list[str | None] = []
    moved = asyncio.Event()

    async def traffic() -> None:
        after = 0
        while after < 200 and len(answers) < 20_000:
            answers.extend(await spread(zones.session, zones.url, HOST, 4, concurrency=4))
            after += 4 if moved.is_set() else 0

    flowing = asyncio.create_task(traffic())
    await wait_for(lambda: len(answers) >= 100, timeout=10, what="traffic before the write")
    zones.write(["b1", "b2"])
    await wait_for(
        lambda: zones.envoy.has_priorities(CLUSTER_NAME, {address("b1"): 0, address("b2"): 0}),
        timeout=10,
        what="zone-b alone",
    )
    moved.set()
    await asyncio.wait_for(flowing, 30)
    assert None not in answers, f"{answers.count(None)} of {len(answers)} failed"
    assert {ZONE_OF[name] for name in answers[-100:] if name} == {"zone-b"}
    assert {ZONE_OF[name] for name in answers[:100] if name} == {"zone-a"}


async def test_a_draining_zone_is_not_available(zones: Zones):
    """Terminating but still serving endpoints (DRAINING) count as unhealthy for the priority's
    health: zone-a draining sends the traffic to zone-b, and none of it fails."""
    zones.write(list(ZONE_OF), draining=("a1", "a2"))

    async def drained() -> bool:
        data = await zones.envoy.get_json("/clusters?format=json")
        for cluster in data.get("cluster_statuses", []):
            if cluster["name"] == CLUSTER_NAME:
                return {
                    h["address"]["socket_address"]["address"]
                    for h in cluster["host_statuses"]
                    if h.get("health_status", {}).get("eds_health_status") == "DRAINING"
                } == {address("a1"), address("a2")}
        return False

    await wait_for(drained, timeout=10, what="zone-a draining in Envoy")
    before = zones.zone_counts()["zone-a"]
    answers = await spread(zones.session, zones.url, HOST, 300)
    assert None not in answers
    assert zones.zone_counts()["zone-a"] == before
    assert {ZONE_OF[name] for name in answers if name} == {"zone-b"}
