"""The Kubernetes source end to end: the official client against an API server that speaks the
real list/watch protocol (tests/kubeapi.py), the control plane, a real Envoy and real backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.integration.conftest import LOOPBACK, endpoint_slice, service
from tests.kubeapi import ENDPOINTS, ENDPOINTSLICES, SERVICES, KubeAPIServer
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Backend, Envoy, backends, free_port, request_backend, wait_for

SERVICE_PORT = 8080


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": server}}],
                "users": [{"name": "test", "user": {"token": "not-checked"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )
    )
    return path


@dataclass
class Cluster:
    api: KubeAPIServer
    plane: ControlPlane
    envoy: Envoy
    pods: list[Backend]
    session: aiohttp.ClientSession
    listener_port: int
    admin: str

    def hosts(self, *indexes: int) -> list[str]:
        return [self.pods[i].host for i in indexes]

    async def served_by(self, host: str) -> set[str | None]:
        url = f"http://127.0.0.1:{self.listener_port}/"
        return {await request_backend(self.session, url, host, timeout=2) for _ in range(12)}

    async def routes_to(self, host: str, expected: set[str | None], timeout: float = 15) -> None:
        async def settled() -> bool:
            return await self.served_by(host) == expected

        await wait_for(settled, timeout, what=f"{host} -> {sorted(map(str, expected))}")


@pytest.fixture
def api() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(bookmark_interval=0.5) as server:
        yield server


async def start_cluster(
    tmp_path: Path, api: KubeAPIServer, **settings: Any
) -> AsyncIterator[Cluster]:
    listener_port = free_port()
    plane = ControlPlane(
        Settings(
            kubernetes=True,
            kubeconfig=str(kubeconfig(tmp_path / "kubeconfig", api.url)),
            xds_port=0,
            admin_port=0,
            listener_address="127.0.0.1",
            listener_port_offset=listener_port - SERVICE_PORT,
            allowed_endpoint_ranges=LOOPBACK,
            **settings,
        )
    )
    ports = await plane.start()
    envoy = Envoy(f"127.0.0.1:{ports.xds}", node_id="kube-proxy", workdir=tmp_path)
    async with backends(["p0", "p1", "p2"]) as pods, aiohttp.ClientSession() as session:
        try:
            await envoy.start()
            yield Cluster(
                api,
                plane,
                envoy,
                pods,
                session,
                listener_port,
                f"http://127.0.0.1:{ports.admin}",
            )
        finally:
            await envoy.stop()
            await plane.stop()


@pytest.fixture
async def cluster(tmp_path: Path, api: KubeAPIServer) -> AsyncIterator[Cluster]:
    async for started in start_cluster(tmp_path, api, kube_read_timeout_s=2.0):
        yield started


def slice_of(cluster: Cluster, name: str, *indexes: int, slice_name: str = "") -> dict:
    return endpoint_slice(
        name, cluster.hosts(*indexes), cluster.pods[0].port, name=slice_name or f"{name}-a"
    )


async def test_create_update_delete_follow_the_api(cluster: Cluster):
    api = cluster.api
    api.apply(SERVICES, service("web", SERVICE_PORT))
    api.apply(ENDPOINTSLICES, slice_of(cluster, "web", 0))
    await cluster.routes_to("web.default", {"p0"})

    # Endpoints merged across two slices of one Service (one address in both: counted once).
    api.apply(ENDPOINTSLICES, slice_of(cluster, "web", 1, 0, slice_name="web-b"))
    await cluster.routes_to("web.default", {"p0", "p1"})

    api.apply(ENDPOINTSLICES, slice_of(cluster, "web", 2))
    await cluster.routes_to("web.default", {"p0", "p1", "p2"})  # web-a: p2; web-b: p1, p0
    api.delete(ENDPOINTSLICES, "default", "web-b")
    await cluster.routes_to("web.default", {"p2"})

    api.apply(SERVICES, service("api", SERVICE_PORT, namespace="prod"))
    api.apply(ENDPOINTSLICES, endpoint_slice("api", cluster.hosts(1), cluster.pods[0].port,
                                             namespace="prod", name="api-a"))  # fmt: skip
    await cluster.routes_to("api.prod", {"p1"})

    api.delete(SERVICES, "default", "web")
    await cluster.routes_to("web.default", {None})
    await cluster.routes_to("api.prod", {"p1"})


async def test_a_410_in_the_middle_of_churn_ends_with_exactly_the_right_endpoints(
    cluster: Cluster,
):
    api = cluster.api
    api.apply(SERVICES, service("web", SERVICE_PORT))
    api.apply(ENDPOINTSLICES, slice_of(cluster, "web", 0))
    await cluster.routes_to("web.default", {"p0"})
    lists_before = api.list_calls(ENDPOINTSLICES)
    for round_ in range(30):
        api.apply(ENDPOINTSLICES, slice_of(cluster, "web", round_ % 3))
        api.apply(ENDPOINTSLICES, slice_of(cluster, "web", (round_ + 1) % 3, slice_name="web-b"))
        if round_ == 10:
            api.expire_watches()  # a 410 for every watcher, history compacted
        if round_ == 20:
            api.delete(ENDPOINTSLICES, "default", "web-b")
    api.delete(ENDPOINTSLICES, "default", "web-b")
    api.apply(ENDPOINTSLICES, slice_of(cluster, "web", 2))
    await cluster.routes_to("web.default", {"p2"})
    assert api.list_calls(ENDPOINTSLICES) > lists_before  # the 410 made the informer relist
    [endpoints] = [e for n, e in (await cluster.envoy.endpoints()).items() if "web" in n]
    assert endpoints == {f"{cluster.pods[2].host}:{cluster.pods[2].port}"}


async def test_a_stalled_watch_is_detected_and_resumed(cluster: Cluster):
    api = cluster.api
    api.apply(SERVICES, service("web", SERVICE_PORT))
    api.apply(ENDPOINTSLICES, slice_of(cluster, "web", 0))
    await cluster.routes_to("web.default", {"p0"})
    watches_before = api.watch_calls(ENDPOINTSLICES)
    api.stall_watches()  # connections stay open; nothing more is sent on them
    api.apply(ENDPOINTSLICES, slice_of(cluster, "web", 1))
    # The informer's read timeout (2 s here) notices the silence and opens a new watch.
    await wait_for(lambda: api.watch_calls(ENDPOINTSLICES) > watches_before, 15, what="a new watch")
    assert await cluster.served_by("web.default") == {"p0"}  # the change is still held back
    api.unstall()
    await cluster.routes_to("web.default", {"p1"})


async def test_endpoints_are_used_where_endpointslices_are_not_served(
    tmp_path: Path,
):
    with KubeAPIServer(endpointslices=False) as api:
        async for cluster in start_cluster(tmp_path, api):
            api.apply(SERVICES, service("web", SERVICE_PORT))
            api.apply(
                ENDPOINTS,
                {
                    "apiVersion": "v1",
                    "kind": "Endpoints",
                    "metadata": {"name": "web", "namespace": "default"},
                    "subsets": [
                        {
                            "addresses": [{"ip": cluster.pods[1].host}],
                            "ports": [{"name": "http", "port": cluster.pods[1].port}],
                        }
                    ],
                },
            )
            await cluster.routes_to("web.default", {"p1"})
            assert api.list_calls(ENDPOINTSLICES) == 0


async def test_ready_only_after_the_first_full_sync(tmp_path: Path):
    port = free_port()
    listener_port = free_port()
    plane = ControlPlane(
        Settings(
            kubernetes=True,
            kubeconfig=str(kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")),
            xds_port=0,
            admin_port=0,
            listener_address="127.0.0.1",
            listener_port_offset=listener_port - SERVICE_PORT,
            allowed_endpoint_ranges=LOOPBACK,
        )
    )
    ports = await plane.start()
    readyz = f"http://127.0.0.1:{ports.admin}/readyz"
    try:
        async with aiohttp.ClientSession() as session:

            async def status() -> int:
                async with session.get(readyz) as response:
                    return response.status

            assert await status() == 503  # no API server yet: nothing synced
            with KubeAPIServer(port=port) as api:
                api.apply(SERVICES, service("web", SERVICE_PORT))

                async def ready() -> bool:
                    return await status() == 200

                await wait_for(ready, 30, what="ready after the first sync")
                assert "default/web:http" in plane.cache.snapshot.of_type(
                    "type.googleapis.com/envoy.config.cluster.v3.Cluster"
                )
    finally:
        await plane.stop()
