"""Two Kubernetes clusters (two API server stand-ins) read as one mesh, with a real Envoy that runs
in cluster east: it keeps its traffic in east, a Service's endpoints of west stay served while
west's API server is away, and what changed there meanwhile applies when it comes back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.integration.conftest import LOOPBACK, endpoint_slice, service
from tests.kubeapi import ENDPOINTSLICES, SERVICES, KubeAPIServer
from xds.app import ControlPlane
from xds.config import ClusterSource, Settings
from xds.local import Backend, Envoy, free_port, free_port_offset, spread, wait_for

SERVICE_PORT = 80
HOST = "web.shop"
CLUSTER_NAME = "shop/web:http"
CLUSTER_OF = {"e1": "east", "e2": "east", "w1": "west", "w2": "west", "w3": "west"}


def address(name: str) -> str:
    return f"127.0.0.{list(CLUSTER_OF).index(name) + 1}"


def kubeconfig(path: Path, servers: dict[str, str]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": n, "cluster": {"server": url}} for n, url in servers.items()],
                "users": [{"name": "test", "user": {"token": "not-checked"}}],
                "contexts": [
                    {"name": n, "context": {"cluster": n, "user": "test"}} for n in servers
                ],
                "current-context": next(iter(servers)),
            }
        )
    )
    return path


@dataclass
class Clusters:
    apis: dict[str, KubeAPIServer]
    plane: ControlPlane
    envoy: Envoy
    backends: dict[str, Backend]
    port: int
    url: str
    admin: str
    session: aiohttp.ClientSession

    def publish(self, cluster: str, names: list[str]) -> None:
        """The Service and its EndpointSlice in one cluster's API."""
        api = self.apis[cluster]
        api.apply(
            SERVICES,
            service("web", SERVICE_PORT, namespace="shop", trafficDistribution="PreferClose"),
        )
        api.apply(
            ENDPOINTSLICES,
            endpoint_slice(
                "web", [address(n) for n in names], self.port, namespace="shop", name="web-1"
            ),
        )

    async def hosts(self) -> dict[str, int]:
        """Envoy's hosts of the Service's cluster: address -> priority."""
        return await self.envoy.priorities(CLUSTER_NAME)

    async def problems(self) -> list[dict[str, str]]:
        async with self.session.get(f"{self.admin}/debug/problems") as response:
            return await response.json()


@pytest.fixture
def apis() -> Iterator[dict[str, KubeAPIServer]]:
    # Fixed ports: an API server stopped and started again is found where it was.
    servers = {
        name: KubeAPIServer(port=free_port(), bookmark_interval=0.5) for name in ("east", "west")
    }
    for server in servers.values():
        server.start_in_thread()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop_in_thread()


@pytest.fixture
async def clusters(tmp_path: Path, apis: dict[str, KubeAPIServer]) -> AsyncIterator[Clusters]:
    port = free_port()
    offset = free_port_offset([SERVICE_PORT])
    config = kubeconfig(tmp_path / "kubeconfig", {n: api.url for n, api in apis.items()})
    plane = ControlPlane(
        Settings(
            kubernetes=True,
            kubeconfig=str(config),
            clusters=(
                ClusterSource("east", kube_context="east"),
                ClusterSource("west", kube_context="west"),
            ),
            kube_read_timeout_s=2.0,
            xds_port=0,
            admin_port=0,
            listener_address="127.0.0.1",
            listener_port_offset=offset,
            allowed_endpoint_ranges=LOOPBACK,
        )
    )
    backends = {name: Backend(name, address(name), port) for name in CLUSTER_OF}
    for backend in backends.values():
        await backend.start()
    ports = await plane.start()

    def in_east(bootstrap: dict[str, Any]) -> None:
        bootstrap["node"]["metadata"] = {"CLUSTER_ID": "east"}

    envoy = Envoy(f"127.0.0.1:{ports.xds}", workdir=tmp_path, customize=in_east)
    session = aiohttp.ClientSession()
    try:
        await envoy.start()
        started = Clusters(
            apis,
            plane,
            envoy,
            backends,
            port,
            f"http://127.0.0.1:{SERVICE_PORT + offset}/",
            f"http://127.0.0.1:{ports.admin}",
            session,
        )
        started.publish("east", ["e1", "e2"])
        started.publish("west", ["w1", "w2"])
        expected = {
            address(n): 0 if CLUSTER_OF[n] == "east" else 1 for n in ("e1", "e2", "w1", "w2")
        }
        await wait_for(
            lambda: envoy.has_priorities(CLUSTER_NAME, expected),
            timeout=30,
            what="east first, then west",
        )
        yield started
    finally:
        await session.close()
        await envoy.stop()
        await plane.stop()
        for backend in backends.values():
            await backend.stop()


async def test_an_envoy_in_east_keeps_its_traffic_in_east(clusters: Clusters):
    answers = await spread(clusters.session, clusters.url, HOST, 500)
    assert None not in answers
    in_east = sum(1 for name in answers if name and CLUSTER_OF[name] == "east")
    assert in_east >= 495, answers  # >= 99 %


async def test_a_cluster_whose_api_goes_away_keeps_its_endpoints_and_catches_up(
    clusters: Clusters,
):
    west = clusters.apis["west"]
    west.stop_in_thread()

    async def west_reported() -> bool:
        return any("cluster west" in p.get("object", "") for p in await clusters.problems())

    # The informers' failures are reported (as west's) while its endpoints stay served.
    await wait_for(west_reported, timeout=30, what="west's failure reported")
    assert await clusters.hosts() == {
        address("e1"): 0,
        address("e2"): 0,
        address("w1"): 1,
        address("w2"): 1,
    }
    # Meanwhile, in west: w2 goes, w3 comes. West's API server comes back with that.
    clusters.publish("west", ["w1", "w3"])
    west.start_in_thread()
    expected = {address("e1"): 0, address("e2"): 0, address("w1"): 1, address("w3"): 1}
    await wait_for(
        lambda: clusters.envoy.has_priorities(CLUSTER_NAME, expected),
        timeout=60,
        what="west's changes",
    )
    answers = await spread(clusters.session, clusters.url, HOST, 100)
    assert None not in answers
