"""Namespace scoping with a real Envoy (issue 10, point 3), in every client mode (state of the world
and delta, over ADS or per-type streams, whose views are scoped then rewritten for their API): a
proxy of team-a reaches its own namespace's Services and those exported to it, nothing of team-b
(by host name or by ClusterIP) until team-b exports it; a proxy of a mesh-wide namespace reaches
everything. Envoy's listeners are on 127.0.0.5, backends on 127.0.0.2-4: all loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import endpoint_slice, service, write_manifests
from xds.app import ControlPlane
from xds.bootstrap import MODES
from xds.config import Settings
from xds.local import Backend, Envoy, free_port, spread, wait_for

LISTENERS = "127.0.0.5"
VICTIM_IP = "10.96.0.32"


@contextlib.asynccontextmanager
async def pods(port: int) -> AsyncIterator[dict[str, Backend]]:
    started: dict[str, Backend] = {}
    try:
        for name, host in (("web", "127.0.0.2"), ("victim", "127.0.0.3"), ("shared", "127.0.0.4")):
            started[name] = await Backend(name, host, port).start()
        yield started
    finally:
        for backend in started.values():
            await backend.stop()


def manifests(port: int, backends: dict[str, Backend], victim_export: str | None) -> list[Any]:
    def one(name: str, namespace: str, ip: str, export_to: str | None) -> list[dict[str, Any]]:
        annotations = {"xds.dev/export-to": export_to} if export_to else None
        backend = backends[name]
        return [
            service(name, port, namespace=namespace, cluster_ip=ip, annotations=annotations),
            endpoint_slice(name, [backend.host], backend.port, namespace=namespace),
        ]

    return [
        *one("web", "team-a", "10.96.0.31", None),
        *one("victim", "team-b", VICTIM_IP, victim_export),
        *one("shared", "team-c", "10.96.0.33", "*"),
    ]


async def reaches(
    session: aiohttp.ClientSession, port: int, host: str, expected: str | None
) -> None:
    """Every one of 6 requests for `host` answered by `expected` (None: by no backend)."""
    url = f"http://{LISTENERS}:{port}/"

    async def settled() -> bool:
        return set(await spread(session, url, host, 6, concurrency=3)) == {expected}

    await wait_for(settled, 15, interval=0.05, what=f"{host} answered by {expected}")


async def clusters_of(envoy: Envoy) -> set[str]:
    dump = await envoy.config_dump()
    names: set[str] = set()
    for config in dump["configs"]:
        for entry in config.get("dynamic_active_clusters", []):
            names.add(entry["cluster"]["name"])
    return names


async def rejected_updates(envoy: Envoy) -> int:
    stats = await envoy.stats()
    return sum(value for name, value in stats.items() if name.endswith("update_rejected"))


@pytest.mark.parametrize("mode", MODES)
async def test_a_scoped_proxy_reaches_only_its_namespace_and_what_is_exported_to_it(
    tmp_path: Path, mode: str
):
    port = free_port(LISTENERS)
    directory = tmp_path / "manifests"
    directory.mkdir()
    plane = ControlPlane(
        Settings(
            manifests=(directory,),
            xds_port=0,
            admin_port=0,
            listener_address=LISTENERS,
            allowed_endpoint_ranges=("127.0.0.0/8",),
            scope="namespace",
            mesh_wide_namespaces=("xds-system",),
        )
    )
    async with pods(free_port()) as backends, aiohttp.ClientSession() as session:
        write_manifests(directory / "mesh.yaml", *manifests(port, backends, None))
        ports = await plane.start()
        xds = f"127.0.0.1:{ports.xds}"
        tenant = Envoy(xds, node_id="envoy-1.team-a", mode=mode, workdir=tmp_path)
        try:
            await tenant.start()
            await reaches(session, port, "web.team-a", "web")
            await reaches(session, port, "shared.team-c", "shared")
            # team-b's Service is nowhere in team-a's proxy: not by name, not by its ClusterIP.
            await reaches(session, port, "victim.team-b", None)
            await reaches(session, port, VICTIM_IP, None)
            assert await clusters_of(tenant) == {"team-a/web:http", "team-c/shared:http"}
            async with session.get(f"http://127.0.0.1:{ports.admin}/debug/syncz") as response:
                streams = await response.json()  # one, or one per type without ADS
            assert streams and {(s["node_id"], s["scope"]) for s in streams} == {
                ("envoy-1.team-a", "team-a")
            }

            # team-b exports its Service to team-a: it appears; withdrawn: it is gone again.
            write_manifests(directory / "mesh.yaml", *manifests(port, backends, "team-a"))
            await reaches(session, port, "victim.team-b", "victim")
            await reaches(session, port, "web.team-a", "web")
            write_manifests(directory / "mesh.yaml", *manifests(port, backends, "team-z"))
            await reaches(session, port, "victim.team-b", None)
            await wait_for(
                lambda: _equals(clusters_of(tenant), {"team-a/web:http", "team-c/shared:http"}),
                10,
                what="team-b's cluster withdrawn from team-a's proxy",
            )
            assert await rejected_updates(tenant) == 0
        finally:
            await tenant.stop()

        # A proxy of a mesh-wide namespace (a node proxy) sees every Service.
        node = Envoy(xds, node_id="node-1.xds-system", mode=mode, workdir=tmp_path)
        try:
            await node.start()
            await reaches(session, port, "victim.team-b", "victim")
            await reaches(session, port, "web.team-a", "web")
            assert len(await clusters_of(node)) == 3
            assert await rejected_updates(node) == 0
        finally:
            await node.stop()
            await plane.stop()


async def _equals(names: Any, expected: set[str]) -> bool:
    return await names == expected
