"""Issue 10 with a real Envoy: what a tenant's Service may not make the mesh do, in state-of-the-
world and delta ADS. Envoy's listeners are on 127.0.0.5 (so a Service port may equal any port
bound on 127.0.0.1), backends on 127.0.0.2 and 127.0.0.3; nothing ever sends traffic off loopback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import endpoint_slice, service, write_manifests
from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Backend, Envoy, free_port, request_backend, spread, wait_for

LISTENERS = "127.0.0.5"
MODES = ["ads", "delta-ads"]


@dataclass
class Stack:
    plane: ControlPlane
    manifests: Path
    envoy: Envoy
    admin_url: str
    session: aiohttp.ClientSession

    def apply(self, *objects: dict[str, Any]) -> None:
        write_manifests(self.manifests / "mesh.yaml", *objects)

    async def problems(self) -> list[dict[str, str]]:
        async with self.session.get(f"{self.admin_url}/debug/problems") as response:
            return await response.json()

    async def served_by(self, port: int, host: str, expected: set[str]) -> None:
        url = f"http://{LISTENERS}:{port}/"

        async def settled() -> bool:
            return set(await spread(self.session, url, host, 12, concurrency=3)) == expected

        await wait_for(settled, 15, interval=0.05, what=f"{host} served by {sorted(expected)}")


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, mode: str, **settings: Any) -> AsyncIterator[Stack]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    plane = ControlPlane(
        Settings(
            manifests=(manifests,),
            xds_port=0,
            admin_port=0,
            listener_address=LISTENERS,
            **settings,
        )
    )
    ports = await plane.start()
    envoy = Envoy(f"127.0.0.1:{ports.xds}", node_id=f"trust-{mode}", mode=mode, workdir=tmp_path)
    session = aiohttp.ClientSession()
    try:
        await envoy.start()
        yield Stack(plane, manifests, envoy, f"http://127.0.0.1:{ports.admin}", session)
    finally:
        await session.close()
        await envoy.stop()
        await plane.stop()


@contextlib.asynccontextmanager
async def pods(*hosts: str) -> AsyncIterator[list[Backend]]:
    """One backend per loopback address, all on one port, named after the last octet."""
    port = free_port()
    started: list[Backend] = []
    try:
        for host in hosts:
            started.append(await Backend(f"pod-{host.rsplit('.', 1)[1]}", host, port).start())
        yield started
    finally:
        for backend in started:
            await backend.stop()


@pytest.mark.parametrize("mode", MODES)
async def test_a_cluster_patch_cannot_take_over_another_namespaces_service(
    tmp_path: Path, mode: str
):
    """The tester's attack: team-a patched its cluster's name to team-b's and served its
    requests (6 of 6); a second patch pointed team-a's cluster at team-b's endpoints."""
    port = free_port(LISTENERS)
    async with (
        pods("127.0.0.2", "127.0.0.3") as (victim_pod, attacker_pod),
        stack(tmp_path, mode, cluster_patch_namespaces=("*",)) as mesh,
    ):
        hijack = {
            "name": "team-b/victim:http",
            "edsClusterConfig": {"serviceName": "team-a/attacker:http"},
        }
        borrow = {"edsClusterConfig": {"serviceName": "team-b/victim:http"}}
        mesh.apply(
            service("victim", port, namespace="team-b", cluster_ip="10.96.0.20"),
            endpoint_slice("victim", [victim_pod.host], victim_pod.port, namespace="team-b"),
            service(
                "attacker",
                port,
                namespace="team-a",
                cluster_ip="10.96.0.21",
                annotations={"xds.dev/cluster-patch": json.dumps(hijack)},
            ),
            service(
                "thief",
                port,
                namespace="team-a",
                cluster_ip="10.96.0.22",
                annotations={"xds.dev/cluster-patch": json.dumps(borrow)},
            ),
            endpoint_slice("attacker", [attacker_pod.host], attacker_pod.port, namespace="team-a"),
            endpoint_slice("thief", [attacker_pod.host], attacker_pod.port, namespace="team-a"),
        )
        await mesh.served_by(port, "attacker.team-a", {"pod-3"})
        await mesh.served_by(port, "thief.team-a", {"pod-3"})
        before = attacker_pod.requests
        url = f"http://{LISTENERS}:{port}/"
        answers = [await request_backend(mesh.session, url, "victim.team-b") for _ in range(12)]
        assert answers == ["pod-2"] * 12
        assert attacker_pod.requests == before

        refused = {
            (p["object"], p["field"]) for p in await mesh.problems() if p["severity"] == "error"
        }
        field = 'metadata.annotations["xds.dev/cluster-patch"]'
        assert refused == {
            ("Service team-a/attacker", f"{field}.name"),
            ("Service team-a/attacker", f"{field}.edsClusterConfig"),
            ("Service team-a/thief", f"{field}.edsClusterConfig"),
        }
        dump = await mesh.envoy.config_dump()
        [clusters] = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")]
        names = {
            c["cluster"]["name"]: c["cluster"]["eds_cluster_config"]["service_name"]
            for c in clusters["dynamic_active_clusters"]
        }
        assert names == {
            "team-b/victim:http": "team-b/victim:http",
            "team-a/attacker:http": "team-a/attacker:http",
            "team-a/thief:http": "team-a/thief:http",
        }
