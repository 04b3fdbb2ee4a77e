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
        stack(
            tmp_path,
            mode,
            cluster_patch_namespaces=("*",),
            allowed_endpoint_ranges=("127.0.0.2/31",),
        ) as mesh,
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


@pytest.mark.parametrize("mode", MODES)
async def test_envoys_admin_is_not_reachable_through_the_mesh(tmp_path: Path, mode: str):
    """The tester's attack: an ExternalName Service (or an EndpointSlice) naming a loopback address
    answered GET /server_info from the node's Envoy admin through the mesh, and POST
    /quitquitquit stopped Envoy. Backends are allowed (127.0.0.2/31); Envoy's admin, on
    127.0.0.1, is not."""
    async with (
        pods("127.0.0.2", "127.0.0.3") as (web_pod, other_pod),
        stack(tmp_path, mode, allowed_endpoint_ranges=("127.0.0.2/31",)) as mesh,
    ):
        port = free_port(LISTENERS)
        admin = mesh.envoy.admin_port  # Envoy's admin: 127.0.0.1:<admin>
        mesh.apply(
            # A Service whose slice mixes an allowed pod and Envoy's admin address.
            service("web", port, namespace="team-a", cluster_ip="10.96.0.30"),
            endpoint_slice("web", [web_pod.host, "127.0.0.1"], web_pod.port, namespace="team-a"),
            # Three ways to Envoy's admin, on a port of their own, next to an ordinary Service.
            service("other", admin, namespace="team-a", cluster_ip="10.96.0.31"),
            endpoint_slice("other", [other_pod.host], other_pod.port, namespace="team-a"),
            service("console", admin, namespace="team-a", cluster_ip="10.96.0.32"),
            endpoint_slice("console", ["127.0.0.1"], admin, namespace="team-a"),
            service(
                "alias", admin, namespace="team-a", type="ExternalName", externalName="127.0.0.1"
            ),
            service(
                "local", admin, namespace="team-a", type="ExternalName", externalName="localhost"
            ),
        )
        await mesh.served_by(admin, "other.team-a", {"pod-3"})  # that listener is up
        names = ("console", "alias", "local")

        async def every_cluster_active() -> bool:
            return {f"team-a/{n}:http" for n in names} <= set(await mesh.envoy.endpoints())

        await wait_for(every_cluster_active, 15, what="the clusters to the admin address active")
        hosts = await mesh.envoy.endpoints()
        for name in names:
            url = f"http://{LISTENERS}:{admin}"
            headers = {"Host": f"{name}.team-a"}
            async with mesh.session.get(f"{url}/server_info", headers=headers) as response:
                body = await response.text()
                assert response.status == 503, body
                assert "hot_restart_version" not in body and "command_line_options" not in body
            async with mesh.session.post(f"{url}/quitquitquit", headers=headers) as response:
                assert response.status == 503
            assert hosts[f"team-a/{name}:http"] == set(), name
        await mesh.served_by(port, "web.team-a", {"pod-2"})
        hosts = await mesh.envoy.endpoints()
        assert hosts["team-a/web:http"] == {f"{web_pod.host}:{web_pod.port}"}
        # Envoy is still up, and still serves.
        assert mesh.envoy.process is not None and mesh.envoy.process.returncode is None
        async with mesh.session.get(f"{mesh.envoy.admin}/ready") as response:
            assert response.status == 200
        await mesh.served_by(port, "web.team-a", {"pod-2"})

        refused = {
            (p["object"], p["field"]) for p in await mesh.problems() if p["severity"] == "error"
        }
        assert refused == {
            ("EndpointSlice team-a/web-slice", "endpoints[1].addresses[0]"),
            ("EndpointSlice team-a/console-slice", "endpoints[0].addresses[0]"),
            ("Service team-a/alias", "spec.externalName"),
            ("Service team-a/local", "spec.externalName"),
        }
