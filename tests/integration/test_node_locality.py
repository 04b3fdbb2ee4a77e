"""A node proxy whose bootstrap names no zone (one ConfigMap for a whole DaemonSet) is placed by
its Kubernetes Node's topology labels, read from the API (the stand-in) by the node's name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import LOOPBACK, endpoint_slice, service
from tests.integration.test_kube import kubeconfig
from tests.kubeapi import ENDPOINTSLICES, NODES, SERVICES, KubeAPIServer
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Envoy, free_port, free_port_offset, wait_for

SERVICE_PORT = 80
WEB = "shop/web:http"


@pytest.fixture
def api() -> Iterator[KubeAPIServer]:
    with KubeAPIServer(bookmark_interval=0.5) as server:
        yield server


def kube_plane(tmp_path: Path, api: KubeAPIServer) -> ControlPlane:
    """The control plane on the API stand-in, endpoints on loopback allowed."""
    return ControlPlane(
        Settings(
            kubernetes=True,
            kubeconfig=str(kubeconfig(tmp_path / "kubeconfig", api.url)),
            kube_read_timeout_s=2.0,
            xds_port=0,
            admin_port=0,
            listener_address="127.0.0.1",
            listener_port_offset=free_port_offset([SERVICE_PORT]),
            allowed_endpoint_ranges=LOOPBACK,
        )
    )


async def test_a_node_proxy_is_placed_in_its_nodes_zone(tmp_path: Path, api: KubeAPIServer):
    api.apply(
        NODES,
        {
            "metadata": {
                "name": "kind-worker",
                "labels": {
                    "topology.kubernetes.io/region": "region-1",
                    "topology.kubernetes.io/zone": "zone-b",
                },
            }
        },
    )
    api.apply(
        SERVICES, service("web", SERVICE_PORT, namespace="shop", trafficDistribution="PreferClose")
    )
    port = free_port()
    slice_ = endpoint_slice("web", ["127.0.0.1", "127.0.0.2"], port, namespace="shop", name="w")
    slice_["endpoints"][0]["zone"] = "zone-a"
    slice_["endpoints"][1]["zone"] = "zone-b"
    api.apply(ENDPOINTSLICES, slice_)
    plane = kube_plane(tmp_path, api)
    ports = await plane.start()
    # Named after their node, as the DaemonSet of deploy/overlays/demo names them; no locality.
    placed = Envoy(f"127.0.0.1:{ports.xds}", node_id="kind-worker", workdir=tmp_path)
    unknown = Envoy(f"127.0.0.1:{ports.xds}", node_id="kind-worker9", workdir=tmp_path)
    try:
        await placed.start()
        await unknown.start()
        await wait_for(
            lambda: placed.has_priorities(WEB, {"127.0.0.1": 1, "127.0.0.2": 0}),
            timeout=30,
            what="zone-b first for the proxy on kind-worker",
        )
        await wait_for(
            lambda: unknown.has_priorities(WEB, {"127.0.0.1": 0, "127.0.0.2": 0}),
            timeout=30,
            what="one priority for a proxy whose node is not found",
        )
        syncz = f"http://127.0.0.1:{ports.admin}/debug/syncz"
        async with aiohttp.ClientSession() as session, session.get(syncz) as response:
            streams = {s["node_id"]: s for s in await response.json()}
        assert streams["kind-worker"]["locality"] == {
            "region": "region-1",
            "zone": "zone-b",
            "cluster": "",
        }
        assert streams["kind-worker9"]["locality"] is None
    finally:
        await unknown.stop()
        await placed.stop()
        await plane.stop()


def node(name: str, region: str, zone: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "topology.kubernetes.io/region": region,
                "topology.kubernetes.io/zone": zone,
            },
        }
    }


async def test_endpoints_get_their_region_from_their_node(tmp_path: Path, api: KubeAPIServer):
    """EndpointSlices name an endpoint's zone, never its region: the region comes from the Node
    it runs on, and a client in region-1 gets region-1's other zone before region-2."""
    for name, region, zone in (
        ("node-a", "region-1", "zone-a"),
        ("node-b", "region-1", "zone-b"),
        ("node-c", "region-2", "zone-c"),
    ):
        api.apply(NODES, node(name, region, zone))
    api.apply(
        SERVICES, service("web", SERVICE_PORT, namespace="shop", trafficDistribution="PreferClose")
    )
    slice_ = endpoint_slice(
        "web", ["127.0.0.1", "127.0.0.2", "127.0.0.3"], free_port(), namespace="shop", name="w"
    )
    for endpoint, (node_name, zone) in zip(
        slice_["endpoints"],
        (("node-a", "zone-a"), ("node-b", "zone-b"), ("node-c", "zone-c")),
        strict=True,
    ):
        endpoint["nodeName"] = node_name
        endpoint["zone"] = zone
    api.apply(ENDPOINTSLICES, slice_)
    plane = kube_plane(tmp_path, api)
    ports = await plane.start()
    envoy = Envoy(f"127.0.0.1:{ports.xds}", node_id="node-a", workdir=tmp_path)
    try:
        await envoy.start()
        await wait_for(
            lambda: envoy.has_priorities(WEB, {"127.0.0.1": 0, "127.0.0.2": 1, "127.0.0.3": 2}),
            timeout=30,
            what="its zone, then its region, then the rest",
        )
    finally:
        await envoy.stop()
        await plane.stop()
