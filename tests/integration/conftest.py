"""Fixtures for the real-process tests: manifests in a temp dir, the control plane, an Envoy."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from xds.app import ControlPlane
from xds.config import Settings
from xds.local import Envoy, free_port

# Every test backend runs on loopback, which the control plane refuses as an endpoint unless
# allowed (from a real proxy it would reach the proxy's own node).
LOOPBACK = ("127.0.0.0/8",)


def service(
    name: str,
    port: int,
    namespace: str = "default",
    cluster_ip: str | None = None,
    annotations: dict[str, str] | None = None,
    port_name: str = "http",
    **spec: Any,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = annotations
    body: dict[str, Any] = {"ports": [{"name": port_name, "port": port, "targetPort": port_name}]}
    if cluster_ip:
        body["clusterIP"] = cluster_ip
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": body}


def endpoint_slice(
    service_name: str,
    addresses: list[str],
    port: int,
    namespace: str = "default",
    name: str | None = None,
    port_name: str = "http",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-slice",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }


def write_manifests(path: Path, *objects: dict[str, Any]) -> None:
    """Atomically, as editors and `kubectl`-style tools do: the watcher must see one change."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    os.replace(tmp, path)


@dataclass
class Mesh:
    """A running control plane, its manifests directory and an Envoy connected to it."""

    plane: ControlPlane
    manifests: Path
    envoy: Envoy
    listener_port: int  # where Envoy listens for the service port `service_port`
    service_port: int
    admin_url: str
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener_port}/"

    async def syncz(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.admin_url}/debug/syncz") as response:
            return await response.json()

    async def problems(self) -> list[dict[str, str]]:
        async with self.session.get(f"{self.admin_url}/debug/problems") as response:
            return await response.json()


@pytest.fixture
def service_port() -> int:
    return 8080


@pytest.fixture
async def mesh(tmp_path: Path, service_port: int) -> AsyncIterator[Mesh]:
    """The control plane on a manifests dir (empty at first) and an Envoy in ADS mode."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    listener_port = free_port()
    settings = Settings(
        manifests=(manifests,),
        xds_port=0,
        admin_port=0,
        listener_address="127.0.0.1",
        listener_port_offset=listener_port - service_port,
        # Tests provoke NACKs with patches Envoy rejects, in namespace default.
        cluster_patch_namespaces=("default",),
        allowed_endpoint_ranges=LOOPBACK,
    )
    plane = ControlPlane(settings)
    ports = await plane.start()
    envoy = Envoy(f"127.0.0.1:{ports.xds}", workdir=tmp_path)
    session = aiohttp.ClientSession()
    try:
        await envoy.start()
        yield Mesh(
            plane,
            manifests,
            envoy,
            listener_port,
            service_port,
            f"http://127.0.0.1:{ports.admin}",
            session,
        )
    finally:
        await session.close()
        await envoy.stop()
        await plane.stop()
